"""The CUDA kernels against the float64 reference and against the CPU kernels.

Each op runs on the GPU and is compared, forward and backward, with
``aligner.ops.reference`` in float64 (on the CPU, or on the GPU for the big
shapes, where a CPU float64 log-softmax over 4096 x 32768 would dominate the
run), and with the CPU kernel on the same inputs. The reference sees the same
rounded inputs as the kernel, so the forward error is fp32 arithmetic only.
"""

import math

import pytest
import torch
from assertions import assert_close

import aligner
from aligner import ops
from aligner.ops import reference

CUDA = torch.device("cuda")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IGNORE = -100

FP32_ROUNDOFF = 2.0**-24
# Log-probs / entropy: error in units of 2^-24 (1 + |logits / T|max). A GPU row
# reduction adds each thread's strided share serially (V / threads terms, ~128 for
# V = 128256) before a tree merge, so it may err more than the CPU's many short
# vector sums (measured <= 5 units on the CPU, whose test allows 32).
FORWARD_ULPS = 64
# Gradients are computed in fp32 and rounded once to the logits' dtype: unit roundoff
# 2^-24 (fp32), 2^-8 (bf16: 8 significant bits), 2^-11 (fp16: 11 significant bits).
GRAD_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
# fp16 values below 2^-14 are subnormal, spaced 2^-24 apart: half that, absolute.
GRAD_SUBNORMAL_ATOL = {torch.float32: 0.0, torch.bfloat16: 0.0, torch.float16: 2.0**-25}
# CUDA vs CPU kernel: each is within the bound of the reference, and two roundings of
# nearly equal fp32 values to the same dtype differ by at most one ulp (2 roundoffs).
KERNEL_VS_KERNEL_ROUNDINGS = 2
# fp32 sums of n terms (masked moments, group statistics): ~sqrt(n) roundoffs of the
# largest term for random rounding, with this much headroom.
SUM_ULPS = 16
# The fp32 GAE scan: ~3 rounded terms per step carried back through gamma * lam <= 1.
SCAN_ULPS_PER_STEP = 8


def test_extension_has_cuda_kernels():
    assert aligner.build_info()["has_cuda_kernels"]
    assert torch.ops.aligner.logprobs_entropy_forward.default.has_kernel_for_dispatch_key("CUDA")


# ---- log-probs and entropy -----------------------------------------------------------


def make_logits(shape, dtype, device=CUDA):
    """Rows from nearly flat to sharply peaked (per-row scale in [0, 6))."""
    scale = torch.rand(*shape[:-1], 1, device=device) * 6
    return (torch.randn(shape, device=device) * scale).to(dtype)


def make_labels(logits, ignore_index=IGNORE):
    labels = torch.randint(0, logits.shape[-1], logits.shape[:-1], device=logits.device)
    labels[torch.rand(labels.shape, device=logits.device) < 0.25] = ignore_index
    return labels


def logprob_run(module, op, logits, labels, temperature, weights, ignore_index=IGNORE):
    """(outputs, d(sum(out * w)) / d logits) of one of the three log-prob ops."""
    x = logits.detach().clone().requires_grad_()
    if op == "logprobs":
        outs = (module.token_logprobs(x, labels, temperature=temperature, ignore_index=ignore_index),)
    elif op == "entropy":
        outs = (module.token_entropy(x, temperature=temperature),)
    else:
        outs = module.token_logprobs_and_entropy(x, labels, temperature=temperature, ignore_index=ignore_index)
    loss = sum((out * w.to(out.dtype)).sum() for out, w in zip(outs, weights, strict=False))
    (grad,) = torch.autograd.grad(loss, x)
    return [out.detach() for out in outs], grad


