"""masked_mean, masked_var and masked_whiten against the float64 reference."""

import math

import pytest
import torch
from assertions import assert_close

from aligner import ops
from aligner.ops import reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MASK_KINDS = ["bool", "float", "int"]
# (shape, dim) pairs: dim=None reduces everything to a 0-d result.
SHAPES_AND_DIMS = [
    ((1,), None),
    ((1,), 0),
    ((17,), -1),
    ((4, 33), None),
    ((4, 33), 0),
    ((4, 33), -1),
    ((2, 3, 5), None),
    ((2, 3, 5), 1),
    ((2, 3, 5), -1),
    ((3, 4099), -1),
]

FP32_ROUNDOFF = 2.0**-24
# fp32 sums of n terms (blocked, vectorized): error ~ sqrt(n) roundoffs of the largest
# term for random rounding; SUM_ULPS gives headroom over that.
SUM_ULPS = 8
# Gradients are computed in fp32 and rounded once to x's dtype: unit roundoff 2^-24
# (fp32), 2^-8 (bf16: 8 significant bits), 2^-11 (fp16: 11 significant bits).
GRAD_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
# fp16 values below 2^-14 are subnormal, spaced 2^-24 apart: half that, absolute.
GRAD_SUBNORMAL_ATOL = {torch.float32: 0.0, torch.bfloat16: 0.0, torch.float16: 2.0**-25}


def sum_atol(x, n):
    """Error bound of an fp32 sum of n terms of x's size."""
    largest = x.double().abs().max().item() if x.numel() else 0.0
    return SUM_ULPS * FP32_ROUNDOFF * math.sqrt(max(n, 1)) * largest


def make_mask(shape, kind, p_valid=0.6):
    """A random mask of the given kind; any nonzero value means valid."""
    valid = torch.rand(shape) < p_valid
    if kind == "bool":
        return valid
    if kind == "float":  # weights other than 1, negative ones included, still just "valid"
        return valid * torch.tensor([0.5, 1.0, -2.0])[torch.randint(0, 3, shape)]
    return valid.long() * torch.randint(1, 4, shape)


def make_x(shape, dtype):
    """Values with a nonzero mean, so the variance is a difference of large sums if done naively."""
    return (torch.randn(shape) * 2 + torch.randn(()) * 10).to(dtype)


def grads(fn, x, mask, dim, weights):
    x = x.clone().requires_grad_()
    out = fn(x, mask, dim)
    (grad,) = torch.autograd.grad((out * weights.to(out.dtype)).sum(), x)
    return out.detach(), grad


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "dim"), SHAPES_AND_DIMS, ids=str)
def test_masked_mean_and_var(shape, dim, dtype, kind):
    x, mask = make_x(shape, dtype), make_mask(shape, kind)
    n = x.numel() if dim is None else x.shape[dim]
    fewest_valid = max(1, int((mask != 0).sum() if dim is None else (mask != 0).sum(dim).min()))
    result_shape = () if dim is None else x.sum(dim).shape
    weights = torch.randn(result_shape)
    for name in ("masked_mean", "masked_var"):
        got, got_grad = grads(getattr(ops, name), x, mask, dim, weights)
        expected, expected_grad = grads(getattr(reference, name), x.double(), mask, dim, weights)
        assert got.dtype == torch.float32 and got.shape == result_shape, name
        assert got_grad.dtype == dtype, name
        centered = x.double() - reference.masked_mean(x, mask)
        if name == "masked_mean":
            atol = sum_atol(x, n)
            # d mean / d x_i = valid_i / count: one fp32 division
            grad_atol = 4 * FP32_ROUNDOFF * weights.abs().max().item() / fewest_valid
        else:
            atol = sum_atol(centered * centered, n) + 4 * sum_atol(x, n) * centered.abs().max().item()
            # d var / d x_i = 2 (x_i - mean) valid_i / count: the mean's error and the
            # rounding of x_i - mean, times 2 / count
            grad_atol = 2 * (sum_atol(x, n) + 4 * sum_atol(x, 1)) * weights.abs().max().item() / fewest_valid
        assert_close(got, expected, atol, name=name)
        assert_close(
            got_grad, expected_grad, grad_atol + GRAD_SUBNORMAL_ATOL[dtype], GRAD_ROUNDOFF[dtype], name=f"{name} grad"
        )


