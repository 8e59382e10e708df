"""PPO's numerics (aligner.algorithms.ppo): token rewards, GAE targets, whitening over ranks, the critic loss, the KL
controller, each against a hand-computed case."""

import pytest
import torch
from distributed import run_distributed
from torch.testing import assert_close

from aligner.algorithms.ppo import KLController, last_valid_index, ppo_token_rewards, value_loss, whiten_over_group
from aligner.ops import gae, masked_whiten

# Hand-worked numbers are written to 6 decimals.
SIX_DECIMALS = 5e-7
# float32 whitening along two code paths (float64 sums here, the op's own): a few ulps of O(1) values.
FP32_TOL = 1e-6

# Two rows, scores [2, -1], kl_coef 0.1; logp - ref: row 0 [0.1, -0.2, 0.3], row 1 [0.4, -0.5 | masked 9].
#   k1:  row 0 [-0.01, 0.02, -0.03 + 2] = [-0.01, 0.02, 1.97]; row 1 [-0.04, 0.05 - 1, 0] = [-0.04, -0.95, 0]
#   abs: row 0 [-0.01, -0.02, 1.97];                            row 1 [-0.04, -0.05 - 1, 0] = [-0.04, -1.05, 0]
#   kl (token mean): k1 (0.1 - 0.2 + 0.3 + 0.4 - 0.5) / 5 = 0.02, abs 1.5 / 5 = 0.3
#   kl_sum (mean of row sums): k1 (0.2 - 0.1) / 2 = 0.05, abs (0.6 + 0.9) / 2 = 0.75
HAND_REWARDS = {
    "k1": ([[-0.01, 0.02, 1.97], [-0.04, -0.95, 0.0]], 0.02, 0.05),
    "abs": ([[-0.01, -0.02, 1.97], [-0.04, -1.05, 0.0]], 0.3, 0.75),
}


@pytest.mark.parametrize("estimator", list(HAND_REWARDS))
def test_token_rewards_hand_worked(estimator):
    want, kl, kl_sum = HAND_REWARDS[estimator]
    ref = torch.zeros(2, 3, dtype=torch.float64)
    logprobs = torch.tensor([[0.1, -0.2, 0.3], [0.4, -0.5, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    scores = torch.tensor([2.0, -1.0], dtype=torch.float64)
    rewards, metrics = ppo_token_rewards(scores, logprobs, ref, mask, kl_coef=0.1, estimator=estimator)
    assert_close(rewards, torch.tensor(want, dtype=torch.float64), atol=SIX_DECIMALS, rtol=0)
    assert metrics["kl"].item() == pytest.approx(kl, abs=SIX_DECIMALS)
    assert metrics["kl_sum"].item() == pytest.approx(kl_sum, abs=SIX_DECIMALS)
    assert metrics["score_mean"].item() == pytest.approx(0.5)


def test_score_goes_on_the_last_response_token_even_with_holes_and_rows_without_one():
    mask = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 1, 1]])
    assert last_valid_index(mask).tolist() == [2, -1, 3]
    zeros = torch.zeros(3, 4)
    rewards, _ = ppo_token_rewards(torch.tensor([5.0, 7.0, -3.0]), zeros, zeros, mask, kl_coef=0.5)
    want = torch.zeros(3, 4)
    want[0, 2], want[2, 3] = 5.0, -3.0
    assert torch.equal(rewards, want)


def test_token_rewards_feed_gae_hand_worked():
    """Score 1 on the last of 3 tokens, no KL; values [0.5, 0.6, 0.7], gamma 1, lam 0.95.

    delta_2 = 1 - 0.7 = 0.3, A_2 = 0.3; delta_1 = 0.7 - 0.6 = 0.1, A_1 = 0.1 + 0.95 * 0.3 = 0.385;
    delta_0 = 0.6 - 0.5 = 0.1, A_0 = 0.1 + 0.95 * 0.385 = 0.46575; returns = A + V = [0.96575, 0.985, 1.0].
    """
    zeros = torch.zeros(1, 3, dtype=torch.float64)
    rewards, _ = ppo_token_rewards(
        torch.tensor([1.0], dtype=torch.float64), zeros, zeros, torch.ones(1, 3), kl_coef=0.1
    )
    values = torch.tensor([[0.5, 0.6, 0.7]], dtype=torch.float64)
    advantages, returns = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=0.95)
    assert_close(advantages, torch.tensor([[0.46575, 0.385, 0.3]], dtype=torch.float64), atol=SIX_DECIMALS, rtol=0)
    assert_close(returns, torch.tensor([[0.96575, 0.985, 1.0]], dtype=torch.float64), atol=SIX_DECIMALS, rtol=0)


@pytest.mark.parametrize("mode", ["zero", "carry_forward"])
def test_nemo_aligners_worked_gae_example(mode):
    """NeMo-Aligner's own small GAE case (tests/test_ppo_utils.py): values [0, 1, 2, 3], rewards [0, 0, 1, 0],
    gamma 0.5, lam 0 (one-step TD), every token valid, V after the last token 0.

    A_t = r_t + 0.5 * V_{t+1} - V_t: [0 + 0.5 - 0, 0 + 1 - 1, 1 + 1.5 - 2, 0 + 0 - 3] = [0.5, 0, 0.5, -3];
    returns = A + V = [0.5, 1, 2.5, 0]. Without holes in the mask both mask modes agree.
    """
    values = torch.arange(4, dtype=torch.float64).view(1, 4)
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    advantages, returns = gae(rewards, values, torch.ones(1, 4), gamma=0.5, lam=0.0, mask_mode=mode)
    assert_close(advantages, torch.tensor([[0.5, 0.0, 0.5, -3.0]], dtype=torch.float64), atol=0, rtol=0)
    assert_close(returns, torch.tensor([[0.5, 1.0, 2.5, 0.0]], dtype=torch.float64), atol=0, rtol=0)


