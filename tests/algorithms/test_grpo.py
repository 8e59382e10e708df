"""GRPO family: advantages, dynamic sampling, overlong shaping and filtering, presets."""

import math

import pytest
import torch
from omegaconf import OmegaConf
from torch.testing import assert_close

from aligner.algorithms.grpo import (
    PRESETS,
    GRPOLossConfig,
    groups_with_spread,
    grpo_advantages,
    overlong_penalty,
)
from aligner.algorithms.policy_gradient import mask_unfinished, policy_loss

# Hand-worked numbers are written to 6 decimals.
SIX_DECIMALS = 5e-7
# float64 group statistics of G <= 16 rewards of size O(1), two different implementations: a few ulps.
FP64_TOL = 1e-12

# Two groups of G = 4, with GRPO's eps = 1e-6 added to the std:
#   [0, 1, 1, 0]: mean 0.5, squared deviations 4 * 0.25 = 1, unbiased std sqrt(1 / 3) = 0.5773503
#       mean / std:       +-0.5 / (0.5773503 + 1e-6) = +-0.866024
#       mean, no scale:   +-0.5
#       leave-one-out:    r = 0: others (1 + 1 + 0) / 3 = 2/3 -> -0.666667; r = 1: others 1/3 -> +0.666667
#       leave-one-out / std: +-0.6666667 / (0.5773503 + 1e-6) = +-1.154699
#   [1, 1, 1, 1]: every advantage exactly 0
HAND_REWARDS = [0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0]
HAND_ADVANTAGES = {
    ("std", "mean"): [-0.866024, 0.866024, 0.866024, -0.866024, 0.0, 0.0, 0.0, 0.0],
    (None, "mean"): [-0.5, 0.5, 0.5, -0.5, 0.0, 0.0, 0.0, 0.0],
    (None, "leave_one_out"): [-0.666667, 0.666667, 0.666667, -0.666667, 0.0, 0.0, 0.0, 0.0],
    ("std", "leave_one_out"): [-1.154699, 1.154699, 1.154699, -1.154699, 0.0, 0.0, 0.0, 0.0],
}


@pytest.mark.parametrize("shape", [(8,), (2, 4)], ids=str)
@pytest.mark.parametrize(("scale", "baseline"), list(HAND_ADVANTAGES), ids=str)
def test_grpo_advantages_hand_worked(scale, baseline, shape):
    rewards = torch.tensor(HAND_REWARDS).reshape(shape)
    got = grpo_advantages(rewards, 4, scale=scale, baseline=baseline)
    expected = torch.tensor(HAND_ADVANTAGES[scale, baseline]).reshape(shape)
    assert_close(got, expected, atol=SIX_DECIMALS, rtol=0)


def test_grpo_eps_zero_without_scale_is_allowed_and_with_std_refused():
    # eps = 0 and no scale: r - mean exactly, [0, 1, 1, 0] -> +-0.5
    got = grpo_advantages(torch.tensor([0.0, 1.0, 1.0, 0.0]), 4, scale=None, eps=0.0)
    assert torch.equal(got, torch.tensor([-0.5, 0.5, 0.5, -0.5]))
    with pytest.raises(ValueError, match="eps must be > 0 with scale='std'"):
        grpo_advantages(torch.ones(4), 4, eps=0.0)
    with pytest.raises(ValueError, match="eps must be > 0 with scale='std'"):
        GRPOLossConfig(eps=0.0)


@pytest.mark.parametrize("scale", ["std", None])
@pytest.mark.parametrize("baseline", ["mean", "leave_one_out"])
def test_identical_rewards_give_exactly_zero(scale, baseline):
    rewards = torch.tensor([0.7] * 5 + [0.0] * 5 + [-3.0] * 5)
    got = grpo_advantages(rewards, 5, scale=scale, baseline=baseline)
    assert torch.equal(got, torch.zeros(15))


def _reference_advantages(rewards, group_size, scale, baseline, eps):
    """Python loops over groups in float64."""
    out = []
    values = rewards.double().tolist()
    for start in range(0, len(values), group_size):
        group = values[start : start + group_size]
        n = len(group)
        mean = sum(group) / n
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (n - 1)) if n > 1 else 0.0
        for r in group:
            others_mean = (sum(group) - r) / (n - 1) if n > 1 else r
            advantage = r - (mean if baseline == "mean" else others_mean)
            out.append(advantage / (std + eps) if scale == "std" else advantage)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("scale", ["std", None])