@pytest.mark.parametrize("dim", [None, 0, -1])
def test_float64_is_float64(dim):
    x, mask = make_x((5, 8), torch.float64), make_mask((5, 8), "bool")
    for name in ("masked_mean", "masked_var"):
        got = getattr(ops, name)(x, mask, dim)
        assert got.dtype == torch.float64
        assert_close(got, getattr(reference, name)(x, mask, dim), 1e-12, 1e-12, name=name)


def test_many_elements_fp32():
    """200k values around 100 with variance ~4: a naive E[x^2] - E[x]^2 would lose ~1e-3."""
    x = torch.randn(200_000) * 2 + 100
    mask = make_mask(x.shape, "bool", 0.9)
    for name in ("masked_mean", "masked_var"):
        got = getattr(ops, name)(x, mask)
        expected = getattr(reference, name)(x, mask)
        atol = sum_atol(x, x.numel()) * (1 if name == "masked_mean" else 10 * 4)
        assert_close(got, expected, atol, name=name)


@pytest.mark.parametrize("dim", [None, 0, -1])
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_empty_mask_gives_zero_not_nan(kind, dim):
    x = torch.randn(3, 6, requires_grad=True)
    mask = make_mask((3, 6), kind, p_valid=0.0)
    for fn in (ops.masked_mean, ops.masked_var):
        out = fn(x, mask, dim)
        assert torch.all(out == 0), fn.__name__
        (grad,) = torch.autograd.grad(out.sum(), x)
        assert torch.all(grad == 0), fn.__name__


def test_rows_without_valid_entries_are_zero():
    x = make_x((4, 9), torch.float32)
    mask = make_mask((4, 9), "bool")
    mask[1] = False
    mask[:, 2] = False
    for fn in (ops.masked_mean, ops.masked_var):
        assert fn(x, mask, -1)[1] == 0
        assert fn(x, mask, 0)[2] == 0
        assert_close(fn(x, mask, -1), getattr(reference, fn.__name__)(x, mask, -1), 1e-5, 1e-6)


def test_masked_positions_do_not_leak():
    """Whatever sits under mask == 0 (here inf and NaN) has no effect."""
    x = make_x((4, 9), torch.float32)
    mask = make_mask((4, 9), "bool")
    mask[0, 0], mask[1, 1] = False, False
    garbage = x.clone()
    garbage[0, 0], garbage[1, 1] = float("inf"), float("nan")
    for dim in (None, -1):
        torch.testing.assert_close(ops.masked_mean(garbage, mask, dim), ops.masked_mean(x, mask, dim))
        torch.testing.assert_close(ops.masked_var(garbage, mask, dim), ops.masked_var(x, mask, dim))
    torch.testing.assert_close(ops.masked_whiten(garbage, mask), ops.masked_whiten(x, mask))


def whiten_grads(module, x, mask, shift_mean, weights):
    x = x.clone().requires_grad_()
    out = module.masked_whiten(x, mask, shift_mean=shift_mean)
    (grad,) = torch.autograd.grad((out * weights.to(out.dtype)).sum(), x)
    return out.detach(), grad


