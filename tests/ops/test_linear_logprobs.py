"""linear_token_logprobs against hidden @ W.T + token_logprobs and a float64 reference."""

import pytest
import torch

from aligner import ops
from aligner.ops.linear import (
    DEFAULT_CHUNK_BYTES,
    MIN_CHUNK_ROWS,
    default_chunk_size,
    linear_backward_chunks,
    linear_token_logprobs,
)

HIDDEN = 16
VOCAB = 53  # odd, so nothing lines up with the kernels' vector width
IGNORE = -100
# fp32: chunked and unchunked matmuls may sum in another order: ~170 ulps of the largest
# element (log-probs are O(10), weight gradients sum over every row).
FP32_REL = 2e-5
# flash-attention's rule: at most twice the error plain PyTorch makes in the same dtype
# (against float64), plus a floor for elements where PyTorch happens to be exact.
ERROR_FACTOR = 2.0
ERROR_FLOOR = {torch.float32: 1e-6, torch.bfloat16: 2**-10}


def _assert_close_fp32(actual, expected, msg=None):
    scale = max(1.0, expected.double().abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=0, atol=FP32_REL * scale, msg=msg)


def _inputs(rows_shape, dtype, vocab=VOCAB, hidden=HIDDEN):
    hidden_states = torch.randn(*rows_shape, hidden).to(dtype)
    weight = (torch.randn(vocab, hidden) / hidden**0.5 * 3).to(dtype)
    labels = torch.randint(0, vocab, rows_shape)
    labels.view(-1)[:: max(1, labels.numel() // 3)] = IGNORE
    return hidden_states, weight, labels


def _upstream(rows_shape):
    return torch.randn(rows_shape), torch.randn(rows_shape)


def _fused(hidden, weight, labels, temperature, chunk_size, grads):
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logprobs, entropy = linear_token_logprobs(
        hidden, weight, labels, temperature=temperature, chunk_size=chunk_size, return_entropy=True
    )
    loss = (logprobs * grads[0]).sum() + (entropy * grads[1]).sum()
    return (logprobs.detach(), entropy.detach(), *torch.autograd.grad(loss, (hidden, weight)))


def _unfused(hidden, weight, labels, temperature, grads):
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logprobs, entropy = ops.token_logprobs_and_entropy(hidden @ weight.T, labels, temperature=temperature)
    loss = (logprobs * grads[0]).sum() + (entropy * grads[1]).sum()
    return (logprobs.detach(), entropy.detach(), *torch.autograd.grad(loss, (hidden, weight)))


def _float64_reference(hidden, weight, labels, temperature, grads):
    """log_softmax over the whole vocabulary in float64, written independently of aligner."""
    hidden = hidden.double().requires_grad_()
    weight = weight.double().requires_grad_()
    log_probs = torch.log_softmax(hidden @ weight.T / temperature, dim=-1)
    keep = labels != IGNORE
    picked = log_probs.gather(-1, torch.where(keep, labels, 0).unsqueeze(-1)).squeeze(-1)
    logprobs = torch.where(keep, picked, 0.0)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    loss = (logprobs * grads[0].double()).sum() + (entropy * grads[1].double()).sum()
    return (logprobs.detach(), entropy.detach(), *torch.autograd.grad(loss, (hidden, weight)))


NAMES = ("logprobs", "entropy", "grad_hidden", "grad_weight")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    ("rows_shape", "chunk_size"),
    [((1,), None), ((1,), 1), ((37,), None), ((37,), 1), ((37,), 5), ((37,), 64), ((2, 9), 4)],
    ids=lambda value: "x".join(map(str, value)) if isinstance(value, tuple) else f"chunk={value}",
)
def test_matches_matmul_then_token_logprobs(dtype, rows_shape, chunk_size):
    hidden, weight, labels = _inputs(rows_shape, dtype)
    grads = _upstream(rows_shape)
    temperature = 0.8
    fused = _fused(hidden, weight, labels, temperature, chunk_size, grads)
    unfused = _unfused(hidden, weight, labels, temperature, grads)
    reference = _float64_reference(hidden, weight, labels, temperature, grads)
    for name, got, same_dtype, exact in zip(NAMES, fused, unfused, reference, strict=True):
        assert got.shape == same_dtype.shape, name
        assert got.dtype == same_dtype.dtype, name
        if dtype == torch.float32:
            _assert_close_fp32(got, same_dtype, msg=name)
        # Error against float64 within ERROR_FACTOR of the unfused path's own error.
        our_error = (got.double() - exact).abs()
        torch_error = (same_dtype.double() - exact).abs()
        allowed = ERROR_FACTOR * torch_error.max() + ERROR_FLOOR[dtype] * exact.abs().max().clamp(min=1)
        assert our_error.max() <= allowed, (name, our_error.max().item(), torch_error.max().item())


def _ulp(values: torch.Tensor) -> torch.Tensor:
    """The distance from each value's magnitude to the next number of its dtype, in float64."""
    magnitude = values.abs()
    return (torch.nextafter(magnitude, torch.full_like(magnitude, float("inf"))) - magnitude).double()


def test_bf16_weight_grad_rounds_once_whatever_the_chunking():
    """On the CPU every chunk's ``g.T @ hidden`` is summed in float32 and rounded once.

    Small integers (times a power of two) make every logit exact in bf16 at any
    chunking, so one row per chunk and one chunk for all rows see the same logits and
    the same per-row ``g``; what is left is the weight-gradient sum. Summed in float32
    and rounded once, the two agree to within one bf16 ulp of each element (the float32
    sums may differ in their last bits and a value at a rounding midpoint then lands on
    either side; a floor of 1/128 ulp of the largest element covers sums that cancel to
    almost zero). Measured: bitwise equal over 3000 seeds. Rounding each chunk's
    product to bf16 before the sum put up to 49 ulps between them and failed every seed.
    """
    rows = 64
    hidden = torch.randint(-3, 4, (rows, HIDDEN)).to(torch.bfloat16)
    weight = (torch.randint(-2, 3, (VOCAB, HIDDEN)) * 0.25).to(torch.bfloat16)
    labels = torch.randint(0, VOCAB, (rows,))
    upstream = torch.randn(rows)
    grads = []
    for chunk_size in (1, None):
        weight_leaf = weight.clone().requires_grad_()
        logprobs = linear_token_logprobs(hidden, weight_leaf, labels, chunk_size=chunk_size)
        (grad,) = torch.autograd.grad((logprobs * upstream).sum(), weight_leaf)
        grads.append(grad)
    one_chunk = grads[1]
    allowed = torch.maximum(_ulp(one_chunk), _ulp(one_chunk.abs().max()) / 128)
    assert torch.all((grads[0].double() - one_chunk.double()).abs() <= allowed)


def test_chunked_impl_is_the_cpu_path():
    hidden, weight, labels = _inputs((23,), torch.bfloat16)
    auto = linear_token_logprobs(hidden, weight, labels, chunk_size=6)
    assert torch.equal(auto, linear_token_logprobs(hidden, weight, labels, chunk_size=6, impl="chunked"))


def test_logprobs_alone_and_ignored_rows():
    hidden, weight, labels = _inputs((23,), torch.float32)
    logprobs = linear_token_logprobs(hidden, weight, labels, chunk_size=6)
    assert logprobs.shape == labels.shape
    assert torch.all(logprobs[labels == IGNORE] == 0)
    expected = ops.token_logprobs(hidden @ weight.T, labels)
    _assert_close_fp32(logprobs, expected)


def test_gradcheck_float64():
    hidden, weight, labels = _inputs((7,), torch.float64, vocab=9, hidden=4)
    hidden.requires_grad_()
    weight.requires_grad_()

    def both(h, w):
        return linear_token_logprobs(h, w, labels, temperature=1.3, chunk_size=3, return_entropy=True)

    assert torch.autograd.gradcheck(both, (hidden, weight))


def test_only_the_inputs_that_need_grad_get_one():
    hidden, weight, labels = _inputs((11,), torch.float32)
    hidden.requires_grad_()
    linear_token_logprobs(hidden, weight, labels, chunk_size=4).sum().backward()
    assert hidden.grad is not None and weight.grad is None
    hidden = hidden.detach()
    weight.requires_grad_()
    logprobs, entropy = linear_token_logprobs(hidden, weight, labels, chunk_size=4, return_entropy=True)
    entropy.sum().backward()  # the log-probs take no part in the loss
    expected = torch.autograd.grad(ops.token_entropy(hidden @ weight.T).sum(), weight)[0]
    _assert_close_fp32(weight.grad, expected)


def test_zero_rows():
    hidden, weight, labels = _inputs((0,), torch.float32)
    hidden.requires_grad_()
    logprobs, entropy = linear_token_logprobs(hidden, weight, labels, return_entropy=True)
    assert logprobs.shape == entropy.shape == (0,)
    (logprobs.sum() + entropy.sum()).backward()
    assert hidden.grad.shape == hidden.shape


def test_empty_weight():
    """A [0, H] weight: the single-rank head refuses it (no distribution to normalize); the shared
    backward helper, which an empty vocab-parallel shard reaches, returns zero / empty gradients
    without forming any logits (the kernels need at least one column)."""
    hidden = torch.randn(5, HIDDEN)
    empty = torch.empty(0, HIDDEN)
    with pytest.raises(ValueError, match="at least one vocabulary row"):
        linear_token_logprobs(hidden, empty, torch.full((5,), IGNORE))

    def no_logits(rows, logits):
        raise AssertionError("grad_of_logits called for an empty weight")

    grad_hidden, grad_weight = linear_backward_chunks(hidden, empty, 2, no_logits, True, True)
    assert torch.equal(grad_hidden, torch.zeros_like(hidden))
    assert grad_weight.shape == (0, HIDDEN) and grad_weight.dtype == empty.dtype
    half = empty.to(torch.bfloat16)
    _, grad_half = linear_backward_chunks(hidden.to(torch.bfloat16), half, 2, no_logits, False, True)
    assert grad_half.shape == (0, HIDDEN) and grad_half.dtype == torch.bfloat16


def test_default_chunk_is_a_byte_budget_with_a_row_floor():
    for vocab in (4096, 32000, 32768):
        rows = default_chunk_size(vocab)
        assert rows * vocab * 4 <= DEFAULT_CHUNK_BYTES < (rows + 1) * vocab * 4
    assert default_chunk_size(128256) == default_chunk_size(10**9) == MIN_CHUNK_ROWS


def _peak_allocated_bytes(fn):
    """Peak bytes held by c10's CPU allocator during fn(), above what was held before (as bench/harness.py)."""
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
    with profiler:
        fn()
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in profiler.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == torch._C._autograd.DeviceType.CPU
    )
    held = peak = 0
    for _, nbytes in events:  # frees carry negative sizes
        held += nbytes
        peak = max(peak, held)
    return peak