@pytest.mark.parametrize("baseline", ["mean", "leave_one_out"])
@pytest.mark.parametrize(("prompts", "group_size"), [(1, 2), (5, 4), (3, 16)])
def test_grpo_advantages_match_float64_reference(scale, baseline, prompts, group_size):
    rewards = torch.randn(prompts * group_size, dtype=torch.float64)
    got = grpo_advantages(rewards, group_size, scale=scale, baseline=baseline)
    assert got.dtype == torch.float64
    expected = _reference_advantages(rewards, group_size, scale, baseline, 1e-6)
    assert_close(got, expected, atol=FP64_TOL, rtol=FP64_TOL)


def test_grpo_advantages_errors():
    with pytest.raises(ValueError, match="not a multiple of group_size 4"):
        grpo_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="group_size must be >= 1"):
        grpo_advantages(torch.zeros(6), 0)
    with pytest.raises(ValueError, match="scale must be one of"):
        grpo_advantages(torch.zeros(4), 2, scale="max")
    with pytest.raises(ValueError, match="baseline must be one of"):
        grpo_advantages(torch.zeros(4), 2, baseline="median")
    with pytest.raises(ValueError, match=r"must be \[prompts, group_size=2\]"):
        grpo_advantages(torch.zeros(2, 3), 2)


# ---- dynamic sampling ---------------------------------------------------------------


def test_groups_with_spread_hand_worked():
    # groups: all 1 (drop), 0/1 mixed (keep), all 2 (drop), 0.5/0.5/0.6 (keep)
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 2.0, 2.0, 2.0, 0.5, 0.5, 0.6])
    keep = groups_with_spread(rewards, 3)
    assert torch.equal(keep, torch.tensor([False, True, False, True]))
    assert torch.equal(groups_with_spread(rewards.reshape(4, 3), 3), keep)
    kept_samples = keep.repeat_interleave(3)
    assert kept_samples.sum().item() == 6
    # a kept group has a nonzero advantage somewhere, a dropped one has none
    advantages = grpo_advantages(rewards, 3).reshape(4, 3)
    assert torch.equal(advantages.abs().amax(dim=-1) > 0, keep)


def test_groups_with_spread_of_size_one_groups_keeps_nothing():
    assert not groups_with_spread(torch.randn(5), 1).any()


# ---- overlong shaping and filtering -----------------------------------------------------


# max_length 10, buffer 4: no penalty up to 10 - 4 = 6 tokens, then -(length - 6) / 4 * factor:
#   lengths [3, 6, 7, 8, 10] -> [0, 0, -0.25, -0.5, -1] (factor 1), halved for factor 0.5
@pytest.mark.parametrize("factor", [1.0, 0.5])
def test_overlong_penalty_hand_worked(factor):
    got = overlong_penalty(torch.tensor([3, 6, 7, 8, 10]), max_length=10, buffer_len=4, penalty_factor=factor)
    assert_close(got, factor * torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0]))
    assert got.dtype == torch.float32


def test_overlong_penalty_errors():
    with pytest.raises(ValueError, match="buffer_len must be in"):
        overlong_penalty(torch.tensor([1]), max_length=10, buffer_len=0)
    with pytest.raises(ValueError, match="buffer_len must be in"):
        overlong_penalty(torch.tensor([1]), max_length=10, buffer_len=11)
    with pytest.raises(ValueError, match="penalty_factor"):
        overlong_penalty(torch.tensor([1]), max_length=10, buffer_len=4, penalty_factor=-1.0)


def test_overlong_filtering_keeps_the_sample_in_the_baseline_but_out_of_the_loss():
    # One group of 4, rewards [1, 0, 0, 1], sample 2 truncated (is_end False).
    # Advantages use all 4 rewards: mean 0.5, std sqrt(1/3), A = [0.866024, -0.866024, -0.866024, 0.866024]
    # (eps 1e-6); without sample 2 they would be mean 2/3 based. Old == new and 2 tokens each: per-token
    # loss -A. token-mean over the 6 tokens of samples 0, 1, 3: (2 * -0.866024 + 2 * 0.866024 + 2 * -0.866024) / 6
    #   = -0.288675 (-0.2886746); sample 2 gets no gradient.
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    advantages = grpo_advantages(rewards, 4)
    assert_close(advantages, torch.tensor([0.866024, -0.866024, -0.866024, 0.866024]), atol=SIX_DECIMALS, rtol=0)
    mask = mask_unfinished(torch.ones(4, 2), torch.tensor([True, True, False, True]))
    logprobs = torch.full((4, 2), -1.0, requires_grad=True)
    config = GRPOLossConfig.preset("dapo")
    config.overlong_filtering = True
    loss_sum, count, _ = policy_loss(logprobs, logprobs.detach(), advantages, mask, config.policy)
    assert count.item() == 6
    assert_close(loss_sum / count, torch.tensor(-0.288675), atol=SIX_DECIMALS, rtol=0)
    loss_sum.backward()
    assert torch.equal(logprobs.grad[2], torch.zeros(2))


