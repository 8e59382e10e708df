"""The built-in generation engine: KV-cached sampling from a megatron-core GPTModel in plain torch.

    out = generate(model, [[5, 9, 2], [7]], max_new_tokens=16, eos_token_id=1, pad_token_id=0)
    out.tokens          # [B, S] right-padded prompt + response
    out.prompt_lengths  # [B]
    out.lengths         # [B] prompt + response tokens (an eos, when drawn, is included)
    out.is_end          # [B] True where the response ended with eos, False where it hit max_new_tokens

It runs anywhere megatron-core does (CPU with gloo, GPU), and is the reference
the faster engines are checked against. It keeps keys and values in
megatron-core's static KV cache (``StaticInferenceContext``) and walks all rows
in lockstep over positions, as megatron's own static-batch generator does:
the first forward encodes the shortest prompt's length for every row; each
later forward feeds one position of every row, which is the next prompt token
for a row still inside its (longer) prompt and the last sampled token for the
others. Right padding keeps every row at RoPE positions ``0..S-1``, so a row
gets the tokens it would get alone. A row that has stopped still rides along
(the static cache cannot shrink its batch) until every row is done. Cost:
``max(P) + T - min(P)`` forwards of one token per row for prompts of lengths
``P`` and ``T`` new tokens, attention ``O(B * (max(P) + T)^2)`` in all.

Tensor parallelism: every rank of the tensor-parallel group runs the same
forward on the same prompts; the logits are gathered to the full vocabulary
(``runtime_gather_output=True``), padding columns are masked, every rank
draws, and the tensor-parallel source rank's tokens are broadcast so the ranks
can never diverge (pass generators seeded alike on every rank to keep their
states in step too). Pipeline and context parallelism are not supported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.inference.contexts import StaticInferenceContext
from torch import Tensor

from aligner.models.gpt import mask_padded_vocab


@dataclass
class GenerationOutput:
    """Prompts and their sampled responses, right-padded.

    Attributes:
        tokens: ``[B, S]`` int64, row ``b`` holds its prompt then its response in
            ``[0, lengths[b])`` and the pad id after; ``S = max(lengths)``.
        prompt_lengths: ``[B]`` int64 prompt tokens per row.
        lengths: ``[B]`` int64 prompt + response tokens per row (the eos token,
            when drawn, is part of the response).
        is_end: ``[B]`` bool, True where the response stopped at eos, False where
            it ran out of ``max_new_tokens``.
    """

    tokens: Tensor
    prompt_lengths: Tensor
    lengths: Tensor
    is_end: Tensor


def _check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (use greedy=True for argmax decoding), got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {top_p}")


def _check_logits(logits: Tensor) -> None:
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating [batch, vocab] tensor, got {logits.dtype} {tuple(logits.shape)}")


def sampling_probs(logits: Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """The distribution the next token is drawn from, after temperature, top-k and top-p.

    In that order (as Hugging Face's samplers do): ``z = logits / temperature``;
    top-k keeps the tokens whose ``z`` is at least the ``k``-th largest (ties at
    the boundary are kept); top-p (nucleus) then keeps, in decreasing order of
    probability, every token whose preceding mass is below ``top_p``, so the
    most likely token always survives. Removed tokens get probability 0 and the
    rest is renormalized.

    Args:
        logits: ``[B, V]`` float logits (padding columns already at the dtype's lowest value).
        temperature: ``> 0`` divisor.
        top_k: keep the ``top_k`` most likely tokens; 0 keeps all.
        top_p: keep the smallest prefix of the sorted distribution reaching ``top_p``; 1 keeps all.

    Returns:
        ``[B, V]`` float32 probabilities, each row summing to 1.

    Raises:
        ValueError: ``logits`` not a floating 2-D tensor, ``temperature <= 0``,
            ``top_k < 0`` or ``top_p`` outside ``(0, 1]``.
    """
    _check_logits(logits)
    _check_sampling(temperature, top_k, top_p)
    scaled = logits.float() / temperature
    if 0 < top_k < scaled.shape[-1]:
        kth = scaled.topk(top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        remove = torch.zeros_like(scaled, dtype=torch.bool).scatter(-1, order, mass_before >= top_p)
        scaled = scaled.masked_fill(remove, float("-inf"))
    return scaled.softmax(dim=-1)


def sample_next_token(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One token per row: ``argmax(logits)`` when ``greedy``, else one draw from :func:`sampling_probs`.

    The draw is ``torch.multinomial(sampling_probs(logits, ...), 1, generator=generator)``,
    so a generator in a known state gives a known token.

    Args:
        logits: ``[B, V]`` float logits.
        temperature, top_k, top_p: see :func:`sampling_probs` (ignored when ``greedy``).
        greedy: take the most likely token (the first of tied maxima).
        generator: the random stream to draw from (on the logits' device); None: torch's default.

    Returns:
        ``[B]`` int64 token ids.

    Raises:
        ValueError: see :func:`sampling_probs`.
    """
    _check_logits(logits)
    if greedy:
        return logits.argmax(dim=-1)
    probs = sampling_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside wrappers that keep it as ``.module`` (megatron DDP, Float16Module)."""
    while not hasattr(model, "aligner_config") and hasattr(model, "module"):
        model = model.module
    return model


def _check_parallel() -> None:
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    cp = parallel_state.get_context_parallel_world_size()
    if pp > 1 or cp > 1:
        raise NotImplementedError(
            f"the torch generation engine runs with tensor parallelism only; got pipeline-parallel size {pp} and "
            f"context-parallel size {cp}: gather the weights into a pp=1, cp=1 model for generation"
        )


def _check_ids(name: str, ids: Sequence[int], vocab_size: int) -> None:
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"{name} hold(s) token id(s) {bad[:8]} outside [0, {vocab_size}) (the vocabulary)")


def _agree_across_tensor_parallel(next_tokens: Tensor) -> Tensor:
    """The tensor-parallel source rank's tokens on every rank of its group."""
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.broadcast(
            next_tokens,
            src=parallel_state.get_tensor_model_parallel_src_rank(),
            group=parallel_state.get_tensor_model_parallel_group(),
        )
    return next_tokens


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int],
    pad_token_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    vocab_size: int | None = None,
) -> GenerationOutput:
    """Sample up to ``max_new_tokens`` after each prompt, stopping a row at its first eos.

    The model runs in eval mode (no dropout) and is put back in its former mode
    afterwards. Each step draws one token for every row past its prompt and
    not yet finished, with :func:`sample_next_token`, from the logits at that
    row's last token with the padding columns of the vocabulary masked. A
    collective over the tensor-parallel group: all its ranks call it with the
    same prompts.

    Args:
        model: a language model from :func:`aligner.models.gpt.build_model`
            (or a wrapper holding it as ``.module``), this rank's tensor-parallel shard.
        prompts: ``B`` non-empty lists of token ids, of any lengths.
        max_new_tokens: ``>= 1`` response tokens at most per row.
        eos_token_id: the id (or ids) that end a response; an empty list never stops early.
        pad_token_id: the id that fills rows after their end.
        temperature, top_k, top_p, greedy, generator: see :func:`sample_next_token`.
        vocab_size: the real vocabulary size; None reads the model's config.

    Returns:
        :class:`GenerationOutput` on the model's device.

    Raises:
        ValueError: no or an empty prompt, a token id outside the vocabulary,
            ``max_new_tokens < 1``, a prompt plus ``max_new_tokens`` beyond the
            model's ``max_position_embeddings``, a value model, bad sampling settings.
        NotImplementedError: pipeline- or context-parallel size above 1.
    """
    _check_parallel()
    inner = _unwrap(model)
    config = getattr(inner, "aligner_config", None)
    if getattr(inner, "aligner_num_value_outputs", None) is not None:
        raise ValueError("generate needs a language model; this one was built with num_value_outputs (a value head)")
    if vocab_size is None:
        if config is None:
            raise ValueError("pass vocab_size: the model was not built by aligner.models.gpt.build_model")
        vocab_size = config.vocab_size
    if not greedy:
        _check_sampling(temperature, top_k, top_p)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not prompts or any(len(prompt) == 0 for prompt in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token id lists")
    eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    for index, prompt in enumerate(prompts):
        _check_ids(f"prompts[{index}]", prompt, vocab_size)
    _check_ids("eos_token_id", eos_ids, vocab_size)
    _check_ids("pad_token_id", [pad_token_id], vocab_size)
    longest = max(len(prompt) for prompt in prompts) + max_new_tokens
    if config is not None and longest > config.max_position_embeddings:
        raise ValueError(
            f"the longest prompt plus max_new_tokens is {longest} tokens, beyond the model's "
            f"max_position_embeddings {config.max_position_embeddings}"
        )

    device = next(model.parameters()).device
    batch = len(prompts)
    tokens = torch.full((batch, longest), pad_token_id, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = torch.as_tensor(prompt, dtype=torch.long)
    prompt_lengths = torch.tensor([len(prompt) for prompt in prompts], dtype=torch.long, device=device)
    stop_at = prompt_lengths + max_new_tokens  # per row: the first position it may not fill
    lengths = prompt_lengths.clone()
    is_end = torch.zeros(batch, dtype=torch.bool, device=device)
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    # Megatron's static KV cache: one slot per row and position. After the first
    # (causal) forward it attends without a mask, so every later forward feeds one token.
    context = StaticInferenceContext(max_batch_size=batch, max_sequence_length=longest)

    was_training = model.training
    model.eval()
    try:
        start, position = 0, int(prompt_lengths.min())
        while position < longest:
            # [B, 1, padded_vocab]: the cache context materializes the last position's logits only.
            logits = model(tokens[:, start:position], None, None, inference_context=context, runtime_gather_output=True)
            context.increment_sequence_len_offset(position - start)
            sampled = (position >= prompt_lengths) & (position < stop_at) & ~is_end  # rows drawing at `position`
            if sampled.any():
                last = mask_padded_vocab(logits[sampled, -1].float(), vocab_size)
                next_tokens = sample_next_token(
                    last, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy, generator=generator
                )
                next_tokens = _agree_across_tensor_parallel(next_tokens)
                tokens[sampled, position] = next_tokens
                lengths[sampled] = position + 1
                is_end[sampled] = torch.isin(next_tokens, eos)
            if bool((is_end | (stop_at <= position + 1)).all()):
                break
            start, position = position, position + 1
    finally:
        model.train(was_training)
    return GenerationOutput(
        tokens=tokens[:, : int(lengths.max())],
        prompt_lengths=prompt_lengths,
        lengths=lengths,
        is_end=is_end,
    )