def test_never_holds_the_full_logits():
    rows, vocab, chunk = 512, 4096, 16
    hidden, weight, labels = _inputs((rows,), torch.float32, vocab=vocab, hidden=32)
    full_logits = rows * vocab * 4  # 8 MiB
    one_chunk = chunk * vocab * 4  # 256 KiB
    hidden.requires_grad_()
    weight.requires_grad_()
    holder = {}

    def forward():
        holder["out"] = linear_token_logprobs(hidden, weight, labels, chunk_size=chunk, return_entropy=True)

    def backward():
        logprobs, entropy = holder.pop("out")
        (logprobs.sum() + entropy.sum()).backward()

    forward_peak = _peak_allocated_bytes(forward)
    backward_peak = _peak_allocated_bytes(backward)
    # Forward: one chunk of logits plus per-row outputs. Backward: a chunk of logits
    # and its gradient, plus grad_hidden and grad_weight (each [rows or V, 32]).
    assert 0 < forward_peak <= 1.25 * one_chunk, forward_peak
    grads = hidden.numel() * 4 + weight.numel() * 4
    assert backward_peak <= grads + 2.25 * one_chunk, backward_peak
    assert backward_peak < full_logits / 4


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"weight": torch.randn(VOCAB, HIDDEN, dtype=torch.float64)}, TypeError, "weight must have the dtype"),
        ({"weight": torch.randn(VOCAB, HIDDEN + 1)}, ValueError, "hidden must have shape"),
        ({"weight": torch.randn(VOCAB)}, ValueError, "weight must be 2-D"),
        ({"labels": torch.zeros(4, dtype=torch.long)}, ValueError, "labels must have shape"),
        ({"labels": torch.zeros(5)}, TypeError, "int64 or int32"),
        ({"labels": torch.tensor([0, 1, VOCAB, 2, 3])}, IndexError, f"value {VOCAB} at flat position 2"),
        ({"hidden": torch.zeros(5, HIDDEN, dtype=torch.long)}, TypeError, "hidden must be a floating-point"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"impl": "fast"}, ValueError, "impl must be 'auto', 'cutlass' or 'chunked'"),
        ({"impl": "cutlass"}, ValueError, "impl='cutlass' does not apply"),
    ],
)
def test_bad_arguments_are_named(change, error, match):
    hidden, weight, labels = _inputs((5,), torch.float32)
    labels[labels == IGNORE] = 0
    kwargs = {"hidden": hidden, "weight": weight, "labels": labels, **change}
    with pytest.raises(error, match=match):
        linear_token_logprobs(kwargs.pop("hidden"), kwargs.pop("weight"), kwargs.pop("labels"), **kwargs)