@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1,), (2,), (37,), (4, 33), (2, 3, 1000)], ids=str)
def test_masked_whiten(shape, dtype, kind, shift_mean):
    x, mask = make_x(shape, dtype), make_mask(shape, kind)
    mask.view(-1)[0] = 1  # at least one valid entry
    weights = torch.randn(shape)
    got, got_grad = whiten_grads(ops, x, mask, shift_mean, weights)
    expected, expected_grad = whiten_grads(reference, x.double(), mask, shift_mean, weights)
    assert got.dtype == torch.float32 and got.shape == x.shape
    assert got_grad.dtype == dtype
    assert torch.all(got[mask == 0] == 0)
    n = int((mask != 0).sum())
    mean = reference.masked_mean(x, mask).item()
    rstd = 1 / math.sqrt(reference.masked_var(x, mask).item() + 1e-8)
    # (x - mean) * rstd: the mean's error times rstd, plus the relative error of rstd
    # times the output, plus the added-back mean's own rounding.
    atol = sum_atol(x, n) * rstd * (1 + expected.abs().max().item()) + 4 * FP32_ROUNDOFF * abs(mean)
    assert_close(got, expected, atol, 4 * FP32_ROUNDOFF, name="masked_whiten")
    # dx = valid rstd (g - mean(g) - y mean(g y)) [+ valid mean(g)]: sums of n fp32 terms, plus
    # y's own forward error (atol) carried through rstd * mean(g y): with two close values the
    # whitening is ill-conditioned (rstd large) and that term dominates.
    weight_max = weights.abs().max().item()
    grad_atol = (sum_atol(weights, n) * (rstd + 1) * (1 + expected.abs().max().item()) + atol * rstd * weight_max) * 4
    assert_close(
        got_grad,
        expected_grad,
        grad_atol + GRAD_SUBNORMAL_ATOL[dtype],
        GRAD_ROUNDOFF[dtype],
        name="masked_whiten grad",
    )


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_empty_mask_is_zero(shift_mean):
    x = torch.randn(3, 5, requires_grad=True)
    out = ops.masked_whiten(x, torch.zeros(3, 5, dtype=torch.bool), shift_mean=shift_mean)
    assert torch.all(out == 0)
    out.sum().backward()
    assert torch.all(x.grad == 0)


def test_masked_whiten_has_zero_mean_unit_variance():
    x, mask = make_x((8, 50), torch.float32), make_mask((8, 50), "float")
    out = ops.masked_whiten(x, mask)
    assert abs(ops.masked_mean(out, mask).item()) < 1e-5
    assert abs(ops.masked_var(out, mask).item() - 1) < 1e-4


@pytest.mark.parametrize("dim", [None, 0, 1, -1])
def test_gradcheck_masked_mean_and_var(dim):
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    mask = make_mask((4, 6), "float")
    mask[0] = 0  # a row without valid entries
    mask[1, 0] = 1
    assert torch.autograd.gradcheck(lambda t: ops.masked_mean(t, mask, dim), (x,))
    assert torch.autograd.gradcheck(lambda t: ops.masked_var(t, mask, dim), (x,))


@pytest.mark.parametrize("shift_mean", [True, False])
def test_gradcheck_masked_whiten(shift_mean):
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    mask = make_mask((3, 7), "int")
    mask[0, :2] = 1
    assert torch.autograd.gradcheck(lambda t: ops.masked_whiten(t, mask, shift_mean=shift_mean), (x,))


INPUT_ERRORS = (ValueError, TypeError, IndexError, RuntimeError)
X = torch.randn(3, 4)
MASK = torch.ones(3, 4, dtype=torch.bool)
BAD_CALLS = {
    "masked_mean mask shape": ("mask", lambda: ops.masked_mean(X, MASK[:, :3])),
    "masked_mean mask transposed": ("mask", lambda: ops.masked_mean(X, MASK.T)),
    "masked_var mask shape": ("mask", lambda: ops.masked_var(X, MASK[0], dim=-1)),
    "masked_whiten mask shape": ("mask", lambda: ops.masked_whiten(X, MASK.view(-1))),
    "masked_mean dim out of range": ("dim", lambda: ops.masked_mean(X, MASK, dim=2)),
    "masked_var dim out of range": ("dim", lambda: ops.masked_var(X, MASK, dim=-3)),
    "integer x": ("x", lambda: ops.masked_mean(X.long(), MASK)),
    "negative eps": ("eps", lambda: ops.masked_whiten(X, MASK, eps=-1.0)),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_input_names_the_argument(case):
    argument, call = BAD_CALLS[case]
    with pytest.raises(INPUT_ERRORS, match=rf"\b{argument}\b"):
        call()