def test_token_rewards_errors():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="estimator"):
        ppo_token_rewards(torch.zeros(2), z, z, z, kl_coef=0.1, estimator="k3")
    with pytest.raises(ValueError, match="kl_coef"):
        ppo_token_rewards(torch.zeros(2), z, z, z, kl_coef=-1.0)
    with pytest.raises(ValueError, match="scores"):
        ppo_token_rewards(torch.zeros(3), z, z, z, kl_coef=0.1)


# V = [1.0, 0.5, 0.85], V_old = 0.8, R = [1.2, 0.0, 0.0], clip 0.1 (V_clip within [0.7, 0.9]):
#   token 0: (V - R)^2 = 0.04,   V_clip 0.9 -> 0.09;   loss 0.5 * 0.09   = 0.045   (clipped larger)
#   token 1: (V - R)^2 = 0.25,   V_clip 0.7 -> 0.49;   loss 0.5 * 0.49   = 0.245   (clipped larger)
#   token 2: (V - R)^2 = 0.7225, V_clip = V;            loss 0.5 * 0.7225 = 0.36125 (equal: not clipped)
# gradient: 0 where the clipped term wins with V outside the range (tokens 0 and 1), V - R = 0.85 on token 2.
# value_clip_fraction 2/3; value_error (0.04 + 0.25 + 0.7225) / 3 = 0.3375.
def test_value_loss_hand_worked():
    values = torch.tensor([[1.0, 0.5, 0.85, 3.0]], dtype=torch.float64, requires_grad=True)
    old = torch.full((1, 4), 0.8, dtype=torch.float64)
    returns = torch.tensor([[1.2, 0.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0]])
    per_token, metrics = value_loss(values, old, returns, mask, clip=0.1)
    want = torch.tensor([[0.045, 0.245, 0.36125, 0.0]], dtype=torch.float64)
    assert_close(per_token.detach(), want, atol=SIX_DECIMALS, rtol=0)
    per_token.sum().backward()
    assert_close(values.grad, torch.tensor([[0.0, 0.0, 0.85, 0.0]], dtype=torch.float64), atol=SIX_DECIMALS, rtol=0)
    assert metrics["value_clip_fraction"].item() == pytest.approx(2 / 3)
    assert metrics["value_error"].item() == pytest.approx(0.3375)
    unclipped, metrics = value_loss(values.detach(), old, returns, mask, clip=None)
    assert_close(unclipped, torch.tensor([[0.02, 0.125, 0.36125, 0.0]], dtype=torch.float64), atol=SIX_DECIMALS, rtol=0)
    assert metrics["value_clip_fraction"].item() == 0.0
    with pytest.raises(ValueError, match="clip"):
        value_loss(values, old, returns, mask, clip=0.0)


def test_whitening_on_one_rank_is_the_masked_whiten_op():
    x = torch.randn(6, 9) * 3 + 1
    mask = torch.rand(6, 9) > 0.3
    for shift_mean in (True, False):
        want = masked_whiten(x, mask, shift_mean=shift_mean)
        assert_close(whiten_over_group(x, mask, shift_mean=shift_mean), want, atol=FP32_TOL, rtol=FP32_TOL)


def _whiten_worker(x, mask):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        rows = slice(0, 2) if dist.get_rank() == 0 else slice(2, None)  # uneven halves
        return whiten_over_group(x[rows], mask[rows], group=dist.group.WORLD)
    finally:
        dist.destroy_process_group()


def test_whitening_over_two_ranks_is_the_whole_batch_whitened():
    x = torch.randn(5, 7, dtype=torch.float64)
    mask = torch.rand(5, 7) > 0.4
    ranks = run_distributed(_whiten_worker, 2, args=(x, mask))
    assert_close(torch.cat(ranks), whiten_over_group(x, mask), atol=1e-12, rtol=1e-12)


def test_kl_controller_fixed_and_adaptive():
    fixed = KLController(0.05)
    assert fixed.update(100.0, n_steps=512) == 0.05
    # value 0.1, target 6, horizon 10000, 512 samples: the error is clipped to +-0.2 -> x(1 +- 0.01024);
    # kl 6.6: error 0.1 -> x 1.00512
    for kl, want in ((9.0, 0.101024), (3.0, 0.098976), (6.6, 0.100512), (6.0, 0.1)):
        controller = KLController(0.1, target=6.0, horizon=10000)
        assert controller.update(kl, n_steps=512) == pytest.approx(want, abs=1e-9)
    controller = KLController(0.1, target=6.0)
    controller.update(9.0, n_steps=512)
    restored = KLController(0.1, target=6.0)
    restored.load_state_dict(controller.state_dict())
    assert restored.value == controller.value


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"value": -0.1}, "coefficient"),
        ({"value": 0.1, "target": 0.0}, "target"),
        ({"value": 0.1, "horizon": 0}, "horizon"),
    ],
)
def test_kl_controller_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KLController(**kwargs)
