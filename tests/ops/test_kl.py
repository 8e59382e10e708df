"""kl_penalty (k1, abs, k2, k3) against the float64 reference, forward and backward."""

import math

import pytest
import torch
from assertions import assert_close

from aligner import ops
from aligner.ops import reference

ESTIMATORS = ["k1", "abs", "k2", "k3"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1,), (7,), (3, 17), (2, 3, 1000)]

# Forward: fp32 arithmetic on the same rounded inputs the reference sees. d = a - b
# rounds once, and k3 adds exp(-d) (a few ulps) to d - 1, so the error is a few
# fp32 roundoffs (2^-24) of the largest term, 1 + |d| + exp(-d).
FORWARD_ULPS = 16
FP32_ROUNDOFF = 2.0**-24
# Backward: the fp32 gradient (1, sign d, d or 1 - exp(-d), times the upstream weight) is
# rounded once to each input's dtype: unit roundoff 2^-24 (fp32), 2^-8 (bf16), 2^-11 (fp16).
GRAD_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
# fp16 values below 2^-14 are subnormal, spaced 2^-24 apart: half that, absolute.
GRAD_SUBNORMAL_ATOL = {torch.float32: 0.0, torch.bfloat16: 0.0, torch.float16: 2.0**-25}
FLOAT64_ATOL = 1e-12


def make_logprobs(shape, dtype):
    """Log-probabilities of a policy and a reference policy that differ by up to ~+-6 nats."""
    logprobs = -torch.rand(shape) * 8
    ref_logprobs = logprobs + torch.randn(shape) * 2
    return logprobs.to(dtype), ref_logprobs.clamp_max(0).to(dtype)


def check_against_reference(logprobs, ref_logprobs, estimator):
    weights = torch.randn(logprobs.shape)

    def value_and_grads(module, a, b):
        a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
        kl = module.kl_penalty(a, b, estimator=estimator)
        return (kl.detach(), *torch.autograd.grad((kl * weights.to(kl.dtype)).sum(), (a, b)))

    got, got_grad_a, got_grad_b = value_and_grads(ops, logprobs, ref_logprobs)
    expected, expected_grad_a, expected_grad_b = value_and_grads(reference, logprobs.double(), ref_logprobs.double())
    is_double = torch.float64 in (logprobs.dtype, ref_logprobs.dtype)
    assert got.dtype == (torch.float64 if is_double else torch.float32)
    assert got_grad_a.dtype == logprobs.dtype and got_grad_b.dtype == ref_logprobs.dtype
    d = logprobs.double() - ref_logprobs.double()
    largest_term = (1 + d.abs() + torch.exp(-d)).max().item() if d.numel() else 1.0
    if is_double:
        assert_close(got, expected, FLOAT64_ATOL, 1e-12, name=f"{estimator} forward")
        assert_close(got_grad_a, expected_grad_a, FLOAT64_ATOL, 1e-12, name=f"{estimator} grad logprobs")
        assert_close(got_grad_b, expected_grad_b, FLOAT64_ATOL, 1e-12, name=f"{estimator} grad ref_logprobs")
        return got
    atol = FORWARD_ULPS * FP32_ROUNDOFF * largest_term
    assert_close(got, expected, atol, name=f"{estimator} forward")
    grad_atol = atol * weights.abs().max().item()
    for name, got_grad, expected_grad, dtype in (
        ("logprobs", got_grad_a, expected_grad_a, logprobs.dtype),
        ("ref_logprobs", got_grad_b, expected_grad_b, ref_logprobs.dtype),
    ):
        assert_close(
            got_grad,
            expected_grad,
            grad_atol + GRAD_SUBNORMAL_ATOL[dtype],
            GRAD_ROUNDOFF[dtype],
            name=f"{estimator} grad {name}",
        )
    return got


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_matches_reference(estimator, shape, dtype):
    check_against_reference(*make_logprobs(shape, dtype), estimator)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_float64(estimator):
    check_against_reference(*make_logprobs((4, 33), torch.float64), estimator)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_mixed_dtypes(estimator):
    logprobs, ref_logprobs = make_logprobs((5, 19), torch.float32)
    check_against_reference(logprobs, ref_logprobs.bfloat16(), estimator)
    check_against_reference(logprobs.half(), ref_logprobs, estimator)


def test_estimators_by_definition():
    d = torch.tensor([-2.0, -0.5, 0.5, 3.0])
    ref_logprobs = torch.full((4,), -1.0)
    logprobs = ref_logprobs + d

    def kl(estimator):
        return ops.kl_penalty(logprobs, ref_logprobs, estimator=estimator)

    torch.testing.assert_close(kl("k1"), d)
    torch.testing.assert_close(kl("abs"), torch.tensor([2.0, 0.5, 0.5, 3.0]))
    torch.testing.assert_close(kl("k2"), torch.tensor([2.0, 0.125, 0.125, 4.5]))
    # k3 = exp(-d) + d - 1: e^2 - 3, e^0.5 - 1.5, e^-0.5 - 0.5, e^-3 + 2
    expected_k3 = torch.tensor([math.e**2 - 3, math.e**0.5 - 1.5, math.e**-0.5 - 0.5, math.e**-3 + 2])
    torch.testing.assert_close(kl("k3"), expected_k3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_k3_is_nonnegative_and_zero_at_equal_logprobs(dtype):
    logprobs, ref_logprobs = make_logprobs((1000,), dtype)
    assert torch.all(ops.kl_penalty(logprobs, ref_logprobs, estimator="k3") >= 0)
    for estimator in ESTIMATORS:
        assert torch.all(ops.kl_penalty(logprobs, logprobs, estimator=estimator) == 0)


def test_empty():
    empty = torch.zeros(0, 5)
    assert ops.kl_penalty(empty, empty, estimator="k3").shape == (0, 5)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_gradcheck_float64(estimator):
    logprobs, ref_logprobs = make_logprobs((3, 5), torch.float64)
    # keep |d| away from 0, where abs has a kink
    ref_logprobs = torch.where((logprobs - ref_logprobs).abs() < 1e-3, ref_logprobs - 0.1, ref_logprobs)
    inputs = (logprobs.requires_grad_(), ref_logprobs.requires_grad_())
    assert torch.autograd.gradcheck(lambda a, b: ops.kl_penalty(a, b, estimator=estimator), inputs)


INPUT_ERRORS = (ValueError, TypeError, IndexError, RuntimeError)
A = torch.randn(4, 3)
BAD_CALLS = {
    "unknown estimator": ("estimator", lambda: ops.kl_penalty(A, A, estimator="k4")),
    "estimator of the wrong case": ("estimator", lambda: ops.kl_penalty(A, A, estimator="K1")),
    "shapes differ": ("ref_logprobs", lambda: ops.kl_penalty(A, A[:, :2])),
    "broadcastable but not equal": ("ref_logprobs", lambda: ops.kl_penalty(A, A[:1])),
    "integer logprobs": ("logprobs", lambda: ops.kl_penalty(A.long(), A)),
    "integer ref_logprobs": ("ref_logprobs", lambda: ops.kl_penalty(A, A.long())),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_input_names_the_argument(case):
    argument, call = BAD_CALLS[case]
    with pytest.raises(INPUT_ERRORS, match=rf"\b{argument}\b"):
        call()