def check_logprobs(op, logits, labels, temperature, ignore_index=IGNORE, reference_device="cpu"):
    """The CUDA op against the float64 reference and against the CPU kernel."""
    dtype = logits.dtype
    rows, vocab = logits.shape[:-1], logits.shape[-1]
    weights = [torch.randn(rows, device=CUDA) for _ in range(2)]
    got, got_grad = logprob_run(ops, op, logits, labels, temperature, weights, ignore_index)
    assert got_grad.device.type == "cuda" and got_grad.dtype == dtype
    to_ref = (lambda t: t.to(reference_device)) if reference_device != "cuda" else (lambda t: t)
    expected, expected_grad = logprob_run(
        reference,
        op,
        to_ref(logits).double(),
        None if labels is None else to_ref(labels),
        temperature,
        [to_ref(w) for w in weights],
        ignore_index,
    )
    cpu, cpu_grad = logprob_run(
        ops,
        op,
        logits.cpu(),
        None if labels is None else labels.cpu(),
        temperature,
        [w.cpu() for w in weights],
        ignore_index,
    )
    z_absmax = logits.double().abs().nan_to_num(posinf=0.0, neginf=0.0).max().item() / temperature
    atol = FORWARD_ULPS * FP32_ROUNDOFF * (1 + z_absmax)
    for i, (out, ref, on_cpu) in enumerate(zip(got, expected, cpu, strict=True)):
        assert out.device.type == "cuda" and out.dtype == torch.float32 and out.shape == rows
        assert_close(out, ref, atol, name=f"{op} output {i} vs reference")
        assert_close(out, on_cpu, 2 * atol, name=f"{op} output {i} vs CPU kernel")
    # |d log p / dz| <= 1 and |d H / dz| <= 2 + log V per unit of upstream weight
    output_kinds = {"logprobs": ["logprobs"], "entropy": ["entropy"], "fused": ["logprobs", "entropy"]}[op]
    sensitivity = {"logprobs": 1.0, "entropy": 2 + math.log(vocab)}
    weight_scale = sum(
        w.abs().max().item() * sensitivity[kind] for w, kind in zip(weights, output_kinds, strict=False) if w.numel()
    )
    grad_atol = atol * weight_scale / temperature + GRAD_SUBNORMAL_ATOL[dtype]
    roundoff = GRAD_ROUNDOFF[dtype]
    assert_close(got_grad, expected_grad, grad_atol, roundoff, name=f"{op} grad vs reference")
    assert_close(
        got_grad, cpu_grad, 2 * grad_atol, KERNEL_VS_KERNEL_ROUNDINGS * roundoff, name=f"{op} grad vs CPU kernel"
    )
    return got, got_grad


@pytest.mark.parametrize("op", ["logprobs", "entropy", "fused"])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (4, 1), (1, 7), (5, 17), (6, 1000), (2, 3, 4099), (8, 128256)], ids=str)
def test_logprobs_match_reference_and_cpu(shape, dtype, temperature, op):
    logits = make_logits(shape, dtype)
    check_logprobs(op, logits, None if op == "entropy" else make_labels(logits), temperature)


