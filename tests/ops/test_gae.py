"""gae in both mask modes: hand-worked examples, then random masks against the float64 reference."""

import pytest
import torch

from aligner import ops
from aligner.ops import reference

MODES = ["zero", "carry_forward"]
DTYPES = [torch.float32, torch.bfloat16]
FP32_ROUNDOFF = 2.0**-24
# The fp32 scan adds ~3 rounded terms per step and carries the error back through
# gamma * lam <= 1, so after T steps it is at most ~3 T roundoffs of the largest
# |advantage| or |return|; SCAN_ULPS_PER_STEP gives headroom over that.
SCAN_ULPS_PER_STEP = 8

# Hand-worked: T = 3, gamma = 0.9, lam = 0.8 (gamma * lam = 0.72),
# rewards r = [1, 0, 2], values V = [0.5, 1.0, 1.5].
GAMMA, LAM = 0.9, 0.8
REWARDS = [[1.0, 0.0, 2.0]]
VALUES = [[0.5, 1.0, 1.5]]
# (mask, mode) -> (advantages, returns), computed by hand:
HAND_WORKED = {
    # all valid (both modes):
    #   t=2: delta = 2 + 0.9*0 - 1.5 = 0.5;     A2 = 0.5;                  R2 = 0.5 + 1.5 = 2.0
    #   t=1: delta = 0 + 0.9*1.5 - 1.0 = 0.35;  A1 = 0.35 + 0.72*0.5 = 0.71;   R1 = 1.71
    #   t=0: delta = 1 + 0.9*1.0 - 0.5 = 1.4;   A0 = 1.4 + 0.72*0.71 = 1.9112; R0 = 2.4112
    ((1, 1, 1), "zero"): ([1.9112, 0.71, 0.5], [2.4112, 1.71, 2.0]),
    ((1, 1, 1), "carry_forward"): ([1.9112, 0.71, 0.5], [2.4112, 1.71, 2.0]),
    # a hole at t=1, "zero": r1 = V1 = 0 inside the recurrence
    #   t=2: A2 = 0.5
    #   t=1: delta = 0 + 0.9*1.5 - 0 = 1.35;    A1 = 1.35 + 0.72*0.5 = 1.71 (output 0)
    #   t=0: delta = 1 + 0.9*0 - 0.5 = 0.5;     A0 = 0.5 + 0.72*1.71 = 1.7312; R0 = 2.2312
    ((1, 0, 1), "zero"): ([1.7312, 0.0, 0.5], [2.2312, 0.0, 2.0]),
    # a hole at t=1, "carry_forward": t=1 is skipped, so t=0 sees V_next = 1.5, A_next = 0.5
    #   t=0: delta = 1 + 0.9*1.5 - 0.5 = 1.85;  A0 = 1.85 + 0.72*0.5 = 2.21;   R0 = 2.71
    ((1, 0, 1), "carry_forward"): ([2.21, 0.0, 0.5], [2.71, 0.0, 2.0]),
    # right padding (both modes): the value after the last valid token is 0
    #   t=1: delta = 0 + 0 - 1.0 = -1;          A1 = -1;                   R1 = 0
    #   t=0: delta = 1 + 0.9*1.0 - 0.5 = 1.4;   A0 = 1.4 + 0.72*(-1) = 0.68; R0 = 1.18
    ((1, 1, 0), "zero"): ([0.68, -1.0, 0.0], [1.18, 0.0, 0.0]),
    ((1, 1, 0), "carry_forward"): ([0.68, -1.0, 0.0], [1.18, 0.0, 0.0]),
    # left padding (both modes): t=1, 2 as in the all-valid case, t=0 masked
    ((0, 1, 1), "zero"): ([0.0, 0.71, 0.5], [0.0, 1.71, 2.0]),
    ((0, 1, 1), "carry_forward"): ([0.0, 0.71, 0.5], [0.0, 1.71, 2.0]),
}


