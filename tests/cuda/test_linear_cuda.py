"""The fused CUTLASS forward of linear_token_logprobs (csrc/cuda/linear_logprob.cu) on the GPU.

Against a float64 reference on inputs whose logits every path computes exactly (so the
only error left is the fp32 softmax statistics), at the vocabulary-tile edges, on
Gaussian inputs against the reference and the chunked path, and through the backward
it shares with the chunked path.
"""

import contextlib
import math

import pytest
import torch

from aligner.ops import linear as linear_ops
from aligner.ops import reference
from aligner.ops.linear import linear_token_logprobs

CUDA = torch.device("cuda")
HALF_DTYPES = [torch.bfloat16, torch.float16]
IGNORE = -100
TILE_VOCAB = 128  # columns per CTA in linear_logprob.cu
FP32_ROUNDOFF = 2.0**-24
# z = logit * float(1 / T): two fp32 roundings.
SCALE_ROUNDINGS = 2
# The softmax statistics in fp32, as the log-prob kernel tests allow (test_cuda_ops.py),
# in units of 2^-24 (1 + |z|max) ...
SOFTMAX_ULPS = 64
# ... plus a few roundings for each of the V / 128 tile partials that the finalize
# kernel merges one after another.
ULPS_PER_TILE_MERGE = 2
# Unit roundoff of the input dtypes (8 and 11 significant bits): each path rounds the
# logits to the input dtype, as nn.Linear does.
DTYPE_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
# Before that rounding, a logit is an fp32 sum of H products, each exact in fp32 (two
# 8- or 11-bit significands): at most H roundoffs of sum_k |h_k w_k| in any order of
# addition (Higham's bound), doubled for tensor-core adders that truncate.
GEMM_ROUNDINGS_PER_TERM = 2
# The gradients: flash-attention's rule, at most twice the error of the chunked path
# (same backward, logits recomputed in the input dtype) plus a floor of the result's scale.
GRAD_ERROR_FACTOR = 2.0
GRAD_ERROR_FLOOR = {torch.bfloat16: 2.0**-10, torch.float16: 2.0**-13}


def _labels(rows, vocab):
    labels = torch.randint(0, vocab, (rows,), device=CUDA)
    labels[1::3] = IGNORE
    labels[0] = 0
    labels[-1] = vocab - 1  # the last column of the last (partial) vocabulary tile
    return labels


def make_inputs(rows, hidden_size, vocab, dtype):
    """Gaussian inputs: hidden rows from nearly flat to sharply peaked logits (|z| up to ~30)."""
    hidden = (torch.randn(rows, hidden_size, device=CUDA) * torch.rand(rows, 1, device=CUDA) * 2).to(dtype)
    weight = (torch.randn(vocab, hidden_size, device=CUDA) * 3 / hidden_size**0.5).to(dtype)
    return hidden, weight, _labels(rows, vocab)


def make_exact_inputs(rows, hidden_size, vocab, dtype):
    """Inputs whose logits are exact in fp32 and in the input dtype, whatever the order of summation.

    Entries are -1, 0 or 1, hidden rows scaled by a power of two: every partial sum is an
    integer below 256 (12 standard deviations for H = 1024) times the row's scale. Scales
    spread the rows from peaked (z std ~3) to nearly flat (~0.3).
    """
    exponents = round(math.log2(hidden_size) / 2) + torch.randint(-2, 2, (rows, 1), device=CUDA)
    hidden = torch.randint(-1, 2, (rows, hidden_size), device=CUDA) * torch.exp2(-exponents.float())
    weight = torch.randint(-1, 2, (vocab, hidden_size), device=CUDA)
    return hidden.to(dtype), weight.to(dtype), _labels(rows, vocab)


def error_bounds(z, eps):
    """Per-row bounds on the kernel's (log-prob, entropy) error, given a bound eps on the error of each z.

    z: [N, V] exact scaled logits in float64. A log-prob moves by at most 2 eps (the label's
    z, and lse, a softmax-weighted mean of the moves); the entropy lse - E_p[z] by at most
    2 eps (1 + range of z), each p_j moving by 2 eps p_j. On top, the fp32 softmax
    statistics: SOFTMAX_ULPS of (1 + |z|max), plus ULPS_PER_TILE_MERGE per merged tile,
    of 1 for lse and of (1 + range of z) for the entropy, whose sum of p_j (z_j - max)
    every merge rescales.
    """
    z_absmax = z.abs().amax(-1)
    z_range = z.amax(-1) - z.amin(-1)
    softmax = FP32_ROUNDOFF * SOFTMAX_ULPS * (1 + z_absmax)
    merges = FP32_ROUNDOFF * ULPS_PER_TILE_MERGE * math.ceil(z.shape[-1] / TILE_VOCAB)
    return 2 * eps + softmax + merges, (2 * eps + merges) * (1 + z_range) + softmax


