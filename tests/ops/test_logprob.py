"""token_logprobs, token_entropy and the fused op against the float64 reference.

The reference sees the very values the kernel sees (the rounded bf16/fp16/fp32
logits, upcast to float64), so the forward error is the kernel's fp32
arithmetic alone, and the backward error is that plus one rounding to the
logits' dtype.
"""

import math

import pytest
import torch
from assertions import assert_close

from aligner import ops
from aligner.ops import reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TEMPERATURES = [1.0, 0.7, 1.3]
# Leading shape and vocabulary: N=1, V=1, V not a multiple of the vector width,
# a [2, 3, V] batch, and Llama-3's 128256 on few rows so the suite stays fast.
SHAPES = [(1, 1), (4, 1), (1, 7), (5, 17), (6, 1000), (2, 3, 4099), (3, 32768), (2, 128256)]
IGNORE = -100

FP32_ROUNDOFF = 2.0**-24
# Forward: both log p = z - lse and the entropy are of the size of the scaled logits
# z = logits / T, so the fp32 error is a few roundoffs of (1 + |z|max): rounding z, and
# the V-term sums of the log-sum-exp and entropy. Measured worst case on this grid is
# ~5 such units (V = 128256); plain torch.log_softmax in fp32 makes up to ~15.
FORWARD_ULPS = 32
# Backward: the fp32 gradient is w * (onehot - p) / T - w_H * p (log p + H) / T, whose
# error is the forward error scaled by the upstream weights (|p (log p + H)| <= 2 + log V);
# it is then rounded once to the logits' dtype: unit roundoff 2^-24 (fp32),
# 2^-8 (bf16: 8 significant bits), 2^-11 (fp16: 11 significant bits).
GRAD_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
# fp16 gradients below 2^-14 are subnormal, spaced 2^-24 apart: half that, absolute.
GRAD_SUBNORMAL_ATOL = {torch.float32: 0.0, torch.bfloat16: 0.0, torch.float16: 2.0**-25}
# float64 logits are computed in float64 end to end.
FLOAT64_ATOL = 1e-12


def forward_atol(logits, temperature):
    z_absmax = logits.double().abs().nan_to_num(posinf=0.0, neginf=0.0).max().item() / temperature
    return FORWARD_ULPS * FP32_ROUNDOFF * (1.0 + z_absmax)


def make_logits(shape, dtype):
    """Rows from nearly flat to sharply peaked (per-row scale in [0, 6))."""
    scale = torch.rand(*shape[:-1], 1) * 6
    return (torch.randn(shape) * scale).to(dtype)


def make_labels(logits, ignore_index=IGNORE):
    vocab = logits.shape[-1]
    labels = torch.randint(0, vocab, logits.shape[:-1])
    labels[torch.rand(labels.shape) < 0.25] = ignore_index
    return labels


def run_op(op, logits, labels, temperature, ignore_index=IGNORE):
    """The op's outputs and d(sum(out * w))/d logits for random weights w, kernel and reference."""
    weights = [torch.randn(logits.shape[:-1]) for _ in range(2)]

    def call(module, x):
        if op == "logprobs":
            return (module.token_logprobs(x, labels, temperature=temperature, ignore_index=ignore_index),)
        if op == "entropy":
            return (module.token_entropy(x, temperature=temperature),)
        return module.token_logprobs_and_entropy(x, labels, temperature=temperature, ignore_index=ignore_index)

    def outputs_and_grad(module, x):
        x = x.clone().requires_grad_()
        outs = call(module, x)
        loss = sum((out * w.to(out.dtype)).sum() for out, w in zip(outs, weights, strict=False))
        (grad,) = torch.autograd.grad(loss, x)
        return [out.detach() for out in outs], grad

    got, got_grad = outputs_and_grad(ops, logits)
    expected, expected_grad = outputs_and_grad(reference, logits.double())
    # |d log p / dz| <= 1 and |d H / dz| <= 2 + log V per unit of upstream weight
    output_kinds = {"logprobs": ["logprobs"], "entropy": ["entropy"], "fused": ["logprobs", "entropy"]}[op]
    sensitivity = {"logprobs": 1.0, "entropy": 2 + math.log(logits.shape[-1])}
    weight_scale = sum(
        w.abs().max().item() * sensitivity[kind] for w, kind in zip(weights, output_kinds, strict=False) if w.numel()
    )
    return got, got_grad, expected, expected_grad, weight_scale / temperature


