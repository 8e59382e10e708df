"""SteerLM: condition a policy on attribute values written into its prompt.

The recipe (Dong et al., 2023; NeMo-Aligner): train a multi-attribute
regression reward model (:func:`aligner.algorithms.reward.regression_loss`),
:func:`annotate` the SFT data with its predictions, fine-tune with each
example's attribute string in the prompt (:func:`conditioned_prompt`, plain
SFT loss), then ask for the attributes you want at inference
(:func:`generate_with_attributes`).

The attribute string is NeMo-Aligner's canonical form, ``name:value`` pairs in
a fixed order joined by commas, values integers ``0..4``::

    quality:4,toxicity:0,humor:0,creativity:0,helpfulness:4,correctness:4,coherence:4,complexity:4,verbosity:4

Where it goes (one place, for training and inference alike): the line
``<attributes>...</attributes>`` is the first line of the system turn. A chat
prompt (list of messages) gets it prepended to its system message, or a new
system message at the front when it has none; a plain-text prompt gets it as
its first line. The chat template then renders it wherever it puts the system
turn.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from aligner.algorithms.logprobs import last_token_values

# NeMo-Aligner's SteerLM attributes (OpenAssistant + HelpSteer), in its canonical order.
DEFAULT_ATTRIBUTES: tuple[str, ...] = (
    "quality",
    "toxicity",
    "humor",
    "creativity",
    "helpfulness",
    "correctness",
    "coherence",
    "complexity",
    "verbosity",
)
MIN_VALUE, MAX_VALUE = 0, 4
ATTRIBUTE_OPEN, ATTRIBUTE_CLOSE = "<attributes>", "</attributes>"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

Prompt = str | list[dict[str, str]]


def _check_names(names: Sequence[str]) -> None:
    if isinstance(names, str) or not names:
        raise ValueError(f"attribute names must be a non-empty list of names, got {names!r}")
    bad = [name for name in names if not isinstance(name, str) or not _NAME.match(name)]
    if bad:
        raise ValueError(f"attribute names must be identifiers (letters, digits, '_'), got {bad}")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"attribute names are repeated: {duplicates}")


def _check_same_names(found: Sequence[str], names: Sequence[str], what: str) -> None:
    missing = [name for name in names if name not in found]
    unknown = [name for name in found if name not in names]
    if missing or unknown:
        raise ValueError(
            f"{what}: missing attribute(s) {missing}, unknown attribute(s) {unknown}; expected exactly {list(names)}"
        )


def attribute_value(value: float) -> int:
    """A score as an attribute value: clamped to ``[0, 4]``, then rounded half up.

    Raises:
        ValueError: ``value`` is not a finite number.
    """
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"attribute values must be finite numbers, got {value!r}")
    return math.floor(min(max(number, MIN_VALUE), MAX_VALUE) + 0.5)


def format_attributes(values: Mapping[str, float], names: Sequence[str] = DEFAULT_ATTRIBUTES) -> str:
    """The canonical attribute string: ``name:value`` for each of ``names`` in order, comma-joined.

    Values go through :func:`attribute_value` (clamped to ``0..4``, rounded half up).

    Args:
        values: a value for every name (ints, floats or 0-dim tensors).
        names: the attributes and their order.

    Returns:
        e.g. ``"helpfulness:4,correctness:3"``.

    Raises:
        ValueError: bad ``names``, ``values`` missing a name or holding an unknown
            one, a value that is not a finite number.
    """
    _check_names(names)
    _check_same_names(list(values), names, "format_attributes")
    return ",".join(f"{name}:{attribute_value(values[name])}" for name in names)


def parse_attributes(text: str, names: Sequence[str] | None = DEFAULT_ATTRIBUTES) -> dict[str, int]:
    """The attribute values in a string written by :func:`format_attributes`.

    Strict: whitespace around items is allowed, anything else malformed is an
    error (values are integer literals in ``0..4``, no clamping here).

    Args:
        text: ``"name:value,name:value,..."``.
        names: the attributes it must hold, exactly (any order); None accepts any names.

    Returns:
        ``{name: value}`` in the order of ``names`` (of ``text`` when ``names`` is None).

    Raises:
        ValueError: an empty string, an item without exactly one ``:``, an empty
            or invalid name, a value that is not an integer in ``0..4``, a repeated
            name, or (with ``names``) a missing or unknown attribute; the message
            quotes the offending item.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"attribute string is empty; expected 'name:value,...', got {text!r}")
    parsed: dict[str, int] = {}
    for item in text.split(","):
        parts = item.split(":")
        if len(parts) != 2:
            raise ValueError(f"attribute item {item.strip()!r} in {text!r} is not 'name:value'")
        name, raw = parts[0].strip(), parts[1].strip()
        if not _NAME.match(name):
            raise ValueError(f"attribute item {item.strip()!r} in {text!r} has an invalid name {name!r}")
        if not re.fullmatch(r"[+-]?\d+", raw) or not MIN_VALUE <= int(raw) <= MAX_VALUE:
            raise ValueError(
                f"attribute {name!r} in {text!r} has value {raw!r}; expected an integer in {MIN_VALUE}..{MAX_VALUE}"
            )
        if name in parsed:
            raise ValueError(f"attribute {name!r} appears twice in {text!r}")
        parsed[name] = int(raw)
    if names is None:
        return parsed
    _check_names(names)
    _check_same_names(list(parsed), names, f"parse_attributes({text!r})")
    return {name: parsed[name] for name in names}