def exact_logits_error_bounds(logits, temperature):
    """error_bounds for logits the GEMM gets exactly: only the scaling by 1 / T errs."""
    z = logits / temperature
    return error_bounds(z, SCALE_ROUNDINGS * FP32_ROUNDOFF * z.abs().amax(-1))


def rounded_logits_error_bounds(hidden, weight, temperature):
    """error_bounds for either path on any inputs: an fp32 GEMM, then logits rounded to the input dtype.

    Each logit is off by at most u |logit| plus the GEMM's error delta, before the scaling by 1 / T.
    """
    h, w = hidden.double(), weight.double()
    z = h @ w.T / temperature  # [N, V]
    delta = GEMM_ROUNDINGS_PER_TERM * hidden.shape[1] * FP32_ROUNDOFF * (h.abs() @ w.abs().T).amax(-1) / temperature
    z_absmax = z.abs().amax(-1)
    eps = (DTYPE_ROUNDOFF[hidden.dtype] + SCALE_ROUNDINGS * FP32_ROUNDOFF) * z_absmax + delta
    return error_bounds(z, eps)


@contextlib.contextmanager
def fp32_matmul_reductions():
    """cuBLAS half-precision matmuls reduce in fp32 only (no split-K partial sums in bf16/fp16)."""
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_bf16_reduced_precision_reduction, matmul.allow_fp16_reduced_precision_reduction
    matmul.allow_bf16_reduced_precision_reduction = False
    matmul.allow_fp16_reduced_precision_reduction = False
    try:
        yield
    finally:
        matmul.allow_bf16_reduced_precision_reduction, matmul.allow_fp16_reduced_precision_reduction = saved


def assert_within(got, expected, bound, name):
    error = (got.double() - expected.double()).abs()
    excess = error - bound
    worst = int(excess.argmax())
    assert excess.max() <= 0, (
        f"{name}: |got - expected| = {error[worst].item():.3e} > {bound[worst].item():.3e} at row {worst} "
        f"(got {got[worst].item()!r}, expected {expected[worst].item()!r})"
    )


def test_available_for_half_dtypes_on_cuda():
    hidden = torch.zeros(2, 64, device=CUDA)
    assert linear_ops.cutlass_unavailable_reason(hidden.bfloat16()) is None
    assert linear_ops.cutlass_unavailable_reason(hidden.half()) is None
    assert "float32" in linear_ops.cutlass_unavailable_reason(hidden)
    assert "multiple of 8" in linear_ops.cutlass_unavailable_reason(torch.zeros(2, 60, device=CUDA).bfloat16())


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [1, 5, 127, 128, 129, 1000, 32768 + 3])
@pytest.mark.parametrize("hidden_size", [64, 1024])
@pytest.mark.parametrize("rows", [1, 7, 128, 300])
def test_matches_float64_reference(rows, hidden_size, vocab, dtype, temperature):
    hidden, weight, labels = make_exact_inputs(rows, hidden_size, vocab, dtype)
    logprobs, entropy = linear_token_logprobs(
        hidden, weight, labels, temperature=temperature, return_entropy=True, impl="cutlass"
    )
    assert logprobs.dtype == entropy.dtype == torch.float32 and logprobs.shape == entropy.shape == (rows,)
    logits = hidden.double() @ weight.double().T
    expected_lp, expected_ent = reference.token_logprobs_and_entropy(logits, labels, temperature=temperature)
    lp_bound, ent_bound = exact_logits_error_bounds(logits, temperature)
    assert_within(logprobs, expected_lp, lp_bound, "logprobs")
    assert_within(entropy, expected_ent, ent_bound, "entropy")
    assert torch.all(logprobs[labels == IGNORE] == 0)


