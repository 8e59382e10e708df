"""group_advantages (GRPO mean/std, Dr. GRPO, RLOO): hand-worked groups, then random ones vs the reference."""

import math

import pytest
import torch

from aligner import ops
from aligner.ops import reference

BASELINES = ["mean", "leave_one_out"]
SCALES = ["std", None]
FP32_ROUNDOFF = 2.0**-24
# fp32 sums over a group of G rewards err by up to ~G roundoffs of the largest |reward|;
# the advantage divides that by (std + eps). GROUP_ULPS gives headroom over it.
GROUP_ULPS = 16

# Two groups of G = 3, with eps = 0 so the numbers are exact:
#   [1, 2, 3]: mean 2, squared deviations 1 + 0 + 1 = 2, unbiased std sqrt(2 / 2) = 1
#   [0, 4, 8]: mean 4, squared deviations 16 + 0 + 16 = 32, unbiased std sqrt(32 / 2) = 4
# leave-one-out baselines b_i = (sum - r_i) / 2:
#   [1, 2, 3]: sum 6 -> b = [2.5, 2, 1.5], A = [-1.5, 0, 1.5]
#   [0, 4, 8]: sum 12 -> b = [6, 4, 2],    A = [-6, 0, 6]
HAND_REWARDS = [1.0, 2.0, 3.0, 0.0, 4.0, 8.0]
HAND_WORKED = {
    ("mean", "std"): [-1.0, 0.0, 1.0, -1.0, 0.0, 1.0],  # (r - mean) / std
    ("mean", None): [-1.0, 0.0, 1.0, -4.0, 0.0, 4.0],  # r - mean
    ("leave_one_out", "std"): [-1.5, 0.0, 1.5, -1.5, 0.0, 1.5],  # [-1.5, 0, 1.5] / 1 and [-6, 0, 6] / 4
    ("leave_one_out", None): [-1.5, 0.0, 1.5, -6.0, 0.0, 6.0],
}


@pytest.mark.parametrize("shape", [(6,), (2, 3)], ids=str)
@pytest.mark.parametrize(("baseline", "scale"), list(HAND_WORKED), ids=str)
def test_hand_worked(baseline, scale, shape):
    rewards = torch.tensor(HAND_REWARDS).reshape(shape)
    expected = torch.tensor(HAND_WORKED[baseline, scale]).reshape(shape)
    for module in (ops, reference):
        got = module.group_advantages(rewards, 3, baseline=baseline, scale=scale, eps=0.0)
        torch.testing.assert_close(got, expected.to(got.dtype), msg=module.__name__)


def test_eps_is_added_to_the_std():
    # [1, 2, 3] has std 1: (r - 2) / (1 + 0.5)
    got = ops.group_advantages(torch.tensor([1.0, 2.0, 3.0]), 3, eps=0.5)
    torch.testing.assert_close(got, torch.tensor([-1 / 1.5, 0.0, 1 / 1.5]))


# [1, 3, 100] with the 100 invalid: mean 2, squared deviations 1 + 1 = 2, unbiased std sqrt(2 / 1);
# leave-one-out baselines 3 and 1. The invalid sample gets 0.
VALID_WORKED = {
    ("mean", None): [-1.0, 1.0, 0.0],
    ("mean", "std"): [-1 / math.sqrt(2), 1 / math.sqrt(2), 0.0],
    ("leave_one_out", None): [-2.0, 2.0, 0.0],
    ("leave_one_out", "std"): [-2 / math.sqrt(2), 2 / math.sqrt(2), 0.0],
}


@pytest.mark.parametrize("valid_dtype", [torch.bool, torch.int64, torch.float32], ids=str)
@pytest.mark.parametrize(("baseline", "scale"), list(VALID_WORKED), ids=str)
def test_hand_worked_with_invalid_sample(baseline, scale, valid_dtype):
    rewards = torch.tensor([1.0, 3.0, 100.0])
    valid = torch.tensor([1, 1, 0]).to(valid_dtype)
    got = ops.group_advantages(rewards, 3, baseline=baseline, scale=scale, eps=0.0, valid=valid)
    torch.testing.assert_close(got, torch.tensor(VALID_WORKED[baseline, scale]))


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("baseline", BASELINES)
def test_groups_with_at_most_one_valid_sample_get_zero(baseline, scale):
    rewards = torch.tensor([[5.0, 7.0, 9.0], [1.0, 2.0, 4.0], [3.0, 3.0, 3.0]])
    valid = torch.tensor([[False, True, False], [False, False, False], [True, True, True]])
    got = ops.group_advantages(rewards, 3, baseline=baseline, scale=scale, valid=valid)
    assert torch.all(got == 0)  # one valid, none valid, all equal


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("baseline", BASELINES)
def test_group_size_one_gives_zero(baseline, scale):
    got = ops.group_advantages(torch.randn(9), 1, baseline=baseline, scale=scale)
    assert torch.all(got == 0)