@pytest.mark.parametrize(("rows", "vocab"), [(4096, 32768), (512, 128256)])
def test_logprobs_large_bf16(rows, vocab):
    logits = make_logits((rows, vocab), torch.bfloat16)
    check_logprobs("fused", logits, make_labels(logits), 1.0, reference_device="cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_logprobs_special_values(dtype):
    """Huge magnitudes, -inf entries (never the target, never a whole row), custom ignore_index."""
    logits = make_logits((16, 4099), torch.float32)
    logits[0] = (torch.randn(4099, device=CUDA) * 1e4).clamp(-6e4, 6e4)
    logits[1:4, 3] = 1e4
    logits[4:6, 7] = -1e4
    labels = torch.randint(0, 4099, (16,), device=CUDA)
    labels[4] = 7
    neg_inf = torch.rand(16, 4099, device=CUDA) < 0.3
    neg_inf[:6] = False
    neg_inf[torch.arange(16, device=CUDA), labels] = False
    neg_inf[8] = True
    neg_inf[8, labels[8]] = False  # a single finite entry
    logits[neg_inf] = float("-inf")
    labels[10:12] = 5  # ignore_index=5 also hides label 5 inside the vocabulary
    logits = logits.to(dtype)
    for op in ("logprobs", "entropy", "fused"):
        (first, *_), grad = check_logprobs(op, logits, labels, 0.7, ignore_index=5)
        assert torch.all(grad[neg_inf] == 0), op
        if op == "logprobs":
            assert torch.all(first[labels == 5] == 0)
            assert torch.all(grad[labels == 5] == 0)


def test_logprobs_int32_labels_and_strided_logits():
    base = make_logits((6, 2 * 1000), torch.bfloat16)
    logits = base[:, ::2]
    labels = make_labels(logits).int()
    check_logprobs("fused", logits, labels, 1.3)


def test_logprobs_label_out_of_range_raises():
    logits = torch.randn(4, 11, device=CUDA)
    with pytest.raises((ValueError, TypeError, IndexError, RuntimeError), match=r"\blabels\b"):
        ops.token_logprobs(logits, torch.tensor([0, 11, 2, 3], device=CUDA))
    with pytest.raises((ValueError, TypeError, IndexError, RuntimeError), match=r"\blabels\b"):
        ops.token_logprobs(logits, torch.tensor([0, 1, 2, 3]))  # labels on the CPU
    with pytest.raises(IndexError, match=r"labels: value -5 at flat position 1"):
        ops.token_logprobs_and_entropy(logits, torch.tensor([0, -5, 2, -100], device=CUDA))


def test_raw_op_out_of_range_label_gives_nan():
    """The CUDA op leaves the range check to aligner.ops (no device sync): NaN, never an out-of-bounds read."""
    logits = torch.randn(3, 11, device=CUDA)
    labels = torch.tensor([11, 2, -100], device=CUDA)
    logprobs, _, lse = torch.ops.aligner.logprobs_entropy_forward(logits, labels, 1.0, -100, True, False)
    assert torch.isnan(logprobs[0])
    torch.testing.assert_close(logprobs[1], torch.log_softmax(logits[1], -1)[2])
    assert logprobs[2] == 0 and torch.isfinite(lse).all()


# ---- KL ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("estimator", ["k1", "abs", "k2", "k3"])
def test_kl_penalty(estimator, dtype):
    logprobs = (-torch.rand(64, 4097, device=CUDA) * 8).to(dtype)
    ref_logprobs = (logprobs.float() + torch.randn(64, 4097, device=CUDA) * 2).clamp_max(0).to(dtype)
    weights = torch.randn(64, 4097, device=CUDA)

    def run(module, a, b, w):
        a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
        kl = module.kl_penalty(a, b, estimator=estimator)
        return (kl.detach(), *torch.autograd.grad((kl * w.to(kl.dtype)).sum(), (a, b)))

    got = run(ops, logprobs, ref_logprobs, weights)
    expected = run(reference, logprobs.cpu().double(), ref_logprobs.cpu().double(), weights.cpu())
    cpu = run(ops, logprobs.cpu(), ref_logprobs.cpu(), weights.cpu())
    d = logprobs.double() - ref_logprobs.double()
    atol = 16 * FP32_ROUNDOFF * (1 + d.abs() + torch.exp(-d)).max().item()
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == dtype
    assert_close(got[0], expected[0], atol, name="kl vs reference")
    assert_close(got[0], cpu[0], 2 * atol, name="kl vs CPU kernel")
    grad_atol = atol * weights.abs().max().item() + GRAD_SUBNORMAL_ATOL[dtype]
    for i, name in ((1, "grad logprobs"), (2, "grad ref_logprobs")):
        assert_close(got[i], expected[i], grad_atol, GRAD_ROUNDOFF[dtype], name=f"{name} vs reference")
        assert_close(
            got[i], cpu[i], 2 * grad_atol, KERNEL_VS_KERNEL_ROUNDINGS * GRAD_ROUNDOFF[dtype], name=f"{name} vs CPU"
        )


# ---- masked statistics ---------------------------------------------------------------


def make_mask(shape, kind, device=CUDA):
    valid = torch.rand(shape, device=device) < 0.6
    if kind == "bool":
        return valid
    if kind == "float":
        return valid * torch.tensor([0.5, 1.0, -2.0], device=device)[torch.randint(0, 3, shape, device=device)]
    return valid.long() * torch.randint(1, 4, shape, device=device)


def sum_atol(x, n):
    largest = x.double().abs().max().item() if x.numel() else 0.0
    return SUM_ULPS * FP32_ROUNDOFF * math.sqrt(max(n, 1)) * largest


@pytest.mark.parametrize("kind", ["bool", "float", "int"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("shape", "dim"),
    [((17,), None), ((4, 33), 0), ((2, 3, 5), 1), ((4096, 7), -1), ((3, 1_000_003), -1), ((1_000_003,), None)],
    ids=str,
)
def test_masked_mean_and_var(shape, dim, dtype, kind):
    x = (torch.randn(shape, device=CUDA) * 2 + torch.randn((), device=CUDA) * 10).to(dtype)
    mask = make_mask(shape, kind)
    n = x.numel() if dim is None else x.shape[dim]
    counts = (mask != 0).sum() if dim is None else (mask != 0).sum(dim)
    fewest_valid = max(1, int(counts.min()))
    weights = torch.randn(() if dim is None else x.sum(dim).shape, device=CUDA)
    for name in ("masked_mean", "masked_var"):

        def run(module, x, mask, w, name=name):
            x = x.clone().requires_grad_()
            out = getattr(module, name)(x, mask, dim)
            return out.detach(), torch.autograd.grad((out * w.to(out.dtype)).sum(), x)[0]

        got, got_grad = run(ops, x, mask, weights)
        expected, expected_grad = run(reference, x.cpu().double(), mask.cpu(), weights.cpu())
        cpu, cpu_grad = run(ops, x.cpu(), mask.cpu(), weights.cpu())
        assert got.dtype == torch.float32 and got_grad.dtype == dtype
        centered = x.double() - reference.masked_mean(x, mask)
        if name == "masked_mean":
            atol = sum_atol(x, n)
            grad_atol = 4 * FP32_ROUNDOFF * weights.abs().max().item() / fewest_valid
        else:
            atol = sum_atol(centered * centered, n) + 4 * sum_atol(x, n) * centered.abs().max().item()
            grad_atol = 2 * (sum_atol(x, n) + 4 * sum_atol(x, 1)) * weights.abs().max().item() / fewest_valid
        grad_atol += GRAD_SUBNORMAL_ATOL[dtype]
        assert_close(got, expected, atol, name=f"{name} vs reference")
        assert_close(got, cpu, 2 * atol, name=f"{name} vs CPU kernel")
        assert_close(got_grad, expected_grad, grad_atol, GRAD_ROUNDOFF[dtype], name=f"{name} grad vs reference")
        assert_close(
            got_grad,
            cpu_grad,
            2 * grad_atol,
            KERNEL_VS_KERNEL_ROUNDINGS * GRAD_ROUNDOFF[dtype],
            name=f"{name} grad vs CPU kernel",
        )


def test_masked_empty_mask_gives_zero():
    x = torch.randn(3, 6, device=CUDA, requires_grad=True)
    mask = torch.zeros(3, 6, device=CUDA, dtype=torch.bool)
    for dim in (None, 0, -1):
        for fn in (ops.masked_mean, ops.masked_var):
            out = fn(x, mask, dim)
            assert torch.all(out == 0)
            assert torch.all(torch.autograd.grad(out.sum(), x)[0] == 0)
    whitened = ops.masked_whiten(x, mask)
    assert torch.all(whitened == 0)


@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1,), (37,), (64, 1000), (8, 100_003)], ids=str)
def test_masked_whiten(shape, dtype, shift_mean):
    x = (torch.randn(shape, device=CUDA) * 2 + torch.randn((), device=CUDA) * 10).to(dtype)
    mask = make_mask(shape, "bool")
    mask.view(-1)[0] = True
    weights = torch.randn(shape, device=CUDA)

    def run(module, x, mask, w):
        x = x.clone().requires_grad_()
        out = module.masked_whiten(x, mask, shift_mean=shift_mean)
        return out.detach(), torch.autograd.grad((out * w.to(out.dtype)).sum(), x)[0]

    got, got_grad = run(ops, x, mask, weights)
    expected, expected_grad = run(reference, x.cpu().double(), mask.cpu(), weights.cpu())
    cpu, cpu_grad = run(ops, x.cpu(), mask.cpu(), weights.cpu())
    assert torch.all(got[mask == 0] == 0)
    n = int(mask.sum())
    mean = reference.masked_mean(x, mask).item()
    rstd = 1 / math.sqrt(reference.masked_var(x, mask).item() + 1e-8)
    largest_out = expected.abs().max().item()
    atol = sum_atol(x, n) * rstd * (1 + largest_out) + 4 * FP32_ROUNDOFF * abs(mean)
    assert_close(got, expected, atol, 4 * FP32_ROUNDOFF, name="masked_whiten vs reference")
    assert_close(got, cpu, 2 * atol, 8 * FP32_ROUNDOFF, name="masked_whiten vs CPU kernel")
    grad_atol = sum_atol(weights, n) * (rstd + 1) * (1 + largest_out) * 4 + GRAD_SUBNORMAL_ATOL[dtype]
    roundoff = GRAD_ROUNDOFF[dtype]
    assert_close(got_grad, expected_grad, grad_atol, roundoff, name="masked_whiten grad vs reference")
    assert_close(
        got_grad, cpu_grad, 2 * grad_atol, KERNEL_VS_KERNEL_ROUNDINGS * roundoff, name="masked_whiten grad vs CPU"
    )


