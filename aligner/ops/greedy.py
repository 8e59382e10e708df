"""The greedy decoding step of a linear LM head, without the ``[N, V]`` logits.

    tokens, logprobs = linear_greedy(hidden, weight)   # argmax of hidden @ weight.T, and its log-softmax
    tokens, max_logit, lse = linear_argmax(hidden, weight)

A decode step of a few dozen rows against a large vocabulary spends most of its time in the
output layer, and the unfused step then passes over the ``[N, V]`` logits several times (argmax,
log-sum-exp, a copy to row order). On CPU with float32 inputs both functions run
``torch.ops.aligner.linear_argmax`` (csrc/cpu/linear_argmax*.cpp). It packs the few rows of
``hidden`` (transposed, ``[H, rows]``) and streams each weight row once through a register tile
(6 weight rows x 16 columns on AVX2), prefetching the next tile's rows, without the packing copy a
BLAS makes of the weight (for a few rows that copy costs about as much as the product). The
logits of each block of 64 vocabulary rows stay in cache while one pass moves every row's max,
first argmax and sum of ``exp(logit - max)`` forward; they are never stored. The vocabulary is
split into fixed chunks of 4096 rows (threads take whole chunks), merged with the same
softmax-statistics math as the log-prob kernels, so the result does not depend on the thread
count. On 2 Zen cores, 32 rows against a ``[32768, 256]`` weight take ~5-7 ms where the logits,
argmax and ``log_softmax`` take ~20 ms (bench/RESULTS.md).

Elsewhere (CUDA, bfloat16 / float16 / float64 inputs) they compose torch ops: ``F.linear``,
``argmax`` over the logits in the input dtype and a float32 (float64 for float64 inputs)
log-sum-exp, the step the engines ran before; on a GPU the output layer is cuBLAS's.

Each logit is one dot product summed in float32 in order of the hidden index (BLAS blocks the
sum differently), so a near-tie can differ from ``(hidden @ weight.T).argmax(-1)`` in the last
bit; ties in the computed logits go to the first index, as ``torch.argmax``; a NaN logit wins
(its first occurrence), as in ``torch.argmax``, and makes the row's log-sum-exp NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

import aligner._C  # noqa: F401  (registers torch.ops.aligner)
from aligner.ops.logprob import check_tensor_args

_fused = torch.ops.aligner.linear_argmax.default


@torch.library.register_fake("aligner::linear_argmax")
def _fused_fake(hidden, weight):
    rows = hidden.shape[0]
    return (
        hidden.new_empty(rows, dtype=torch.int64),
        hidden.new_empty(rows, dtype=torch.float32),
        hidden.new_empty(rows, dtype=torch.float32),
    )


def _check(hidden: Tensor, weight: Tensor) -> None:
    check_tensor_args("linear_argmax", hidden=hidden, weight=weight)
    if not hidden.is_floating_point():
        raise TypeError(f"hidden must be a floating-point tensor, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
    if weight.dim() != 2 or weight.shape[0] < 1:
        raise ValueError(f"weight must be [vocab, hidden] with at least one row, got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden must have shape [..., {weight.shape[1]}] (weight.shape[1]), got {tuple(hidden.shape)}"
        )


def uses_fused_kernel(hidden: Tensor) -> bool:
    """Whether :func:`linear_argmax` runs the fused CPU kernel for ``hidden`` (a weight of its dtype and device)."""
    return hidden.device.type == "cpu" and hidden.dtype == torch.float32


def linear_argmax(hidden: Tensor, weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per row of ``logits = hidden @ weight.T``: the argmax, the max logit and the log-sum-exp.

    Args:
        hidden: ``[..., H]`` floating hidden states (the final-normed output of the last layer).
        weight: ``[V, H]`` output-layer weight of ``hidden``'s dtype and device; a row slice such as
            ``weight[:vocab_size]`` (dropping padding rows) is read in place.

    Returns:
        ``(tokens, max_logit, lse)``, each of shape ``hidden.shape[:-1]``: int64 token ids (the first
        of tied maxima), float32 max logit and float32 log-sum-exp (float64 both for float64 inputs).

    Raises:
        TypeError: a non-tensor argument, non-floating ``hidden``, ``weight`` of another dtype.
        ValueError: mismatched shapes or devices, an empty vocabulary.
    """
    _check(hidden, weight)
    shape = hidden.shape[:-1]
    flat = hidden.reshape(shape.numel(), hidden.shape[-1])
    if uses_fused_kernel(hidden):
        tokens, best, lse = _fused(flat.contiguous(), weight)
    else:
        logits = F.linear(flat, weight)
        tokens = logits.argmax(dim=-1)
        scores = logits.double() if logits.dtype == torch.float64 else logits.float()
        best = scores.gather(-1, tokens[:, None]).squeeze(-1)
        lse = scores.logsumexp(dim=-1)
    return tokens.view(shape), best.view(shape), lse.view(shape)


def linear_greedy(hidden: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """The greedy token of each row of ``hidden @ weight.T`` and its log-prob (``log_softmax`` at the token).

    Arguments and errors: see :func:`linear_argmax`.

    Returns:
        ``(tokens, logprobs)``: int64 and float32 (float64 for float64 inputs), of shape ``hidden.shape[:-1]``.
    """
    tokens, best, lse = linear_argmax(hidden, weight)
    return tokens, best - lse
