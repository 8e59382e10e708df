"""Drawing the next token from logits, and its log-prob exactly as drawn: pure functions over tensors.

    z = filtered_logits(logits, temperature=0.7, top_p=0.9)          # [B, V], -inf where filtered out
    tokens, logprobs = sample_with_logprobs(logits, temperature=0.7, top_p=0.9, generator=gen)

The log-prob an engine reports must be the one of the distribution it drew
from: after temperature, top-k and top-p (a pre-temperature log-prob gives an
importance ratio far from 1, TRL #4159).
"""

from __future__ import annotations

import torch
from torch import Tensor

from aligner.generation.base import SamplingParams
from aligner.ops.logprob import token_logprobs


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


def filtered_logits(logits: Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """The logits the next token is drawn from: tempered, with the filtered-out tokens at ``-inf``.

    In that order (as Hugging Face's samplers do): ``z = logits / temperature``;
    top-k keeps the tokens whose ``z`` is at least the ``k``-th largest (ties at
    the boundary are kept); top-p (nucleus) then keeps, in decreasing order of
    probability, every token whose preceding mass is below ``top_p``, so the
    most likely token always survives.

    Args:
        logits: ``[B, V]`` float logits (padding columns already at the dtype's lowest value).
        temperature: ``> 0`` divisor.
        top_k: keep the ``top_k`` most likely tokens; 0 keeps all.
        top_p: keep the smallest prefix of the sorted distribution reaching ``top_p``; 1 keeps all.

    Returns:
        ``[B, V]`` float32: ``softmax`` of it is the sampling distribution, ``log_softmax`` its log.

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
    return scaled


def sampling_probs(logits: Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """``[B, V]`` float32 probabilities the next token is drawn from: ``softmax(filtered_logits(...))``.

    Removed tokens get probability 0; each row sums to 1. Arguments and errors: see :func:`filtered_logits`.
    """
    return filtered_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p).softmax(dim=-1)


DRAW_BLOCK = 256  # entries per block of draw()'s first level


def draw(probs: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """One index per row of ``probs`` ``[B, V]`` (non-negative, positive row sums), drawn with chance ``p_i / sum(p)``.

    Inverse-CDF sampling on two levels: a block of :data:`DRAW_BLOCK` entries by the blocks'
    masses, then an entry of that block by its share, each over a float64 running sum with one
    float64 uniform. Every entry's chance is then its share to the float32 precision of the entry
    itself, tiny ones included (one float32 running sum over a 32k vocabulary would round a share
    below ~6e-8 to 0 or double it), and an entry of 0 is never drawn. It needs two uniforms per
    row, where ``torch.multinomial`` draws an exponential per entry: ~1 ms against ~25 ms for
    32 x 32768 on 2 CPU threads.

    Args:
        probs: ``[B, V]`` float weights.
        generator: the random stream (on ``probs``' device); None: torch's default.

    Returns:
        ``[B]`` int64 indices.
    """
    rows, vocab = probs.shape
    if vocab % DRAW_BLOCK:
        probs = torch.nn.functional.pad(probs, (0, DRAW_BLOCK - vocab % DRAW_BLOCK))  # zeros: never drawn
    blocks = probs.view(rows, -1, DRAW_BLOCK)
    uniforms = torch.rand(rows, 2, generator=generator, dtype=torch.float64, device=probs.device)
    block = _inverse_cdf(blocks.sum(dim=-1, dtype=torch.float64), uniforms[:, 0])
    entries = blocks[torch.arange(rows, device=probs.device), block].double()  # [B, DRAW_BLOCK]
    return block * DRAW_BLOCK + _inverse_cdf(entries, uniforms[:, 1])


def _inverse_cdf(weights: Tensor, uniforms: Tensor) -> Tensor:
    """Per row of ``weights`` ``[B, n]`` (float64, non-negative, positive sums): the entry whose interval
    of the running sum holds ``uniform * sum``; an entry of weight 0 has an empty interval."""
    cumulative = weights.cumsum(dim=-1)
    index = torch.searchsorted(cumulative, (uniforms * cumulative[:, -1])[:, None], right=True).squeeze(1)
    # uniform < 1, so the target lies below the sum, unless rounding lifts it there: take the last entry
    # with weight then
    last = weights.shape[1] - 1 - (weights > 0).flip(-1).to(torch.uint8).argmax(dim=-1)
    return torch.minimum(index, last)


def sample_with_logprobs(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """One token per row and its log-prob as drawn.

    Sampling: ``token ~ softmax(z)`` with ``z = filtered_logits(logits, ...)``
    (:func:`draw` with ``generator``, so a generator in a known state
    gives a known token) and ``logprob = log_softmax(z)[token]``.
    Greedy: ``token = argmax(logits)`` (the first of tied maxima) and
    ``logprob = log_softmax(logits)[token]``, the log-prob under the model at
    temperature 1 with nothing filtered (a point mass would always say 0).

    Args:
        logits: ``[B, V]`` float logits.
        temperature, top_k, top_p: see :func:`filtered_logits` (ignored when ``greedy``).
        greedy: take the most likely token.
        generator: the random stream to draw from (on the logits' device); None: torch's default.

    Returns:
        ``([B] int64 tokens, [B] float32 log-probs)``.

    Raises:
        ValueError: see :func:`filtered_logits`.
    """
    _check_logits(logits)
    if greedy:
        scores = logits.float()
        tokens = scores.argmax(dim=-1)
    else:
        scores = filtered_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
        tokens = draw(scores.softmax(dim=-1), generator=generator)
    # One pass over each row (aligner's op), not a [B, V] log_softmax: the engine calls this every step.
    return tokens, token_logprobs(scores, tokens)


def sample_as(
    logits: Tensor, sampling: SamplingParams, *, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """:func:`sample_with_logprobs` with the temperature, top-k, top-p and greedy of ``sampling``.

    Returns:
        ``([B] int64 tokens, [B] float32 log-probs as drawn)``.
    """
    return sample_with_logprobs(
        logits,
        temperature=sampling.temperature,
        top_k=sampling.top_k,
        top_p=sampling.top_p,
        greedy=sampling.greedy,
        generator=generator,
    )
