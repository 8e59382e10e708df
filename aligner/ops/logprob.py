"""Per-token log-probabilities and entropy of logits, from one read of the logits.

These are the Python faces of ``torch.ops.aligner.logprobs_entropy_forward``
and ``..._backward`` (csrc/cpu/logprob*.cpp, csrc/cuda/logprob.cu): typed
functions, fake kernels for ``torch.compile``, and autograd. The forward
never materializes a ``[N, V]`` tensor; the backward writes
``grad * (onehot - softmax)`` (plus the entropy term) in one pass from the
saved per-row log-sum-exp and entropy.

Backward contract relied on by :mod:`aligner.parallel.vocab_parallel`: the
backward op does not range-check labels. A label that is not ``ignore_index``
but lies outside ``[0, V)`` gets no one-hot term, only ``-g_lp * p`` (plus the
entropy term): exactly the gradient of a vocab shard that does not own the
label. ``tests/ops/test_logprob.py::test_backward_label_outside_shard`` pins it.
"""

from __future__ import annotations

import torch
from torch import Tensor

import aligner._C  # noqa: F401  (registers torch.ops.aligner)

# The label of a position that is not scored: its log-prob is 0 and it gets no gradient. The batch
# contract (aligner.data.collate) marks untrained positions with it.
IGNORE_INDEX = -100

logprobs_forward = torch.ops.aligner.logprobs_entropy_forward.default
"""``(logits, labels, temperature, ignore_index, with_logprobs, with_entropy) -> (logprobs, entropy, lse)``.

The forward op itself, for code that builds its own autograd on the per-row statistics (the
chunked and vocab-parallel heads: :mod:`aligner.ops.linear`, :mod:`aligner.parallel.vocab_parallel`).
Per row of ``[..., V]`` logits: ``log_softmax(logits / T)[label]`` (``[0]``-shaped unless
``with_logprobs``; ``labels`` may then be ``None``), the entropy (``[0]``-shaped unless
``with_entropy``) and the log-sum-exp of ``logits / T``; float32 (float64 for float64 logits).
Differentiable (its autograd is registered below; ``lse`` is not). ``V`` must be at least 1.
"""

logprobs_backward = torch.ops.aligner.logprobs_entropy_backward.default
"""``(grad_logprobs, grad_entropy, logits, labels, lse, entropy, temperature, ignore_index) -> grad_logits``.

The backward op: ``d loss / d logits`` (the logits' dtype and shape) recomputed from the
logits and the per-row statistics :data:`logprobs_forward` returned (``lse``, and ``entropy``
when ``grad_entropy`` is given; either upstream gradient may be ``None``). It does not
range-check labels: see the module docstring for what an out-of-range label gives.
"""