# ---- advantages ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["zero", "carry_forward"])
@pytest.mark.parametrize(("gamma", "lam"), [(0.9, 0.8), (1.0, 0.95), (1.0, 1.0)], ids=str)
@pytest.mark.parametrize(("batch", "length"), [(1, 1), (7, 33), (64, 2048)], ids=str)
def test_gae(batch, length, gamma, lam, mode):
    rewards = torch.randn(batch, length, device=CUDA) * (torch.rand(batch, length, device=CUDA) < 0.3)
    values = torch.randn(batch, length, device=CUDA)
    lengths = torch.randint(0, length + 1, (batch,), device=CUDA)
    mask = (torch.arange(length, device=CUDA) < lengths[:, None]) & (torch.rand(batch, length, device=CUDA) < 0.7)
    got = ops.gae(rewards, values, mask, gamma=gamma, lam=lam, mask_mode=mode)
    expected = reference.gae(rewards.cpu(), values.cpu(), mask.cpu(), gamma=gamma, lam=lam, mask_mode=mode)
    cpu = ops.gae(rewards.cpu(), values.cpu(), mask.cpu(), gamma=gamma, lam=lam, mask_mode=mode)
    scale = max(max(t.abs().max().item() for t in expected), 1.0)
    atol = SCAN_ULPS_PER_STEP * FP32_ROUNDOFF * length * scale
    for name, g, e, c in zip(("advantages", "returns"), got, expected, cpu, strict=True):
        assert g.device.type == "cuda" and g.dtype == torch.float32
        assert torch.all(g[~mask] == 0), name
        assert_close(g, e, atol, name=f"{name} vs reference")
        assert_close(g, c, 2 * atol, name=f"{name} vs CPU kernel")


