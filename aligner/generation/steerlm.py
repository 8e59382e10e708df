"""Generation from a SteerLM policy with the attribute values the caller asks for (the torch engine)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from aligner.algorithms.steerlm import DEFAULT_ATTRIBUTES, Prompt, conditioned_prompt


def generate_with_attributes(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: Prompt,
    attributes: Mapping[str, float],
    *,
    names: Sequence[str] = DEFAULT_ATTRIBUTES,
    max_new_tokens: int = 256,
    greedy: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> str:
    """The response of a SteerLM policy asked for ``attributes``, from the torch engine.

    The prompt gets its attribute line (:func:`aligner.algorithms.steerlm.conditioned_prompt`); chat
    messages are rendered with the tokenizer's chat template (generation prompt
    added) and encoded without extra special tokens, plain text is encoded with
    the tokenizer's defaults. Generation stops at ``tokenizer.eos_token_id``.

    Args:
        model: the SteerLM policy (a language model from ``build_model``, this
            rank's tensor-parallel shard; every rank of the group must call).
        tokenizer: a Hugging Face tokenizer (``encode``, ``decode``,
            ``apply_chat_template``, ``eos_token_id``, ``pad_token_id``; the eos
            pads when there is no pad token).
        prompt: plain text or chat messages.
        attributes: the wanted value of every attribute in ``names``.
        names: the attributes and their order, as in training.
        max_new_tokens, greedy, temperature, top_k, top_p, generator: see
            :func:`aligner.generation.torch_engine.generate`.

    Returns:
        The decoded response, special tokens (the eos) left out.

    Raises:
        ValueError: the tokenizer has no eos token; see :func:`aligner.algorithms.steerlm.conditioned_prompt`
            and :func:`aligner.generation.torch_engine.generate`.
    """
    (response,) = generate_with_attributes_batch(
        model,
        tokenizer,
        [prompt],
        attributes,
        names=names,
        max_new_tokens=max_new_tokens,
        greedy=greedy,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        generator=generator,
    )
    return response


def generate_with_attributes_batch(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    attributes: Mapping[str, float],
    *,
    names: Sequence[str] = DEFAULT_ATTRIBUTES,
    max_new_tokens: int = 256,
    greedy: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> list[str]:
    """:func:`generate_with_attributes` for several prompts in one batch of the engine; one response each."""
    from aligner.generation.torch_engine import generate

    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id: generation would never stop at an end token")
    prompt_ids = []
    for prompt in prompts:
        conditioned = conditioned_prompt(prompt, attributes, names)
        if isinstance(conditioned, str):
            prompt_ids.append(list(tokenizer.encode(conditioned)))
        else:
            text = tokenizer.apply_chat_template(conditioned, tokenize=False, add_generation_prompt=True)
            prompt_ids.append(list(tokenizer.encode(text, add_special_tokens=False)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    out = generate(
        model,
        prompt_ids,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=pad,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        greedy=greedy,
        generator=generator,
    )
    return [
        tokenizer.decode(
            out.tokens[row, int(out.prompt_lengths[row]) : int(out.lengths[row])].tolist(), skip_special_tokens=True
        )
        for row in range(len(prompt_ids))
    ]
