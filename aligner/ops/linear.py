"""Per-token log-probabilities (and entropy) of a linear LM head, without the ``[N, V]`` logits.

``linear_token_logprobs(hidden, weight, labels)`` equals
``token_logprobs(hidden @ weight.T, labels)`` but walks the rows in chunks:

- forward: for each chunk of rows, ``logits = hidden[chunk] @ weight.T``
  (``[chunk, V]``, in the input dtype, like ``nn.Linear``), then one read of
  those logits by the log-prob kernel; only per-row statistics survive the
  chunk (log-prob, log-sum-exp, entropy: a few floats per token);
- backward: each chunk's logits are recomputed, the kernel backward turns them
  into ``g = d loss / d logits`` from the saved per-row statistics, and
  ``grad_hidden[chunk] = g @ weight``, ``grad_weight += g.T @ hidden[chunk]``.

So the largest temporaries are one chunk of logits and its gradient, sized by
:func:`default_chunk_size`; the price is recomputing the logits matmul in the
backward: 4 matmuls for forward + backward where the unfused path does 3.

On a GPU, bf16/fp16 inputs with ``H % 8 == 0`` can take a fused forward instead
(``impl="cutlass"``; ``torch.ops.aligner.linear_logprobs_forward``, csrc/cuda/linear_logprob.cu): a
CuTe tensor-core GEMM whose epilogue reduces each 128 x 128 tile of logits to
per-row softmax statistics in registers, so the logits never reach memory, not
even a chunk of them; a small kernel merges the tiles of each row. It rounds each
logit to the input dtype first, as ``F.linear`` returns it, so both forwards
compute the same function and save the same per-row statistics, which match the
logits the shared backward recomputes. It is opt-in: on an H100 its SM80-style
(mma.sync) GEMM is slower than cuBLAS's Hopper GEMM followed by the row kernel
(bench/RESULTS.md), so ``impl="auto"`` takes the chunked path.

The chunk iteration and the gradient accumulation are shared with the
vocab-parallel variant in :mod:`aligner.parallel.vocab_parallel`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

import aligner._C
from aligner.ops.logprob import (
    IGNORE_INDEX,
    check_labels_in_vocab,
    check_tensor_args,
    logprobs_backward,
    logprobs_forward,
)

# Rows per chunk: enough that one chunk of float32 logits (rows x V x 4 bytes)
# takes about DEFAULT_CHUNK_BYTES, but never fewer than MIN_CHUNK_ROWS. Below a
# few hundred rows the matmul loses its efficiency: each chunk re-reads the whole
# weight (on an H100 a bf16 chunk needs ~300 rows to be compute-bound), and a
# 2-core CPU does 119 GFLOP/s at 130 rows against 153 at 520 (H=1024, V=128256).
# So a chunk is 64 MiB up to V = 32768 and 512 x V x 4 bytes beyond (250 MiB at
# V = 128256): independent of the number of tokens either way.
DEFAULT_CHUNK_BYTES = 64 * 2**20
MIN_CHUNK_ROWS = 512
_HALF_DTYPES = (torch.bfloat16, torch.float16)
_HAS_CUDA_KERNELS = aligner._C.build_info()["has_cuda_kernels"]
# The CUTLASS forward cp.asyncs 16-byte vectors of hidden and weight rows.
CUTLASS_HIDDEN_MULTIPLE = 8

_fused_forward = torch.ops.aligner.linear_logprobs_forward.default


@torch.library.register_fake("aligner::linear_logprobs_forward")
def _fused_forward_fake(hidden, weight, labels, temperature, ignore_index, with_entropy):
    rows = hidden.shape[0]
    logprobs = hidden.new_empty(rows, dtype=torch.float32)
    entropy = hidden.new_empty(rows if with_entropy else 0, dtype=torch.float32)
    return logprobs, entropy, hidden.new_empty(rows, dtype=torch.float32)


def cutlass_unavailable_reason(hidden: Tensor) -> str | None:
    """Why the fused CUTLASS forward cannot take ``hidden`` (and a weight of its dtype and device), or None."""
    if not _HAS_CUDA_KERNELS:
        return "aligner was built without CUDA kernels"
    if not hidden.is_cuda:
        return f"hidden is on {hidden.device}, not a CUDA device"
    if hidden.dtype not in _HALF_DTYPES:
        return f"hidden is {hidden.dtype}, not bfloat16 or float16"
    if hidden.shape[-1] % CUTLASS_HIDDEN_MULTIPLE:
        return f"the hidden size {hidden.shape[-1]} is not a multiple of {CUTLASS_HIDDEN_MULTIPLE}"
    return None


def _use_fused_forward(impl: str, hidden: Tensor) -> bool:
    """Whether ``linear_token_logprobs(..., impl=impl)`` runs the fused CUTLASS forward on ``hidden``."""
    if impl not in ("auto", "cutlass", "chunked"):
        raise ValueError(f"impl must be 'auto', 'cutlass' or 'chunked', got {impl!r}")
    if impl != "cutlass":
        # "auto" is the chunked cuBLAS path: measured on an H100 (bench/RESULTS.md), the fused
        # kernel's mma.sync GEMM reaches ~190 TFLOP/s where cuBLAS reaches ~700, so it is 0.52x
        # the chunked forward at V=128256 (1.05x at V=32768). It saves memory, not time, for now.
        return False
    reason = cutlass_unavailable_reason(hidden)
    if reason is not None:
        raise ValueError(f"impl='cutlass' does not apply: {reason}; use impl='auto' or 'chunked'")
    return True


def default_chunk_size(vocab: int) -> int:
    """Rows per chunk: ``max(MIN_CHUNK_ROWS, DEFAULT_CHUNK_BYTES // (4 * vocab))``."""
    return max(MIN_CHUNK_ROWS, DEFAULT_CHUNK_BYTES // (4 * max(vocab, 1)))


def check_linear_args(
    hidden: Tensor, weight: Tensor, labels: Tensor, chunk_size: int | None, *, allow_empty_vocab: bool = False
) -> None:
    """Shape, dtype and device checks shared by the single-rank and vocab-parallel linear heads.

    ``allow_empty_vocab``: accept a ``[0, H]`` weight (a vocab-parallel shard that holds only
    padding rows, sliced off); a single-rank head needs at least one row.
    """
    if not hidden.is_floating_point():
        raise TypeError(f"hidden must be a floating-point tensor, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be an int64 or int32 tensor, got {labels.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [vocab, hidden], got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden must have shape [..., {weight.shape[1]}] (weight.shape[1]), got {tuple(hidden.shape)}"
        )
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"labels must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, got {tuple(labels.shape)}"
        )
    if weight.device != hidden.device or labels.device != hidden.device:
        raise ValueError(
            f"weight and labels must be on the device of hidden ({hidden.device}), got {weight.device} and "
            f"{labels.device}"
        )
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if weight.shape[0] < 1 and not allow_empty_vocab:
        raise ValueError("weight must have at least one vocabulary row")


def check_temperature(temperature: float) -> None:
    """ValueError unless ``temperature`` is a positive finite number."""
    if not (temperature > 0 and temperature != float("inf")):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")


def row_chunks(rows: int, chunk_size: int) -> Iterator[slice]:
    """Consecutive slices of ``chunk_size`` rows (the last one shorter) covering ``range(rows)``.

    A loop variable keeps its tensor alive while the next iteration computes the next
    one, so callers drop each chunk's logits (and their gradient) at the end of the
    loop body: at most one chunk of each is ever held.
    """
    for start in range(0, rows, chunk_size):
        yield slice(start, min(start + chunk_size, rows))


def linear_backward_chunks(
    hidden: Tensor,
    weight: Tensor,
    chunk_size: int,
    grad_of_logits: Callable[[slice, Tensor], Tensor],
    need_hidden: bool,
    need_weight: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of a loss of ``hidden @ weight.T`` given ``grad_of_logits(rows, logits) -> g``, chunk by chunk.

    ``hidden`` is ``[N, H]``, ``weight`` ``[V, H]``; returns ``(grad_hidden, grad_weight)``
    (``None`` where not needed). A bf16/fp16 ``grad_weight`` is summed over chunks in
    float32 and rounded to the weight's dtype once at the end. On the CPU each chunk's
    ``g.T @ hidden`` is also formed in float32 (an in-place ``addmm_``, which there is
    faster than the half-precision product), so the result rounds exactly once, as one
    unchunked matmul does. On CUDA the product stays on the half-precision tensor cores
    and each chunk's ``[V, H]`` partial is rounded before the float32 sum: a float32
    product would run on the far slower float32 units, and PyTorch's fp32-output
    half-precision GEMM is not available in every release we support.

    A ``[0, H]`` weight (an empty vocab-parallel shard) has no logits: ``grad_of_logits`` is
    never called, ``grad_hidden`` is zero and ``grad_weight`` is ``[0, H]``.
    """
    grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_hidden else None
    grad_weight = None
    if need_weight:
        accumulate_dtype = torch.float32 if weight.dtype in _HALF_DTYPES else weight.dtype
        grad_weight = torch.zeros(weight.shape, dtype=accumulate_dtype, device=weight.device)
    if not (need_hidden or need_weight):
        return None, None
    if weight.shape[0] == 0:  # no columns, no logits: the kernel needs at least one
        if grad_hidden is not None:
            grad_hidden.zero_()
        return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype)
    for rows in row_chunks(hidden.shape[0], chunk_size):
        grad_logits = grad_of_logits(rows, F.linear(hidden[rows], weight))  # [chunk, V], in the logits' dtype
        if grad_hidden is not None:
            torch.matmul(grad_logits, weight, out=grad_hidden[rows])
        if grad_weight is not None:
            if grad_weight.is_cuda and grad_weight.dtype != weight.dtype:  # half-precision tensor-core product
                grad_weight += grad_logits.T @ hidden[rows]
            else:  # the product formed in the accumulator's dtype
                grad_weight.addmm_(grad_logits.T.to(grad_weight.dtype), hidden[rows].to(grad_weight.dtype))
        del grad_logits  # before the next chunk's logits exist
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    return grad_hidden, grad_weight


def _chunked_forward(hidden, weight, labels, temperature, ignore_index, chunk_size, with_entropy):
    """(logprobs, entropy, lse) from one chunk of logits at a time: ``F.linear`` then the log-prob kernel."""
    rows = hidden.shape[0]
    out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logprobs = hidden.new_empty(rows, dtype=out_dtype)
    lse = hidden.new_empty(rows, dtype=out_dtype)
    entropy = hidden.new_empty(rows if with_entropy else 0, dtype=out_dtype)
    # The labels were checked once up front; handing them to the kernel would
    # check them again per chunk (a device sync each), so the label's logit is
    # gathered here and scaled as the kernel scales it.
    ignored = labels == ignore_index
    gather_index = torch.where(ignored, 0, labels).unsqueeze(-1)
    for chunk in row_chunks(rows, chunk_size):
        logits = F.linear(hidden[chunk], weight)  # [chunk, V]
        _, ent, chunk_lse = logprobs_forward(logits, None, temperature, ignore_index, False, with_entropy)
        label_logit = logits.gather(-1, gather_index[chunk]).squeeze(-1).to(out_dtype)
        del logits  # before the next chunk's logits exist
        logprobs[chunk] = label_logit * (1.0 / temperature) - chunk_lse
        lse[chunk] = chunk_lse
        if with_entropy:
            entropy[chunk] = ent
    logprobs.masked_fill_(ignored, 0.0)
    return logprobs, entropy, lse


class _LinearTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, ignore_index, chunk_size, with_entropy, fused):
        if fused:
            logprobs, entropy, lse = _fused_forward(hidden, weight, labels, temperature, ignore_index, with_entropy)
        else:
            logprobs, entropy, lse = _chunked_forward(
                hidden, weight, labels, temperature, ignore_index, chunk_size, with_entropy
            )
        ctx.save_for_backward(hidden, weight, labels, lse, entropy)
        ctx.temperature = temperature
        ctx.ignore_index = ignore_index
        ctx.chunk_size = chunk_size
        ctx.with_entropy = with_entropy
        ctx.set_materialize_grads(False)
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, labels, lse, entropy = ctx.saved_tensors
        if not ctx.with_entropy:
            grad_entropy = None
        if grad_logprobs is None and grad_entropy is None:
            return None, None, None, None, None, None, None, None

        def grad_of_logits(rows: slice, logits: Tensor) -> Tensor:
            return logprobs_backward(
                None if grad_logprobs is None else grad_logprobs[rows],
                None if grad_entropy is None else grad_entropy[rows],
                logits,
                None if grad_logprobs is None else labels[rows],
                lse[rows],
                None if grad_entropy is None else entropy[rows],
                ctx.temperature,
                ctx.ignore_index,
            )

        grad_hidden, grad_weight = linear_backward_chunks(
            hidden, weight, ctx.chunk_size, grad_of_logits, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        )
        return grad_hidden, grad_weight, None, None, None, None, None, None


def linear_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None,
    return_entropy: bool = False,
    impl: Literal["auto", "cutlass", "chunked"] = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """``token_logprobs(hidden @ weight.T, labels)`` without ever holding the ``[N, V]`` logits.

    Rows are processed ``chunk_size`` at a time; the default (:func:`default_chunk_size`)
    holds one chunk of float32-sized logits of 64 MiB, or of 512 rows when the
    vocabulary is larger than 32768. The matmul runs in the input dtype (as ``nn.Linear``); the
    softmax statistics in float32. ``impl="cutlass"`` (a GPU, bf16/fp16 inputs, ``H % 8 == 0``)
    runs the forward as the fused CUTLASS kernel instead (the same values, without a chunk of
    logits in memory; ``chunk_size`` then applies to the backward only).

    Args:
        hidden: ``[..., H]`` float32, bfloat16, float16 or float64 hidden states.
        weight: ``[V, H]`` output-layer weight (``nn.Linear(H, V).weight``), dtype of ``hidden``.
        labels: ``[...]`` int64/int32 token ids in ``[0, V)`` or ``ignore_index``.
        temperature: positive divisor applied to the logits.
        ignore_index: label value whose position gets log-prob 0 and zero gradient.
        chunk_size: rows per chunk; ``None`` chooses it from the memory budget.
        return_entropy: also return the entropy of every row (``ignore_index`` rows included).
        impl: forward implementation: ``"auto"`` (currently the chunked path everywhere: it is the
            faster one on an H100), ``"cutlass"`` (the fused kernel or an error) or ``"chunked"``.

    Returns:
        ``[...]`` float32 log-probs (float64 for float64 inputs), or ``(logprobs, entropy)``
        when ``return_entropy``. Differentiable w.r.t. ``hidden`` and ``weight``.

    Raises:
        TypeError: non-floating ``hidden``, ``weight`` of another dtype, non-integer labels.
        ValueError: mismatched shapes or devices, ``temperature <= 0``, bad ``chunk_size``, an unknown
            ``impl``, or ``impl="cutlass"`` where the fused kernel does not apply.
        IndexError: a label outside ``[0, V)`` that is not ``ignore_index``.
    """
    check_tensor_args("linear_token_logprobs", hidden=hidden, weight=weight, labels=labels)
    check_linear_args(hidden, weight, labels, chunk_size)
    check_temperature(temperature)
    fused = _use_fused_forward(impl, hidden)
    vocab = weight.shape[0]
    flat_labels = labels.reshape(-1).long()
    check_labels_in_vocab(flat_labels, vocab, ignore_index, "the vocabulary size is weight.shape[0]")
    chunk = chunk_size if chunk_size is not None else default_chunk_size(vocab)
    logprobs, entropy = _LinearTokenLogprobs.apply(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        flat_labels,
        float(temperature),
        int(ignore_index),
        chunk,
        return_entropy,
        fused,
    )
    logprobs = logprobs.view(labels.shape)
    return (logprobs, entropy.view(labels.shape)) if return_entropy else logprobs