@pytest.mark.parametrize("with_valid", [False, True])
@pytest.mark.parametrize("scale", ["std", None])
@pytest.mark.parametrize("baseline", ["mean", "leave_one_out"])
@pytest.mark.parametrize("group_size", [1, 5, 16, 64])
def test_group_advantages(group_size, baseline, scale, with_valid):
    rewards = torch.randn(512, group_size, device=CUDA) * 3 + 1
    rewards[:8] = (torch.rand(8, group_size, device=CUDA) < 0.5).float()  # binary rewards
    valid = torch.rand(512, group_size, device=CUDA) < 0.7 if with_valid else None
    kwargs = {"baseline": baseline, "scale": scale, "valid": valid}
    got = ops.group_advantages(rewards, group_size, **kwargs)
    cpu_kwargs = kwargs | {"valid": None if valid is None else valid.cpu()}
    expected = reference.group_advantages(rewards.cpu(), group_size, **cpu_kwargs)
    cpu = ops.group_advantages(rewards.cpu(), group_size, **cpu_kwargs)
    assert got.device.type == "cuda" and got.dtype == torch.float32 and got.shape == rewards.shape
    # (r - b) / (std + eps) errs by ~G roundoffs of |r| over (std + eps); bound it per group.
    ok = torch.ones_like(rewards, dtype=torch.bool) if valid is None else valid
    n = ok.sum(-1, keepdim=True)
    mean = torch.where(ok, rewards, 0).sum(-1, keepdim=True) / n.clamp_min(1)
    std = (torch.where(ok, (rewards - mean) ** 2, 0).sum(-1, keepdim=True) / (n - 1).clamp_min(1)).sqrt()
    divisor = (std + 1e-6) if scale == "std" else torch.ones_like(std)
    atol = 16 * FP32_ROUNDOFF * group_size * (rewards.abs().max() / divisor + expected.to(CUDA).abs())
    assert torch.all((got.double() - expected.to(CUDA)).abs() <= atol), "vs reference"
    assert torch.all((got - cpu.to(CUDA)).abs() <= 2 * atol), "vs CPU kernel"