@pytest.mark.parametrize(("mask", "mode"), list(HAND_WORKED), ids=str)
def test_hand_worked(mask, mode):
    expected_advantages, expected_returns = HAND_WORKED[mask, mode]
    advantages, returns = ops.gae(
        torch.tensor(REWARDS), torch.tensor(VALUES), torch.tensor([mask]), gamma=GAMMA, lam=LAM, mask_mode=mode
    )
    torch.testing.assert_close(advantages, torch.tensor([expected_advantages]))
    torch.testing.assert_close(returns, torch.tensor([expected_returns]))
    ref_advantages, ref_returns = reference.gae(
        torch.tensor(REWARDS), torch.tensor(VALUES), torch.tensor([mask]), gamma=GAMMA, lam=LAM, mask_mode=mode
    )
    torch.testing.assert_close(ref_advantages, torch.tensor([expected_advantages], dtype=torch.float64))
    torch.testing.assert_close(ref_returns, torch.tensor([expected_returns], dtype=torch.float64))


def make_inputs(batch, length, dtype):
    rewards = (torch.randn(batch, length) * (torch.rand(batch, length) < 0.3)).to(dtype)  # sparse rewards
    values = torch.randn(batch, length).to(dtype)
    return rewards, values


def right_padded_mask(batch, length):
    lengths = torch.randint(0, length + 1, (batch,))
    lengths[0] = length  # one full row
    return torch.arange(length) < lengths[:, None]


def mask_with_holes(batch, length):
    """Multi-turn: valid tokens with masked (environment / user) spans between them, then padding."""
    mask = torch.rand(batch, length) < 0.6
    mask &= right_padded_mask(batch, length)
    return mask


def check_against_reference(rewards, values, mask, gamma, lam, mode):
    advantages, returns = ops.gae(rewards, values, mask, gamma=gamma, lam=lam, mask_mode=mode)
    ref_advantages, ref_returns = reference.gae(rewards, values, mask, gamma=gamma, lam=lam, mask_mode=mode)
    expected_dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    assert advantages.dtype == returns.dtype == expected_dtype
    assert advantages.shape == returns.shape == rewards.shape
    valid = mask != 0
    assert torch.all(advantages[~valid] == 0) and torch.all(returns[~valid] == 0)
    if expected_dtype == torch.float64:
        torch.testing.assert_close(advantages, ref_advantages, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(returns, ref_returns, rtol=1e-12, atol=1e-12)
        return advantages, returns
    length = rewards.shape[1]
    scale = max(ref_advantages.abs().max().item(), ref_returns.abs().max().item(), 1.0)
    atol = SCAN_ULPS_PER_STEP * FP32_ROUNDOFF * length * scale
    torch.testing.assert_close(advantages, ref_advantages.float(), rtol=0, atol=atol)
    torch.testing.assert_close(returns, ref_returns.float(), rtol=0, atol=atol)
    return advantages, returns


GAMMA_LAM = [(0.9, 0.8), (1.0, 0.95), (0.99, 1.0), (1.0, 1.0), (0.0, 0.5), (0.7, 0.0)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("gamma", "lam"), GAMMA_LAM, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("batch", "length"), [(1, 1), (5, 1), (1, 9), (8, 33), (3, 257)], ids=str)
def test_right_padded(batch, length, dtype, gamma, lam, mode):
    rewards, values = make_inputs(batch, length, dtype)
    check_against_reference(rewards, values, right_padded_mask(batch, length), gamma, lam, mode)


@pytest.mark.parametrize(("gamma", "lam"), GAMMA_LAM, ids=str)
def test_modes_agree_on_right_padding(gamma, lam):
    rewards, values = make_inputs(6, 40, torch.float32)
    mask = right_padded_mask(6, 40)
    zero = ops.gae(rewards, values, mask, gamma=gamma, lam=lam, mask_mode="zero")
    carry = ops.gae(rewards, values, mask, gamma=gamma, lam=lam, mask_mode="carry_forward")
    torch.testing.assert_close(zero, carry, rtol=0, atol=0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("gamma", "lam"), GAMMA_LAM, ids=str)
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32, torch.int64], ids=str)
@pytest.mark.parametrize(("batch", "length"), [(1, 9), (8, 33), (4, 300)], ids=str)
def test_mask_with_holes(batch, length, mask_dtype, gamma, lam, mode):
    rewards, values = make_inputs(batch, length, torch.float32)
    mask = mask_with_holes(batch, length).to(mask_dtype)
    check_against_reference(rewards, values, mask, gamma, lam, mode)