# ---- presets --------------------------------------------------------------------------


def test_presets_carry_the_reference_defaults():
    grpo = GRPOLossConfig.preset("grpo")
    assert (grpo.scale, grpo.baseline, grpo.eps) == ("std", "mean", 1e-6)
    assert (grpo.policy.eps_low, grpo.policy.eps_high, grpo.policy.aggregation) == (0.2, 0.2, "token-mean")
    assert (grpo.policy.kl_coef, grpo.policy.kl_estimator) == (0.01, "k3")
    assert grpo == GRPOLossConfig()

    dapo = GRPOLossConfig.preset("dapo")
    assert (dapo.policy.eps_low, dapo.policy.eps_high, dapo.policy.dual_clip) == (0.2, 0.28, 10.0)
    assert (dapo.policy.aggregation, dapo.policy.kl_coef) == ("token-mean", 0.0)
    assert dapo.dynamic_sampling
    assert (dapo.overlong_buffer_len, dapo.overlong_penalty_factor) == (4096, 1.0)

    dr_grpo = GRPOLossConfig.preset("dr_grpo")
    assert dr_grpo.scale is None
    assert (dr_grpo.policy.aggregation, dr_grpo.policy.kl_coef) == ("seq-mean-token-sum-norm", 0.0)

    gspo = GRPOLossConfig.preset("gspo")
    assert (gspo.policy.ratio_level, gspo.policy.aggregation) == ("sequence", "seq-mean-token-mean")
    assert (gspo.policy.eps_low, gspo.policy.eps_high, gspo.policy.kl_coef) == (3e-4, 4e-4, 0.0)

    assert GRPOLossConfig.preset("dapo") is not GRPOLossConfig.preset("dapo")  # fresh each time
    with pytest.raises(ValueError, match="unknown GRPO preset 'ppo'; valid: grpo, dapo, dr_grpo, gspo"):
        GRPOLossConfig.preset("ppo")


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_runs_a_step(name):
    """rewards -> (overlong penalty) -> (dynamic sampling) -> advantages -> loss, on old == new log-probs."""
    config = GRPOLossConfig.preset(name)
    prompts, group_size, max_length = 3, 4, 6
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    lengths = torch.randint(1, max_length + 1, (prompts * group_size,))
    if config.overlong_buffer_len:
        rewards = rewards + overlong_penalty(lengths, max_length=max_length, buffer_len=2)
    keep = torch.ones(prompts * group_size, dtype=torch.bool)
    if config.dynamic_sampling:
        keep = groups_with_spread(rewards, group_size).repeat_interleave(group_size)
    advantages = grpo_advantages(rewards[keep], group_size, scale=config.scale, baseline=config.baseline)
    mask = torch.arange(max_length) < lengths[keep].unsqueeze(-1)
    logprobs = -torch.rand(int(keep.sum()), max_length)
    loss_sum, count, metrics = policy_loss(
        logprobs, logprobs, advantages, mask, config.policy, ref_logprobs=logprobs, max_length=max_length
    )
    assert torch.isfinite(loss_sum) and count.item() > 0
    assert metrics["clip_fraction"].item() == 0.0 and metrics["kl"].item() == 0.0


def test_config_loads_from_yaml_and_checks_values():
    schema = OmegaConf.structured(GRPOLossConfig)
    merged = OmegaConf.merge(schema, OmegaConf.create({"scale": None, "policy": {"eps_high": 0.28}}))
    config = OmegaConf.to_object(merged)
    assert config.scale is None and config.policy.eps_high == 0.28 and config.policy.kl_coef == 0.01
    with pytest.raises(ValueError, match="scale must be one of"):
        GRPOLossConfig(scale="mad")
    with pytest.raises(ValueError, match="overlong_buffer_len"):
        GRPOLossConfig(overlong_buffer_len=-1)