def _one_hot_inputs(rows, hidden_size, vocab, dtype):
    """Exact logits with a planted peak: hidden row i is e_(i mod H), so logit (i, j) = weight[j, i mod H].

    Every logit is -1 but one peak of +1 per row, at a column beside a 128-wide tile edge.
    At temperature 0.5 a padding column (zero-filled, z = 0) counted by mistake moves lse
    by more than 2e-4 (0.02 for V <= 257), a real column left out by more than 0.003 (V <= 257).
    """
    edges = sorted({c for c in (0, 1, 126, 127, 128, 129, 255, 256, vocab - 2, vocab - 1) if 0 <= c < vocab})
    hidden = torch.zeros(rows, hidden_size, device=CUDA)
    hidden[torch.arange(rows), torch.arange(rows) % hidden_size] = 1.0
    weight = torch.full((vocab, hidden_size), -1.0, device=CUDA)
    peaks = torch.tensor([edges[k % len(edges)] for k in range(hidden_size)], device=CUDA)
    weight[peaks, torch.arange(hidden_size, device=CUDA)] = 1.0
    labels = peaks[torch.arange(rows, device=CUDA) % hidden_size].clone()
    labels[2::4] = (labels[2::4] + 1) % vocab  # some labels off the peak
    labels[3::4] = IGNORE
    return hidden.to(dtype), weight.to(dtype), labels


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [1, 5, 127, 128, 129, 255, 256, 257, 32768 + 3])
@pytest.mark.parametrize("hidden_size", [64, 72])  # 72: the last k-tile of 32 is cut at 8
@pytest.mark.parametrize("rows", [7, 130])
def test_exact_logits_at_tile_edges(rows, hidden_size, vocab, dtype):
    hidden, weight, labels = _one_hot_inputs(rows, hidden_size, vocab, dtype)
    logprobs, entropy = linear_token_logprobs(
        hidden, weight, labels, temperature=0.5, return_entropy=True, impl="cutlass"
    )
    logits = hidden.double() @ weight.double().T
    expected_lp, expected_ent = reference.token_logprobs_and_entropy(logits, labels, temperature=0.5)
    lp_bound, ent_bound = exact_logits_error_bounds(logits, 0.5)
    assert_within(logprobs, expected_lp, lp_bound, "logprobs")
    assert_within(entropy, expected_ent, ent_bound, "entropy")


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [1000, 32768 + 3])
def test_gaussian_inputs_match_reference_and_chunked_path(vocab, dtype):
    rows, hidden_size, temperature = 300, 1024, 0.7
    hidden, weight, labels = make_inputs(rows, hidden_size, vocab, dtype)
    upstream = (torch.randn(rows, device=CUDA), torch.randn(rows, device=CUDA))

    def run(impl, h, w):
        h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        if impl == "float64":
            logprobs, entropy = reference.token_logprobs_and_entropy(h @ w.T, labels, temperature=temperature)
        else:
            logprobs, entropy = linear_token_logprobs(
                h, w, labels, temperature=temperature, return_entropy=True, impl=impl, chunk_size=128
            )
        loss = (logprobs * upstream[0].to(logprobs.dtype)).sum() + (entropy * upstream[1].to(entropy.dtype)).sum()
        return (logprobs.detach(), entropy.detach(), *torch.autograd.grad(loss, (h, w)))

    with fp32_matmul_reductions():  # the chunked path's matmuls, as rounded_logits_error_bounds assumes
        fused = run("cutlass", hidden, weight)
        chunked = run("chunked", hidden, weight)
    exact = run("float64", hidden.double(), weight.double())

    lp_bound, ent_bound = rounded_logits_error_bounds(hidden, weight, temperature)
    assert_within(fused[0], exact[0], lp_bound, "logprobs")
    assert_within(fused[1], exact[1], ent_bound, "entropy")
    assert_within(fused[0], chunked[0], 2 * lp_bound, "logprobs vs chunked")
    assert_within(fused[1], chunked[1], 2 * ent_bound, "entropy vs chunked")
    for name, got, same_backward, expected in zip(
        ("grad_hidden", "grad_weight"), fused[2:], chunked[2:], exact[2:], strict=True
    ):
        assert got.dtype == dtype and got.shape == expected.shape, name
        our_error = (got.double() - expected).abs().max()
        chunked_error = (same_backward.double() - expected).abs().max()
        allowed = GRAD_ERROR_FACTOR * chunked_error + GRAD_ERROR_FLOOR[dtype] * expected.abs().max()
        assert our_error <= allowed, (name, our_error.item(), chunked_error.item())