@pytest.mark.parametrize("mode", MODES)
def test_float64(mode):
    rewards, values = make_inputs(4, 50, torch.float64)
    check_against_reference(rewards, values, mask_with_holes(4, 50), 0.95, 0.9, mode)


@pytest.mark.parametrize("mode", MODES)
def test_empty_mask_gives_zeros(mode):
    rewards, values = make_inputs(3, 7, torch.float32)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    advantages, returns = ops.gae(rewards, values, mask, gamma=0.9, lam=0.8, mask_mode=mode)
    assert torch.all(advantages == 0) and torch.all(returns == 0)


@pytest.mark.parametrize("mode", MODES)
def test_empty_batch_and_empty_time(mode):
    for shape in ((0, 5), (3, 0)):
        advantages, returns = ops.gae(
            torch.zeros(shape), torch.zeros(shape), torch.ones(shape), gamma=1, lam=1, mask_mode=mode
        )
        assert advantages.shape == returns.shape == shape


@pytest.mark.parametrize("mode", MODES)
def test_single_step_is_reward_minus_value(mode):
    rewards, values = make_inputs(6, 1, torch.float32)
    advantages, returns = ops.gae(rewards, values, torch.ones(6, 1), gamma=0.9, lam=0.8, mask_mode=mode)
    torch.testing.assert_close(advantages, rewards - values)
    torch.testing.assert_close(returns, rewards)


def test_gamma_lam_one_is_monte_carlo():
    """gamma = lam = 1: A_t = sum of rewards from t on - V_t, returns = reward-to-go."""
    rewards, values = make_inputs(4, 20, torch.float32)
    advantages, returns = ops.gae(rewards, values, torch.ones(4, 20), gamma=1.0, lam=1.0)
    reward_to_go = rewards.flip(-1).cumsum(-1).flip(-1)
    torch.testing.assert_close(returns, reward_to_go, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(advantages, reward_to_go - values, rtol=1e-5, atol=1e-5)


def test_lam_zero_is_one_step_td():
    rewards, values = make_inputs(4, 20, torch.float32)
    advantages, _ = ops.gae(rewards, values, torch.ones(4, 20), gamma=0.9, lam=0.0)
    next_values = torch.cat([values[:, 1:], torch.zeros(4, 1)], dim=1)
    torch.testing.assert_close(advantages, rewards + 0.9 * next_values - values)


def test_not_differentiable():
    rewards, values = make_inputs(2, 5, torch.float32)
    values.requires_grad_()
    advantages, returns = ops.gae(rewards, values, torch.ones(2, 5), gamma=0.9, lam=0.8)
    assert not advantages.requires_grad and not returns.requires_grad


INPUT_ERRORS = (ValueError, TypeError, IndexError, RuntimeError)
R = torch.randn(2, 5)
M = torch.ones(2, 5)
BAD_CALLS = {
    "gamma above 1": ("gamma", lambda: ops.gae(R, R, M, gamma=1.5, lam=0.9)),
    "gamma below 0": ("gamma", lambda: ops.gae(R, R, M, gamma=-0.1, lam=0.9)),
    "lam above 1": ("lam", lambda: ops.gae(R, R, M, gamma=0.9, lam=1.01)),
    "lam below 0": ("lam", lambda: ops.gae(R, R, M, gamma=0.9, lam=-1.0)),
    "values shape": ("values", lambda: ops.gae(R, R[:, :4], M, gamma=0.9, lam=0.9)),
    "mask shape": ("mask", lambda: ops.gae(R, R, M[:1], gamma=0.9, lam=0.9)),
    "1-D rewards": ("rewards", lambda: ops.gae(R[0], R[0], M[0], gamma=0.9, lam=0.9)),
    "integer rewards": ("rewards", lambda: ops.gae(R.long(), R, M, gamma=0.9, lam=0.9)),
    "unknown mask_mode": ("mask_mode", lambda: ops.gae(R, R, M, gamma=0.9, lam=0.9, mask_mode="skip")),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_input_names_the_argument(case):
    argument, call = BAD_CALLS[case]
    with pytest.raises(INPUT_ERRORS, match=rf"\b{argument}\b"):
        call()