def check_against_reference(op, logits, labels, temperature, ignore_index=IGNORE):
    got, got_grad, expected, expected_grad, grad_scale = run_op(op, logits, labels, temperature, ignore_index)
    dtype = logits.dtype
    atol = forward_atol(logits, temperature)
    for name, out, ref in zip(("first output", "second output"), got, expected, strict=False):
        assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), name
        assert out.shape == logits.shape[:-1], name
        assert_close(out, ref, FLOAT64_ATOL if dtype == torch.float64 else atol, name=f"{op} {name}")
    assert got_grad.dtype == dtype
    if dtype == torch.float64:
        assert_close(got_grad, expected_grad, FLOAT64_ATOL, name=f"{op} grad")
    else:
        grad_atol = atol * grad_scale + GRAD_SUBNORMAL_ATOL[dtype]
        assert_close(got_grad, expected_grad, grad_atol, GRAD_ROUNDOFF[dtype], name=f"{op} grad")
    return got, got_grad


@pytest.mark.parametrize("op", ["logprobs", "entropy", "fused"])
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(shape, dtype, temperature, op):
    logits = make_logits(shape, dtype)
    check_against_reference(op, logits, make_labels(logits), temperature)


@pytest.mark.parametrize("op", ["logprobs", "entropy", "fused"])
def test_float64_matches_reference_to_float64_precision(op):
    logits = make_logits((3, 5, 37), torch.float64)
    check_against_reference(op, logits, make_labels(logits), 0.9)


@pytest.mark.parametrize("ignore_index", [-100, -1, 0, 5, 17, 2**40])
def test_ignored_rows_are_zero_with_zero_grad(ignore_index):
    logits = make_logits((9, 17), torch.float32)
    labels = torch.randint(0, 17, (9,))
    labels[::2] = ignore_index
    ignored = labels == ignore_index
    got, grad = check_against_reference("logprobs", logits, labels, 1.3, ignore_index)
    assert torch.all(got[0][ignored] == 0)
    assert torch.all(grad[ignored] == 0)
    assert torch.all(got[0][~ignored] <= 0)


def test_fused_entropy_covers_ignored_rows():
    logits = make_logits((6, 33), torch.bfloat16)
    labels = torch.full((6,), IGNORE)
    (logprobs, entropy), _ = check_against_reference("fused", logits, labels, 0.7)
    assert torch.all(logprobs == 0)
    assert entropy.sum() > 0  # computed, not zeroed with the log-probs


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_huge_logits(dtype, temperature):
    logits = make_logits((8, 1000), torch.float32)
    logits[0] = torch.randn(1000) * 1e4  # a whole row at scale 1e4, fp16 overflows at 65504
    logits[0].clamp_(-6e4, 6e4)
    logits[1:, 3] = 1e4  # one dominant entry
    logits[2:, 7] = -1e4  # one negligible entry
    logits[4, :] = 1e4  # a flat row of huge values
    logits[5, ::2] = -1e4
    logits = logits.to(dtype)
    labels = make_labels(logits)
    labels[1] = 3
    labels[2] = 7  # log-prob ~ -2e4 / T
    for op in ("logprobs", "entropy", "fused"):
        check_against_reference(op, logits, labels, temperature)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_minus_inf_logits(dtype):
    logits = make_logits((7, 4099), torch.float32)
    labels = torch.randint(0, 4099, (7,))
    neg_inf = torch.rand(7, 4099) < 0.3
    neg_inf[torch.arange(7), labels] = False  # never the target
    neg_inf[3] = True
    neg_inf[3, labels[3]] = False  # a row with a single finite entry: log-prob 0, entropy 0
    neg_inf[4] = True
    neg_inf[4, labels[4]] = False
    neg_inf[4, (labels[4] + 1) % 4099] = False  # two finite entries
    logits[neg_inf] = float("-inf")
    logits = logits.to(dtype)
    labels[6] = IGNORE
    for op in ("logprobs", "entropy", "fused"):
        _, grad = check_against_reference(op, logits, labels, 0.7)
        assert torch.all(grad[neg_inf] == 0), op