def test_auto_is_the_chunked_path():
    """The fused kernel is opt-in (slower than cuBLAS + the row kernel on an H100, bench/RESULTS.md)."""
    hidden, weight, labels = make_inputs(37, 64, 300, torch.bfloat16)
    auto = linear_token_logprobs(hidden, weight, labels)
    assert torch.equal(auto, linear_token_logprobs(hidden, weight, labels, impl="chunked"))


def test_rows_split_across_launches_match_single_launches():
    # 7813 vocabulary tiles: a launch covers 640 rows (64 MiB of partials), so 1500 rows take three.
    rows, hidden_size, vocab = 1500, 64, 1_000_003
    hidden, weight, labels = make_inputs(rows, hidden_size, vocab, torch.bfloat16)
    op = torch.ops.aligner.linear_logprobs_forward
    whole = op(hidden, weight, labels, 0.9, IGNORE, True)
    for start in range(0, rows, 300):  # each piece fits one launch
        piece = op(hidden[start : start + 300], weight, labels[start : start + 300], 0.9, IGNORE, True)
        for got, expected in zip(whole, piece, strict=True):
            # A row's result does not depend on the rows beside it, up to the last bit of the
            # tensor cores' summation order; a wrong row offset would be off by O(1).
            torch.testing.assert_close(got[start : start + 300], expected, rtol=1e-5, atol=1e-5)


def test_misaligned_hidden_is_copied_not_misread():
    hidden, weight, labels = make_inputs(9, 64, 200, torch.float16)
    storage = torch.empty(hidden.numel() + 1, dtype=hidden.dtype, device=CUDA)
    shifted = storage[1:].view(hidden.shape)  # starts 2 bytes past a 16-byte boundary
    shifted.copy_(hidden)
    op = torch.ops.aligner.linear_logprobs_forward
    for got, expected in zip(
        op(shifted, weight, labels, 1.0, IGNORE, True), op(hidden, weight, labels, 1.0, IGNORE, True), strict=True
    ):
        assert torch.equal(got, expected)


def test_raw_op_out_of_range_label_gives_nan():
    """The op leaves the range check to linear_token_logprobs (no device sync): NaN, never an out-of-bounds read."""
    hidden, weight, _ = make_inputs(4, 64, 200, torch.bfloat16)
    labels = torch.tensor([200, -1, IGNORE, 5], device=CUDA)
    logprobs, _, lse = torch.ops.aligner.linear_logprobs_forward(hidden, weight, labels, 1.0, IGNORE, False)
    assert torch.isnan(logprobs[:2]).all()
    assert logprobs[2] == 0 and torch.isfinite(logprobs[3]) and torch.isfinite(lse).all()


def test_op_rejects_bad_inputs():
    hidden, weight, labels = make_inputs(4, 64, 200, torch.bfloat16)
    op = torch.ops.aligner.linear_logprobs_forward
    with pytest.raises(ValueError, match="multiple of 8"):
        op(hidden[:, :60], weight[:, :60], labels, 1.0, IGNORE, False)
    with pytest.raises(TypeError, match="bfloat16 or float16"):
        op(hidden.float(), weight.float(), labels, 1.0, IGNORE, False)
    with pytest.raises(ValueError, match="labels must have shape"):
        op(hidden, weight, labels[:3], 1.0, IGNORE, False)


def test_compiled_fused_path():
    hidden, weight, labels = make_inputs(64, 128, 1000, torch.bfloat16)

    def loss_fn(h, w):
        logprobs, entropy = linear_token_logprobs(h, w, labels, temperature=0.9, return_entropy=True)
        return logprobs.sum() - 0.01 * entropy.sum()

    eager_inputs = (hidden.clone().requires_grad_(), weight.clone().requires_grad_())
    compiled_inputs = (hidden.clone().requires_grad_(), weight.clone().requires_grad_())
    expected = loss_fn(*eager_inputs)
    loss = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(*compiled_inputs)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-3)
    for got, want in zip(
        torch.autograd.grad(loss, compiled_inputs), torch.autograd.grad(expected, eager_inputs), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-3)


@pytest.mark.parametrize("with_entropy", [True, False])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_opcheck(dtype, with_entropy):
    hidden, weight, labels = make_inputs(37, 64, 300, dtype)
    torch.library.opcheck(
        torch.ops.aligner.linear_logprobs_forward.default, (hidden, weight, labels, 0.7, IGNORE, with_entropy)
    )
