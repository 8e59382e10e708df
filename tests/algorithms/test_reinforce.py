"""REINFORCE (NeMo-Aligner, leave-one-out baseline, KL in the reward) and RLOO (veRL's form)."""

import pytest
import torch
from torch.testing import assert_close

from aligner.algorithms.policy_gradient import AGGREGATIONS, mask_unfinished
from aligner.algorithms.reinforce import reinforce_advantages, reinforce_loss, rloo_advantages

# Hand-worked numbers are written to 6 decimals.
SIX_DECIMALS = 5e-7
# float64, two different implementations of sums of a handful of O(1) numbers: a few ulps.
FP64_TOL = 1e-12


# rewards [1, 2, 3, 6], one group of 4, all valid: mean 3.
#   veRL:  (r - 3) * 4 / 3        = [-2.666667, -1.333333, 0, 4]
#   LOO:   r_0 - (2 + 3 + 6) / 3 = 1 - 3.666667 = -2.666667, r_3 - (1 + 2 + 3) / 3 = 6 - 2 = 4
# with sample 2 invalid: valid rewards 1, 2, 6 (n = 3):
#   A_0 = 1 - (2 + 6) / 2 = -3, A_1 = 2 - (1 + 6) / 2 = -1.5, A_3 = 6 - (1 + 2) / 2 = 4.5, A_2 = 0
def test_rloo_hand_worked():
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0])
    assert_close(rloo_advantages(rewards, 4), torch.tensor([-2.666667, -1.333333, 0.0, 4.0]), atol=SIX_DECIMALS, rtol=0)
    valid = torch.tensor([True, True, False, True])
    assert_close(rloo_advantages(rewards, 4, valid=valid), torch.tensor([-3.0, -1.5, 0.0, 4.5]))


def test_group_with_at_most_one_valid_sample_gets_zero():
    # group 0: only sample 0 valid; group 1: none valid; group 2: both valid, [4, 1] -> [3, -3]
    rewards = torch.tensor([5.0, 7.0, 2.0, 9.0, 4.0, 1.0])
    valid = torch.tensor([1, 0, 0, 0, 1, 1])
    assert_close(rloo_advantages(rewards, 2, valid=valid), torch.tensor([0.0, 0.0, 0.0, 0.0, 3.0, -3.0]))


def test_identical_rewards_give_exactly_zero():
    assert torch.equal(rloo_advantages(torch.full((8,), 0.3), 4), torch.zeros(8))


@pytest.mark.parametrize(("prompts", "group_size"), [(1, 2), (6, 4), (2, 9)])
def test_rloo_equals_verl_form(prompts, group_size):
    """veRL: A = (r - mean) * n / (n - 1), written here independently, equals r minus the others' mean."""
    rewards = torch.randn(prompts, group_size, dtype=torch.float64)
    n = group_size
    verl = (rewards - rewards.mean(dim=-1, keepdim=True)) * n / (n - 1)
    assert_close(rloo_advantages(rewards.reshape(-1), group_size), verl.reshape(-1), atol=FP64_TOL, rtol=FP64_TOL)


def test_rloo_errors():
    with pytest.raises(ValueError, match="group_size >= 2"):
        rloo_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="group_size"):
        rloo_advantages(torch.zeros(5), 2)


# One group of 2, rewards [1, 0], kl_coef 0.5; logp - ref: row 0 [0.2, 0.4], row 1 [-0.1 | masked 9].
#   k1: token means 0.3 and -0.1 -> r' = [1 - 0.15, 0 + 0.05] = [0.85, 0.05]; A = [0.8, -0.8]
#   abs: token means 0.3 and 0.1 -> r' = [0.85, -0.05];                       A = [0.9, -0.9]
# metrics: kl_in_reward mean (0.3 + -0.1) / 2 = 0.1 (k1), 0.2 (abs); rewards_with_kl 0.45 (k1), 0.4 (abs)
HAND_REINFORCE = {"k1": ([0.8, -0.8], 0.1, 0.45), "abs": ([0.9, -0.9], 0.2, 0.4)}