# ---- streams -------------------------------------------------------------------------


# GPU cycles to stall a stream for (~0.1 s), so that late work would visibly race.
SLEEP_CYCLES = 200_000_000


def _all_ops(logits, labels, x, mask, upstream):
    """Every op, forward and backward, each launched without a host sync before it where the op allows.

    The fused log-prob op checks the labels on the host (a sync) before its
    launch, so it comes last; its backward launches without one.
    """
    leaf = logits.detach().requires_grad_()
    entropy = ops.token_entropy(leaf, temperature=0.7)
    out = {
        "entropy": entropy.detach(),
        "kl": ops.kl_penalty(x, x * 0.5, estimator="k3"),
        "mean": ops.masked_mean(x, mask, dim=-1),
        "var": ops.masked_var(x, mask),
        "whiten": ops.masked_whiten(x, mask),
        "advantages": ops.gae(x[:, :100], x[:, 100:200], mask[:, :100], gamma=0.9, lam=0.8)[0],
        "group": ops.group_advantages(x[:, :64], 8),
    }
    out["entropy grad"] = torch.autograd.grad(entropy, leaf, grad_outputs=upstream())[0]
    leaf = logits.detach().requires_grad_()
    logprobs, entropy = ops.token_logprobs_and_entropy(leaf, labels, temperature=0.7)
    out["logprobs"], out["fused entropy"] = logprobs.detach(), entropy.detach()
    out["logprobs grad"] = torch.autograd.grad(logprobs, leaf, grad_outputs=upstream())[0]
    return out


def test_ops_run_on_the_current_stream():
    """Inputs are written on a side stream after a long sleep; ops called on that stream must see them.

    An op that launched on the default stream instead would run before the writes
    (PyTorch's side streams do not synchronize with the default stream) and read
    zeros. The upstream gradients of each backward are written after another sleep.
    """
    logits_values = make_logits((64, 4099), torch.bfloat16)
    labels = make_labels(logits_values)
    x_values = torch.randn(64, 4099, device=CUDA)
    mask = make_mask((64, 4099), "bool")
    upstream_values = torch.randn(64, device=CUDA)
    logits, x = torch.zeros_like(logits_values), torch.zeros_like(x_values)
    torch.cuda.synchronize()

    def late_upstream():
        upstream = torch.zeros_like(upstream_values)
        torch.cuda._sleep(SLEEP_CYCLES)
        upstream.copy_(upstream_values)
        return upstream

    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(SLEEP_CYCLES)
        logits.copy_(logits_values)
        x.copy_(x_values)
        results = _all_ops(logits, labels, x, mask, late_upstream)
    side.synchronize()

    expected = _all_ops(logits_values, labels, x_values, mask, lambda: upstream_values)
    for name, value in results.items():
        # the same kernels on the same values
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-5, msg=name)


# ---- torch.compile and opcheck on the GPU --------------------------------------------


def test_compiled_fused_op_on_cuda():
    labels = make_labels(torch.empty(4, 5, 1000, device=CUDA))
    mask = labels != IGNORE

    def loss_fn(logits):
        logprobs, entropy = ops.token_logprobs_and_entropy(logits, labels, temperature=0.9)
        return -ops.masked_mean(logprobs, mask) - 0.01 * ops.masked_mean(entropy, mask)

    logits = make_logits((4, 5, 1000), torch.bfloat16).requires_grad_()
    eager_logits = logits.detach().clone().requires_grad_()
    loss = torch.compile(loss_fn, fullgraph=True)(logits)
    expected = loss_fn(eager_logits)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(
        torch.autograd.grad(loss, logits)[0], torch.autograd.grad(expected, eager_logits)[0], rtol=0, atol=1e-5
    )