def _out_dtype(logits: Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


@torch.library.register_fake("aligner::logprobs_entropy_forward")
def _forward_fake(logits, labels, temperature, ignore_index, with_logprobs, with_entropy):
    shape = logits.shape[:-1]
    dtype = _out_dtype(logits)
    lse = logits.new_empty(shape, dtype=dtype)
    logprobs = logits.new_empty(shape if with_logprobs else (0,), dtype=dtype)
    entropy = logits.new_empty(shape if with_entropy else (0,), dtype=dtype)
    return logprobs, entropy, lse


@torch.library.register_fake("aligner::logprobs_entropy_backward")
def _backward_fake(grad_logprobs, grad_entropy, logits, labels, lse, entropy, temperature, ignore_index):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logits, labels, temperature, ignore_index, with_logprobs, with_entropy = inputs
    _, entropy, lse = output
    ctx.save_for_backward(logits, labels, lse, entropy if with_entropy else None)
    ctx.temperature = temperature
    ctx.ignore_index = ignore_index
    ctx.with_logprobs = with_logprobs
    ctx.with_entropy = with_entropy
    ctx.mark_non_differentiable(lse)


def _backward_fn(ctx, grad_logprobs, grad_entropy, grad_lse):
    logits, labels, lse, entropy = ctx.saved_tensors
    grad_logprobs = grad_logprobs if ctx.with_logprobs else None
    grad_entropy = grad_entropy if ctx.with_entropy else None
    if grad_logprobs is None and grad_entropy is None:
        return torch.zeros_like(logits), None, None, None, None, None
    grad = logprobs_backward(
        grad_logprobs, grad_entropy, logits, labels, lse, entropy, ctx.temperature, ctx.ignore_index
    )
    return grad, None, None, None, None, None


torch.library.register_autograd("aligner::logprobs_entropy_forward", _backward_fn, setup_context=_setup_context)


def check_labels_in_vocab(flat_labels: Tensor, vocab: int, ignore_index: int, vocab_source: str) -> None:
    """IndexError naming the first label outside ``[0, vocab)`` that is not ``ignore_index``.

    One reduction over the labels (one device sync on CUDA) buys a clear error
    instead of an out-of-bounds read; ``vocab_source`` says where ``vocab`` comes from.
    """
    bad = (flat_labels != ignore_index) & ((flat_labels < 0) | (flat_labels >= vocab))
    if torch.compiler.is_compiling():
        # No data-dependent branch inside a compiled graph: the same check, raised when the graph runs.
        message = f"labels: a value is outside [0, {vocab}) ({vocab_source}) and is not ignore_index={ignore_index}"
        torch._assert_async(~bad.any(), message)
        return
    if bad.any():
        position = int(bad.nonzero()[0, 0])
        raise IndexError(
            f"labels: value {int(flat_labels[position])} at flat position {position} is outside [0, {vocab}) "
            f"({vocab_source}) and is not ignore_index={ignore_index}"
        )


def check_tensor_args(op: str, optional: tuple[str, ...] = (), **arguments: Tensor | None) -> None:
    """Every argument is a tensor (or None, for the names in ``optional``), all on the first one's device.

    Checked in Python before the op runs: a list or a number would otherwise get the
    dispatcher's schema error, and a tensor on ``meta`` or another device beside
    CPU tensors would run the CPU kernel on memory it does not have.

    Raises:
        TypeError: an argument that is not a tensor (named).
        ValueError: tensors on different devices (named).
    """
    device = None
    first = None
    for name, value in arguments.items():
        if value is None and name in optional:
            continue
        if not isinstance(value, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
        if device is None:
            device, first = value.device, name
        elif value.device != device:
            raise ValueError(f"{op}: {name} is on {value.device} but {first} is on {device}; put them on one device")


def _check_labels(logits: Tensor, labels: Tensor, ignore_index: int) -> None:
    """The label range check of :func:`token_logprobs` for labels on a GPU.

    The CPU op checks its labels itself (a cheap reduction). The CUDA op does not
    (it would cost a device sync per call, and the result would have to leave the
    kernel as a C++ exception after device work): it gives NaN for an
    out-of-range label, and this check, done once here, raises IndexError instead.
    Malformed labels (dtype, shape, device) are left to the op, whose error names them.
    """
    if (
        labels.device.type not in ("cpu", "meta")
        and labels.dtype in (torch.int64, torch.int32)
        and logits.dim() >= 1
        and labels.shape == logits.shape[:-1]
        and labels.device == logits.device
        and labels.numel() > 0
    ):
        check_labels_in_vocab(
            labels.reshape(-1), logits.shape[-1], ignore_index, "the vocabulary size is logits.shape[-1]"
        )


def token_logprobs(
    logits: Tensor, labels: Tensor, *, temperature: float = 1.0, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """Log-probability of each label: ``log_softmax(logits / T, -1)[..., label]``.

    Args:
        logits: ``[..., V]`` float32, bfloat16, float16 (or float64) scores.
        labels: ``[...]`` int64/int32 token ids in ``[0, V)`` or ``ignore_index``.
        temperature: positive divisor applied to the logits.
        ignore_index: label value whose position gets log-prob 0 and zero gradient.

    Returns:
        ``[...]`` float32 (float64 for float64 logits). Differentiable w.r.t. ``logits``;
        the gradient comes back in the logits' dtype.

    Raises:
        TypeError: non-floating logits or non-integer labels.
        ValueError: labels not of shape ``logits.shape[:-1]``, temperature <= 0.
        IndexError: a label outside ``[0, V)`` that is not ``ignore_index``.
    """
    check_tensor_args("token_logprobs", logits=logits, labels=labels)
    _check_labels(logits, labels, ignore_index)
    logprobs, _, _ = logprobs_forward(logits, labels, float(temperature), int(ignore_index), True, False)
    return logprobs


def token_entropy(logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Entropy of each row's distribution: ``-sum_j p_j log p_j`` with ``p = softmax(logits / T)``.

    Zero-probability entries (``-inf`` logits) contribute 0. Returns ``[...]`` float32
    (float64 for float64 logits); differentiable w.r.t. ``logits``.
    """
    check_tensor_args("token_entropy", logits=logits)
    _, entropy, _ = logprobs_forward(logits, None, float(temperature), IGNORE_INDEX, False, True)
    return entropy


def token_logprobs_and_entropy(
    logits: Tensor, labels: Tensor, *, temperature: float = 1.0, ignore_index: int = IGNORE_INDEX
) -> tuple[Tensor, Tensor]:
    """``(token_logprobs(...), token_entropy(...))`` from a single pass over the logits.

    The entropy is computed for every row, ``ignore_index`` rows included, since it
    does not depend on the label. Both outputs are differentiable w.r.t. ``logits``.
    Raises as :func:`token_logprobs`.
    """
    check_tensor_args("token_logprobs_and_entropy", logits=logits, labels=labels)
    _check_labels(logits, labels, ignore_index)
    logprobs, entropy, _ = logprobs_forward(logits, labels, float(temperature), int(ignore_index), True, True)
    return logprobs, entropy