@pytest.mark.parametrize("estimator", list(HAND_REINFORCE))
def test_reinforce_advantages_hand_worked(estimator):
    ref = torch.full((2, 2), -1.5)
    logprobs = ref + torch.tensor([[0.2, 0.4], [-0.1, 9.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    advantages, metrics = reinforce_advantages(
        torch.tensor([1.0, 0.0]), logprobs, ref, mask, 2, kl_coef=0.5, kl_estimator=estimator
    )
    expected, kl, shaped = HAND_REINFORCE[estimator]
    assert_close(advantages, torch.tensor(expected), atol=SIX_DECIMALS, rtol=0)
    assert_close(metrics["kl_in_reward"], torch.tensor(kl), atol=SIX_DECIMALS, rtol=0)
    assert_close(metrics["rewards_with_kl"], torch.tensor(shaped), atol=SIX_DECIMALS, rtol=0)


def _reference_reinforce(rewards, logprobs, ref, mask, is_end, group_size, kl_coef):
    """NeMo-Aligner's recipe as float64 loops: k1 token-mean KL in the reward, leave-one-out over is_end."""
    shaped = []
    for i in range(len(rewards)):
        kls = [float(logprobs[i, t] - ref[i, t]) for t in range(mask.shape[1]) if mask[i, t]]
        shaped.append(float(rewards[i]) - kl_coef * (sum(kls) / len(kls) if kls else 0.0))
    advantages = []
    for start in range(0, len(shaped), group_size):
        members = range(start, start + group_size)
        valid = [j for j in members if is_end[j]]
        for i in members:
            if len(valid) <= 1 or not is_end[i]:
                advantages.append(0.0)
            else:
                others = [shaped[j] for j in valid if j != i]
                advantages.append(shaped[i] - sum(others) / len(others))
    return torch.tensor(advantages, dtype=torch.float64)


@pytest.mark.parametrize(("prompts", "group_size"), [(1, 2), (4, 4), (3, 7)])
def test_reinforce_advantages_match_float64_reference(prompts, group_size):
    batch, length = prompts * group_size, 9
    ref = -3 * torch.rand(batch, length, dtype=torch.float64)
    logprobs = ref + 0.3 * torch.randn(batch, length, dtype=torch.float64)
    lengths = torch.randint(0, length + 1, (batch,))
    mask = torch.arange(length) < lengths.unsqueeze(-1)
    is_end = torch.rand(batch) < 0.7
    rewards = torch.randn(batch, dtype=torch.float64)
    got, _ = reinforce_advantages(rewards, logprobs, ref, mask, group_size, kl_coef=0.05, valid=is_end)
    expected = _reference_reinforce(rewards, logprobs, ref, mask, is_end, group_size, 0.05)
    assert_close(got, expected, atol=FP64_TOL, rtol=FP64_TOL)


# logprobs [[-1, -2], [-0.5 | masked]], A = [0.8, -0.8]: per token -logp * A = [0.8, 1.6], [-0.4]
#   token-mean: (0.8 + 1.6 - 0.4) / 3 = 2 / 3 (numerator 2, count 3)
#   seq-mean-token-mean: (1.2 + -0.4) / 2 = 0.4 (numerator 0.8, count 2)
#   d/dlogp = -A: [[-0.8, -0.8], [0.8, 0]] for the token-mean numerator
def test_reinforce_loss_hand_worked():
    logprobs = torch.tensor([[-1.0, -2.0], [-0.5, -100.0]], requires_grad=True)
    mask = torch.tensor([[1, 1], [1, 0]])
    advantages = torch.tensor([0.8, -0.8])
    loss_sum, count, metrics = reinforce_loss(logprobs, advantages, mask)
    assert count.item() == 3
    assert_close(loss_sum, torch.tensor(2.0), atol=SIX_DECIMALS, rtol=0)
    loss_sum.backward()
    assert_close(logprobs.grad, torch.tensor([[-0.8, -0.8], [0.8, 0.0]]), atol=SIX_DECIMALS, rtol=0)
    # token-weighted mean advantage: (0.8 + 0.8 - 0.8) / 3
    assert_close(metrics["advantage"], torch.tensor(0.8 / 3), atol=SIX_DECIMALS, rtol=0)
    seq_sum, seq_count, _ = reinforce_loss(logprobs.detach(), advantages, mask, aggregation="seq-mean-token-mean")
    assert seq_count.item() == 2
    assert_close(seq_sum / seq_count, torch.tensor(0.4), atol=SIX_DECIMALS, rtol=0)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_reinforce_loss_gradcheck(aggregation):
    logprobs = -2 * torch.rand(4, 5, dtype=torch.float64)
    advantages = torch.randn(4, dtype=torch.float64)
    mask = torch.arange(5) < torch.tensor([[5], [1], [0], [3]])

    def loss_fn(logprobs):
        loss_sum, count, _ = reinforce_loss(logprobs, advantages, mask, aggregation=aggregation, max_length=6)
        return loss_sum / count

    assert torch.autograd.gradcheck(loss_fn, (logprobs.requires_grad_(),))


def test_unfinished_samples_get_no_policy_gradient():
    """NeMo-Aligner: a sample that did not end counts in nobody's baseline and gets no gradient."""
    logprobs = torch.full((4, 3), -1.0, requires_grad=True)
    is_end = torch.tensor([True, False, True, True])
    ref = logprobs.detach()
    mask = torch.ones(4, 3)
    advantages, _ = reinforce_advantages(
        torch.tensor([1.0, 5.0, 0.0, 2.0]), logprobs.detach(), ref, mask, 4, kl_coef=0.1, valid=is_end
    )
    # KL 0 (logp == ref); valid rewards 1, 0, 2: A = [1 - 1, 0, 0 - 1.5, 2 - 0.5] = [0, 0, -1.5, 1.5]
    assert_close(advantages, torch.tensor([0.0, 0.0, -1.5, 1.5]))
    loss_sum, count, _ = reinforce_loss(logprobs, advantages, mask_unfinished(mask, is_end))
    assert count.item() == 9
    loss_sum.backward()
    assert torch.equal(logprobs.grad[1], torch.zeros(3))


def test_all_masked_reinforce_loss_is_zero():
    logprobs = torch.full((2, 3), float("-inf"), requires_grad=True)
    loss_sum, count, metrics = reinforce_loss(logprobs, torch.ones(2), torch.zeros(2, 3))
    loss_sum.backward()
    assert loss_sum.item() == 0.0 and count.item() == 0
    assert torch.equal(logprobs.grad, torch.zeros(2, 3))
    assert metrics["advantage"].item() == 0.0