def attribute_line(values: Mapping[str, float], names: Sequence[str] = DEFAULT_ATTRIBUTES) -> str:
    """``<attributes>`` + :func:`format_attributes` + ``</attributes>``: the line a prompt carries."""
    return f"{ATTRIBUTE_OPEN}{format_attributes(values, names)}{ATTRIBUTE_CLOSE}"


def conditioned_prompt(
    prompt: Prompt, attributes: Mapping[str, float], names: Sequence[str] = DEFAULT_ATTRIBUTES
) -> Prompt:
    """The prompt with its attribute line as the first line of the system turn.

    Args:
        prompt: plain text, or chat messages ``[{"role": ..., "content": ...}, ...]``.
        attributes: a value for every name (see :func:`format_attributes`).
        names: the attributes and their order.

    Returns:
        For text: ``"<attributes>...</attributes>\\n" + prompt``. For messages: a
        new list (the input is not modified) whose first message is the system
        turn, its content the attribute line, then a newline and the former
        system content when there was a system message.

    Raises:
        ValueError: see :func:`format_attributes`; messages that are not dicts
            with ``role`` and ``content``.
    """
    line = attribute_line(attributes, names)
    if isinstance(prompt, str):
        return f"{line}\n{prompt}"
    if not all(isinstance(message, Mapping) and {"role", "content"} <= set(message) for message in prompt):
        raise ValueError("a chat prompt must be a list of {'role': ..., 'content': ...} messages")
    messages = [dict(message) for message in prompt]
    if messages and messages[0]["role"] == "system":
        system = messages[0]["content"]
        messages[0]["content"] = f"{line}\n{system}" if system else line
        return messages
    return [{"role": "system", "content": line}, *messages]


def _check_single_stage(what: str) -> None:
    from megatron.core import parallel_state

    pp = parallel_state.get_pipeline_model_parallel_world_size()
    cp = parallel_state.get_context_parallel_world_size()
    if pp > 1 or cp > 1:
        raise NotImplementedError(
            f"{what} runs with tensor parallelism only; got pipeline-parallel size {pp} and context-parallel size {cp}"
        )


@torch.no_grad()
def annotate(
    records: Sequence[Mapping[str, Any]],
    reward_model: torch.nn.Module,
    encode: Callable[[Mapping[str, Any]], Sequence[int]] | Sequence[Sequence[int]],
    *,
    names: Sequence[str] = DEFAULT_ATTRIBUTES,
    batch_size: int = 8,
    pad_token_id: int = 0,
) -> list[dict[str, Any]]:
    """Label each record with the attribute values a regression reward model predicts.

    Each record's prompt+response tokens run through the model in right-padded
    batches; its ``K`` outputs at the last real token (position ``length - 1``)
    become the attribute values, clamped to ``0..4`` and rounded half up. The
    model runs in eval mode and is put back in its former mode afterwards. A
    collective over the tensor-parallel group when it has several ranks.

    Args:
        records: the examples (e.g. ``{"prompt", "response", ...}``), passed through.
        reward_model: a model from :func:`aligner.models.gpt.build_model` with
            ``num_value_outputs=len(names)`` (this rank's tensor-parallel shard).
        encode: a function from a record to its prompt+response token ids (the
            chat template and tokenizer used to train the reward model), or the
            token id lists themselves, one per record.
        names: the model's outputs, in order.
        batch_size: records per forward.
        pad_token_id: the id right-padding fills with (never read: attention is causal).

    Returns:
        New dicts, one per record: the record's fields with ``"attributes"``
        replaced by ``{name: int}`` predictions.

    Raises:
        ValueError: bad ``names``, ``batch_size < 1``, a token list count other than
            ``len(records)``, an empty token list, a model whose output count is
            not ``len(names)``.
        NotImplementedError: pipeline- or context-parallel size above 1.
    """
    _check_names(names)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if callable(encode):
        token_ids = [list(encode(record)) for record in records]
    else:
        token_ids = [list(ids) for ids in encode]
        if len(token_ids) != len(records):
            raise ValueError(f"got {len(token_ids)} token id lists for {len(records)} records")
    empty = [index for index, ids in enumerate(token_ids) if not ids]
    if empty:
        raise ValueError(f"record(s) {empty[:8]} encode to no tokens")
    _check_single_stage("annotate")
    device = next(reward_model.parameters()).device
    was_training = reward_model.training
    reward_model.eval()
    annotated = []
    try:
        for first in range(0, len(records), batch_size):
            chunk = token_ids[first : first + batch_size]
            lengths = torch.tensor([len(ids) for ids in chunk], dtype=torch.long, device=device)
            input_ids = torch.full((len(chunk), int(lengths.max())), pad_token_id, dtype=torch.long, device=device)
            for row, ids in enumerate(chunk):
                input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            values = reward_model(input_ids, None, None)  # [b, s, K]
            if values.shape[-1] != len(names):
                raise ValueError(
                    f"the reward model has {values.shape[-1]} outputs but {len(names)} attribute names were given "
                    f"({list(names)}); build it with num_value_outputs={len(names)}"
                )
            scores = last_token_values(values.float(), lengths).cpu()  # [b, K]
            for offset, row_scores in enumerate(scores.tolist()):
                predicted = {name: attribute_value(score) for name, score in zip(names, row_scores, strict=True)}
                annotated.append({**records[first + offset], "attributes": predicted})
    finally:
        reward_model.train(was_training)
    return annotated


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

    The prompt gets its attribute line (:func:`conditioned_prompt`); chat
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
        ValueError: the tokenizer has no eos token; see :func:`conditioned_prompt`
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