def _cuda_opcheck_cases():
    logits = torch.randn(3, 5, 37, device=CUDA)
    labels = torch.randint(0, 37, (3, 5), device=CUDA)
    labels[0, 1] = IGNORE
    lse = torch.logsumexp(logits / 0.7, -1)
    entropy = torch.rand(3, 5, device=CUDA)
    grad = torch.randn(3, 5, device=CUDA)
    logprobs, ref_logprobs = -torch.rand(4, 9, device=CUDA), -torch.rand(4, 9, device=CUDA)
    x = torch.randn(4, 9, device=CUDA)
    mask = make_mask((4, 9), "bool")
    return [
        ("logprobs_entropy_forward", (logits.clone().requires_grad_(), labels, 0.7, IGNORE, True, True)),
        ("logprobs_entropy_forward", (logits.bfloat16(), None, 1.3, IGNORE, False, True)),
        ("logprobs_entropy_backward", (grad, grad, logits, labels, lse, entropy, 0.7, IGNORE)),
        ("logprobs_entropy_backward", (None, grad, logits.half(), None, lse, entropy, 0.7, IGNORE)),
        ("kl_penalty_forward", (logprobs.clone().requires_grad_(), ref_logprobs.clone().requires_grad_(), 3)),
        ("kl_penalty_backward", (torch.randn(4, 9, device=CUDA), logprobs, ref_logprobs, 1)),
        ("masked_moments", (x.clone().requires_grad_(), mask)),
        ("masked_whiten", (x.clone().requires_grad_(), mask, False, 1e-8)),
        ("gae", (torch.randn(4, 9, device=CUDA), torch.randn(4, 9, device=CUDA), mask, 0.9, 0.8, True)),
        ("group_advantages", (torch.randn(3, 4, device=CUDA), make_mask((3, 4), "bool"), 4, True, True, 1e-6)),
    ]


def test_opcheck_on_cuda():
    for name, args in _cuda_opcheck_cases():
        try:
            torch.library.opcheck(getattr(torch.ops.aligner, name).default, args)
        except Exception as error:
            raise AssertionError(f"opcheck of aligner::{name} on CUDA failed") from error


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_a_nan_anywhere_in_a_row_makes_the_row_nan(dtype):
    """As on the CPU (tests/ops/test_cpu_capabilities.py): NaN entropy and gradient rows, NaN log-prob if scored."""
    logits = torch.randn(6, 3000, device=CUDA).to(dtype)
    logits[1, 2500] = logits[2, 0] = logits[3, 17] = logits[4, 9] = float("nan")
    labels = torch.tensor([0, 3, 1, -100, -100, 7], device=CUDA)
    x = logits.clone().requires_grad_()
    lp, ent = ops.token_logprobs_and_entropy(x, labels)
    weights = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0], device=CUDA)
    (lp.sum() + (ent * weights).sum()).backward()
    nan_rows = [False, True, True, True, True, False]
    assert lp.isnan().tolist() == [False, True, True, False, False, False]
    assert ent.isnan().tolist() == nan_rows
    assert x.grad.float().isnan().all(-1).tolist() == nan_rows
    assert x.grad.float().isnan().any(-1).tolist() == nan_rows


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_argmax_on_the_gpu_composes_cublas_and_the_row_ops(dtype):
    """On a GPU, linear_greedy is F.linear (cuBLAS) + argmax + a float32 log-sum-exp: the engine's decode head.

    Tokens equal the argmax of the same cuBLAS logits; the log-prob of each token is the float64
    log-softmax of those logits (as rounded to ``dtype``) to float32 precision, and agrees with the
    CPU fused kernel's on float32 inputs wherever the argmax is decided.
    """
    hidden = torch.randn(33, 256, device=CUDA).to(dtype)
    weight = (torch.randn(32768, 256, device=CUDA) / 4).to(dtype)
    tokens, logprobs = ops.linear_greedy(hidden, weight)
    logits = hidden @ weight.T
    assert torch.equal(tokens, logits.argmax(-1))
    expected = torch.log_softmax(logits.double(), -1).gather(-1, tokens[:, None]).squeeze(-1)
    assert logprobs.dtype == torch.float32
    assert_close(logprobs.double(), expected, atol=FORWARD_ULPS * FP32_ROUNDOFF * (1 + logits.abs().max().item()))
    if dtype == torch.float32:
        cpu_tokens, cpu_logprobs = ops.linear_greedy(hidden.cpu(), weight.cpu())
        top2 = logits.double().topk(2, dim=-1).values
        decided = ((top2[:, 0] - top2[:, 1]) > 1e-3).cpu()
        assert torch.equal(cpu_tokens[decided], tokens.cpu()[decided])
        assert_close(cpu_logprobs[decided].double(), logprobs.cpu()[decided].double(), atol=1e-4)