@pytest.mark.parametrize("entropy_weight", [0.5, -1.0, 3.0, -1e3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_minus_inf_logit_gets_zero_entropy_grad(dtype, entropy_weight):
    """A -inf logit has p = 0 and gets gradient 0 (the limit of p log p), whatever the upstream weight."""
    logits = torch.tensor([[1.0, float("-inf"), 0.0, 2.5] * 5], dtype=dtype, requires_grad=True)
    (ops.token_entropy(logits, temperature=0.7) * entropy_weight).sum().backward()
    reference_logits = logits.detach().double().requires_grad_()
    (reference.token_entropy(reference_logits, temperature=0.7) * entropy_weight).sum().backward()
    atol = forward_atol(logits, 0.7) * abs(entropy_weight) * (2 + math.log(20)) / 0.7
    assert_close(logits.grad, reference_logits.grad, atol, GRAD_ROUNDOFF[dtype], name="entropy grad")


def test_int32_labels():
    logits = make_logits((5, 17), torch.bfloat16)
    labels = make_labels(logits)
    expected = ops.token_logprobs(logits, labels)
    torch.testing.assert_close(ops.token_logprobs(logits, labels.int()), expected, rtol=0, atol=0)
    check_against_reference("fused", logits, labels.int(), 1.0)


def test_strided_logits():
    base = make_logits((6, 2 * 37), torch.float32)
    logits = base[:, ::2]  # not contiguous
    check_against_reference("fused", logits, make_labels(logits), 1.3)
    check_against_reference("entropy", base.view(6, 2, 37).transpose(0, 1), None, 1.0)


def test_empty_batch():
    logits = torch.randn(0, 17, requires_grad=True)
    labels = torch.zeros(0, dtype=torch.long)
    logprobs, entropy = ops.token_logprobs_and_entropy(logits, labels)
    assert logprobs.shape == entropy.shape == (0,)
    (logprobs.sum() + entropy.sum()).backward()
    assert logits.grad.shape == (0, 17)


@pytest.mark.parametrize("used", ["logprobs", "entropy"])
def test_fused_backward_through_one_output(used):
    logits = make_logits((4, 65), torch.float32)
    labels = make_labels(logits)
    x = logits.clone().requires_grad_()
    logprobs, entropy = ops.token_logprobs_and_entropy(x, labels, temperature=0.7)
    (logprobs if used == "logprobs" else entropy).sum().backward()
    single = reference.token_logprobs if used == "logprobs" else reference.token_entropy
    xr = logits.double().requires_grad_()
    kwargs = {"temperature": 0.7} | ({"labels": labels} if used == "logprobs" else {})
    single(xr, **kwargs).sum().backward()
    assert_close(x.grad, xr.grad, forward_atol(logits, 0.7) * (3 + math.log(65)) / 0.7, name=used)


@pytest.mark.parametrize("temperature", [1.0, 1.3])
def test_gradcheck_float64(temperature):
    logits = torch.randn(2, 3, 7, dtype=torch.float64) * 2
    logits[0, 1, 2] = float("-inf")
    labels = torch.randint(0, 7, (2, 3))
    labels[0, 1] = 4
    labels[1, 0] = IGNORE
    x = logits.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: ops.token_logprobs(t, labels, temperature=temperature), (x,))
    assert torch.autograd.gradcheck(lambda t: ops.token_entropy(t, temperature=temperature), (x,))
    assert torch.autograd.gradcheck(lambda t: ops.token_logprobs_and_entropy(t, labels, temperature=temperature), (x,))


# Bad input may raise any of these; what matters is that the message names the argument.
INPUT_ERRORS = (ValueError, TypeError, IndexError, RuntimeError)
LOGITS = torch.randn(4, 11)
LABELS = torch.tensor([0, 10, -100, 3])
BAD_CALLS = {
    "label == V": ("labels", lambda: ops.token_logprobs(LOGITS, torch.tensor([0, 11, 2, 3]))),
    "negative label": ("labels", lambda: ops.token_logprobs_and_entropy(LOGITS, torch.tensor([0, -3, 2, 3]))),
    "label == default ignore_index with another one set": (
        "labels",
        lambda: ops.token_logprobs(LOGITS, LABELS, ignore_index=-1),
    ),
    "labels too short": ("labels", lambda: ops.token_logprobs(LOGITS, LABELS[:3])),
    "labels of another shape": ("labels", lambda: ops.token_logprobs(LOGITS, LABELS.view(2, 2))),
    "float labels": ("labels", lambda: ops.token_logprobs(LOGITS, LABELS.float())),
    "integer logits": ("logits", lambda: ops.token_logprobs(torch.randint(0, 5, (4, 11)), LABELS)),
    "integer logits, entropy": ("logits", lambda: ops.token_entropy(torch.randint(0, 5, (4, 11)))),
    "zero temperature": ("temperature", lambda: ops.token_logprobs(LOGITS, LABELS, temperature=0.0)),
    "negative temperature": ("temperature", lambda: ops.token_entropy(LOGITS, temperature=-1.0)),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_input_names_the_argument(case):
    argument, call = BAD_CALLS[case]
    with pytest.raises(INPUT_ERRORS, match=rf"\b{argument}\b"):
        call()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_backward_label_outside_shard(dtype):
    """The backward op gives a label outside [0, V) no one-hot term (the vocab-parallel contract)."""
    logits = make_logits((5, 33), dtype)
    lse = torch.logsumexp(logits.double(), dim=-1)
    grad_logprobs = torch.randn(5, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    outside = torch.full((5,), 33)  # one past the shard's last column
    stats_dtype = grad_logprobs.dtype
    grad = torch.ops.aligner.logprobs_entropy_backward(
        grad_logprobs, None, logits, outside, lse.to(stats_dtype), torch.empty(0, dtype=stats_dtype), 1.0, IGNORE
    )
    expected = -grad_logprobs.double()[:, None] * torch.softmax(logits.double(), dim=-1)
    # As in check_against_reference: the forward's fp32 error scaled by the upstream weight, then
    # one rounding to the logits' dtype.
    if dtype == torch.float64:
        assert_close(grad, expected, FLOAT64_ATOL, name="grad")
    else:
        atol = forward_atol(logits, 1.0) * grad_logprobs.abs().max().item()
        assert_close(grad, expected, atol, GRAD_ROUNDOFF[dtype], name="grad")


# ------------------------------------------------------------------ inputs that are not what they should be


@pytest.mark.parametrize(
    "call, named",
    [
        (lambda x, y: ops.token_logprobs(x.tolist(), y), "logits must be a torch.Tensor, got list"),
        (lambda x, y: ops.token_logprobs(x, y.tolist()), "labels must be a torch.Tensor, got list"),
        (lambda x, y: ops.token_entropy(3.0), "logits must be a torch.Tensor, got float"),
        (lambda x, y: ops.kl_penalty(x[:, 0], [0.0] * 3), "ref_logprobs must be a torch.Tensor, got list"),
        (lambda x, y: ops.masked_mean(x, x.tolist()), "mask must be a torch.Tensor, got list"),
        (lambda x, y: ops.gae(x, x, None, gamma=1.0, lam=1.0), "mask must be a torch.Tensor, got NoneType"),
        (lambda x, y: ops.linear_token_logprobs(x, "w", y), "weight must be a torch.Tensor, got str"),
    ],
)
def test_a_non_tensor_argument_is_a_type_error_naming_it(call, named):
    logits, labels = torch.randn(3, 7), torch.tensor([0, 1, 2])
    with pytest.raises(TypeError, match=named):
        call(logits, labels)


def test_tensors_on_another_device_are_refused():
    logits, labels = torch.randn(3, 7), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="labels is on meta but logits is on cpu"):
        ops.token_logprobs(logits, labels.to("meta"))
    with pytest.raises(ValueError, match="mask is on meta but x is on cpu"):
        ops.masked_whiten(logits, torch.ones(3, 7, device="meta"))
    meta = torch.randn(3, 7, device="meta")
    assert ops.token_logprobs(meta, labels.to("meta")).device.type == "meta"  # all on meta: shape inference works