def group_divisor(rewards, group_size, valid, scale, eps):
    """Per sample: the group's unbiased std + eps (1 when not scaling), in float64."""
    r = rewards.double().reshape(-1, group_size)
    ok = torch.ones_like(r, dtype=torch.bool) if valid is None else (valid != 0).reshape(r.shape)
    n = ok.sum(-1, keepdim=True)
    mean = torch.where(ok, r, 0).sum(-1, keepdim=True) / n.clamp_min(1)
    var = torch.where(ok, (r - mean) ** 2, 0).sum(-1, keepdim=True) / (n - 1).clamp_min(1)
    divisor = var.sqrt() + eps if scale == "std" else torch.ones_like(var)
    return divisor.expand_as(r).reshape(rewards.shape)


def check_against_reference(rewards, group_size, baseline, scale, valid, eps=1e-6):
    got = ops.group_advantages(rewards, group_size, baseline=baseline, scale=scale, eps=eps, valid=valid)
    expected = reference.group_advantages(rewards, group_size, baseline=baseline, scale=scale, eps=eps, valid=valid)
    assert got.shape == rewards.shape
    if rewards.dtype == torch.float64:
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        return got
    assert got.dtype == torch.float32
    if valid is not None:
        assert torch.all(got[valid == 0] == 0)
    largest = rewards.double().abs().max().item() if rewards.numel() else 0.0
    divisor = group_divisor(rewards, group_size, valid, scale, eps)
    # error of (r - b) over the divisor, and the divisor's own relative error times |A|
    atol = GROUP_ULPS * FP32_ROUNDOFF * group_size * (largest / divisor + expected.abs())
    error = (got.double() - expected).abs()
    assert torch.all(error <= atol), f"max error {error.max().item():.3e}, worst excess {(error - atol).max():.3e}"
    return got


@pytest.mark.parametrize("with_valid", [False, True])
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("baseline", BASELINES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize(
    ("prompts", "group_size", "two_d"),
    [(1, 1, False), (7, 2, True), (5, 5, False), (3, 16, True), (4, 64, False)],
    ids=str,
)
def test_matches_reference(prompts, group_size, two_d, dtype, baseline, scale, with_valid):
    shape = (prompts, group_size) if two_d else (prompts * group_size,)
    rewards = (torch.randn(shape) * 3 + 1).to(dtype)
    valid = torch.rand(shape) < 0.7 if with_valid else None
    check_against_reference(rewards, group_size, baseline, scale, valid)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("baseline", BASELINES)
def test_binary_rewards(baseline, scale):
    """GRPO's usual 0/1 rewards: all-equal groups (all right, all wrong) have exactly 0 advantage."""
    rewards = (torch.rand(32, 8) < 0.5).float()
    rewards[0], rewards[1] = 1.0, 0.0
    got = check_against_reference(rewards, 8, baseline, scale, None)
    assert torch.all(got[:2] == 0)


def test_not_differentiable():
    rewards = torch.randn(8, requires_grad=True)
    assert not ops.group_advantages(rewards, 4).requires_grad


INPUT_ERRORS = (ValueError, TypeError, IndexError, RuntimeError)
R = torch.randn(12)
BAD_CALLS = {
    "numel not divisible": ("group_size", lambda: ops.group_advantages(R, 5)),
    "group_size 0": ("group_size", lambda: ops.group_advantages(R, 0)),
    "unknown baseline": ("baseline", lambda: ops.group_advantages(R, 4, baseline="median")),
    "unknown scale": ("scale", lambda: ops.group_advantages(R, 4, scale="mad")),
    "valid shape": ("valid", lambda: ops.group_advantages(R, 4, valid=torch.ones(11, dtype=torch.bool))),
    "integer rewards": ("rewards", lambda: ops.group_advantages(R.long(), 4)),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_input_names_the_argument(case):
    argument, call = BAD_CALLS[case]
    with pytest.raises(INPUT_ERRORS, match=rf"\b{argument}\b"):
        call()
