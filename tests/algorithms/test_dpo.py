"""DPO-family preference losses against hand-worked numbers and an independent float64 reference."""

import math

import pytest
import torch
from torch.testing import assert_close

from aligner.algorithms.dpo import LOSS_TYPES, preference_loss, sft_term, split_pairs

# Closed forms evaluated in float64 by two differently written implementations: they differ
# by a few ulps of values of order 1-100.
FP64_TOL = 1e-12
# Hand-worked numbers below are written to 6 decimals.
HAND_TOL = 5e-7
REFERENCE_BASED = ["sigmoid", "ipo", "hinge", "rpo_sq", "rpo_fwd_kl", "rpo_bwd_kl"]


def _reference_loss(pc, pr, rc, rr, *, beta, loss_type, label_smoothing, chosen_r, rejected_r, eta, gamma):
    """Independent float64 formulas (no code shared with aligner.algorithms.dpo)."""
    sigmoid = lambda x: 1.0 / (1.0 + torch.exp(-x))  # noqa: E731
    if loss_type in ("simpo", "orpo"):
        if loss_type == "simpo":
            x = beta * (pc - pr) - gamma
            return -(1 - label_smoothing) * torch.log(sigmoid(x)) - label_smoothing * torch.log(sigmoid(-x))
        odds = lambda avg: torch.exp(avg) / (1.0 - torch.exp(avg))  # noqa: E731
        return -pc - beta * torch.log(sigmoid(torch.log(odds(pc) / odds(pr))))
    delta = (pc - rc) - (pr - rr)
    x = beta * delta
    if loss_type == "sigmoid":
        return -(1 - label_smoothing) * torch.log(sigmoid(x)) - label_smoothing * torch.log(sigmoid(-x))
    if loss_type == "ipo":
        return (delta - 1.0 / (2.0 * beta)) ** 2
    if loss_type == "hinge":
        return torch.clamp(1.0 - x, min=0.0)
    target = eta * (chosen_r - rejected_r)
    if loss_type == "rpo_sq":
        return (x - target) ** 2
    p, q = (x, target) if loss_type == "rpo_bwd_kl" else (target, x)
    p1, q1 = sigmoid(p), sigmoid(q)
    return p1 * torch.log(p1 / q1) + (1 - p1) * torch.log((1 - p1) / (1 - q1))


def _random_case(batch, loss_type):
    if loss_type in ("simpo", "orpo"):
        # length-normalized log-probs: per-token averages in (-3, -0.05)
        pc, pr = -0.05 - 2.95 * torch.rand(2, batch, dtype=torch.float64)
    else:
        pc, pr = -40 * torch.rand(2, batch, dtype=torch.float64) - 5
    rc, rr = pc + torch.randn(batch, dtype=torch.float64), pr + torch.randn(batch, dtype=torch.float64)
    chosen_r, rejected_r = 4 * torch.rand(2, batch, dtype=torch.float64)
    return pc, pr, rc, rr, chosen_r, rejected_r


# Hand-worked case (reference-based losses): beta = 0.1,
#   chosen:   policy -10, ref -12 -> implicit reward 0.1 * 2  = 0.2
#   rejected: policy -15, ref -14 -> implicit reward 0.1 * -1 = -0.1
#   Δ = 2 - (-1) = 3, beta Δ = 0.3
#   sigmoid: -logsigmoid(0.3) = log(1 + e^-0.3) = log(1.740818) = 0.554355
#   cDPO s = 0.1: 0.9 * 0.554355 + 0.1 * log(1 + e^0.3) = 0.9 * 0.554355 + 0.1 * 0.854355 = 0.584355
#   ipo: (Δ - 1 / (2 beta))^2 = (3 - 5)^2 = 4
#   hinge: relu(1 - 0.3) = 0.7
#   dataset rewards 4 (chosen), 1 (rejected), eta = 0.2: target gap 0.2 * 3 = 0.6
#   rpo_sq: (0.3 - 0.6)^2 = 0.09
#   sigmoid(0.3) = 0.574443, sigmoid(0.6) = 0.645656
#   rpo_bwd_kl: 0.574443 log(0.574443 / 0.645656) + 0.425557 log(0.425557 / 0.354344) = 0.010800
#   rpo_fwd_kl: 0.645656 log(0.645656 / 0.574443) + 0.354344 log(0.354344 / 0.425557) = 0.010564
HAND_CASES = [
    ("sigmoid", 0.0, 0.554355),
    ("sigmoid", 0.1, 0.584355),
    ("ipo", 0.0, 4.0),
    ("hinge", 0.0, 0.7),
    ("rpo_sq", 0.0, 0.09),
    ("rpo_bwd_kl", 0.0, 0.010800),
    ("rpo_fwd_kl", 0.0, 0.010564),
]


@pytest.mark.parametrize(("loss_type", "label_smoothing", "expected"), HAND_CASES)
def test_hand_worked_reference_losses(loss_type, label_smoothing, expected):
    loss, metrics = preference_loss(
        torch.tensor([-10.0]),
        torch.tensor([-15.0]),
        torch.tensor([-12.0]),
        torch.tensor([-14.0]),
        beta=0.1,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        chosen_rewards=torch.tensor([4.0]),
        rejected_rewards=torch.tensor([1.0]),
        eta=0.2,
    )
    assert_close(loss, torch.tensor([expected]), atol=HAND_TOL, rtol=0)
    assert_close(metrics["chosen_reward"], torch.tensor(0.2), atol=HAND_TOL, rtol=0)
    assert_close(metrics["rejected_reward"], torch.tensor(-0.1), atol=HAND_TOL, rtol=0)
    assert_close(metrics["margin"], torch.tensor(0.3), atol=HAND_TOL, rtol=0)
    assert metrics["accuracy"].item() == 1.0


def test_hand_worked_simpo():
    # avg logps chosen -0.5, rejected -1.0, beta = 2, gamma = 0.5:
    # 2 * (-0.5 + 1.0) - 0.5 = 0.5 -> -logsigmoid(0.5) = log(1 + e^-0.5) = 0.474077; rewards 2 * avg = -1, -2
    loss, metrics = preference_loss(
        torch.tensor([-0.5]), torch.tensor([-1.0]), None, None, beta=2.0, loss_type="simpo", simpo_gamma=0.5
    )
    assert_close(loss, torch.tensor([0.474077]), atol=HAND_TOL, rtol=0)
    assert_close(metrics["chosen_reward"], torch.tensor(-1.0))
    assert_close(metrics["rejected_reward"], torch.tensor(-2.0))


def test_hand_worked_orpo():
    # avg logps chosen -0.5, rejected -1.0, beta (lambda) = 0.1:
    # log_odds(-0.5) = -0.5 - log(1 - e^-0.5) = -0.5 - log(0.393469) = 0.432752
    # log_odds(-1.0) = -1.0 - log(1 - e^-1)   = -1.0 - log(0.632121) = -0.541325
    # ratio 0.974077; -logsigmoid(0.974077) = log(1 + e^-0.974077) = 0.320300
    # loss = NLL 0.5 + 0.1 * 0.320300 = 0.532030
    loss, metrics = preference_loss(torch.tensor([-0.5]), torch.tensor([-1.0]), None, None, beta=0.1, loss_type="orpo")
    assert_close(loss, torch.tensor([0.532030]), atol=HAND_TOL, rtol=0)
    assert_close(metrics["log_odds_ratio"], torch.tensor(0.974077), atol=HAND_TOL, rtol=0)
    assert_close(metrics["nll"], torch.tensor(0.5))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("batch", [1, 9])
def test_matches_float64_reference(loss_type, batch):
    pc, pr, rc, rr, chosen_r, rejected_r = _random_case(batch, loss_type)
    beta = 0.05 + torch.rand(()).item()
    label_smoothing = 0.3 * torch.rand(()).item() if loss_type in ("sigmoid", "simpo") else 0.0
    eta, gamma = 0.5 + torch.rand(()).item(), torch.rand(()).item()
    options = dict(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, eta=eta)
    loss, _ = preference_loss(
        pc, pr, rc, rr, chosen_rewards=chosen_r, rejected_rewards=rejected_r, simpo_gamma=gamma, **options
    )
    expected = _reference_loss(pc, pr, rc, rr, chosen_r=chosen_r, rejected_r=rejected_r, gamma=gamma, **options)
    assert loss.shape == (batch,)
    assert_close(loss, expected, atol=FP64_TOL, rtol=FP64_TOL)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradcheck(loss_type):
    pc, pr, rc, rr, chosen_r, rejected_r = _random_case(3, loss_type)
    if loss_type == "hinge":
        # keep beta Δ away from the hinge's kink at 1, where finite differences disagree
        rc = pc - 2 * torch.rand(3, dtype=torch.float64) - 15.0

    def loss_fn(pc, pr, rc, rr):
        return preference_loss(
            pc,
            pr,
            rc,
            rr,
            beta=0.1,
            loss_type=loss_type,
            label_smoothing=0.1 if loss_type in ("sigmoid", "simpo") else 0.0,
            chosen_rewards=chosen_r,
            rejected_rewards=rejected_r,
        )[0]

    inputs = tuple(t.clone().requires_grad_() for t in (pc, pr, rc, rr))
    assert torch.autograd.gradcheck(loss_fn, inputs)


def test_reference_free_losses_ignore_refs():
    pc, pr, rc, rr, _, _ = _random_case(4, "simpo")
    for loss_type in ("simpo", "orpo"):
        with_refs, _ = preference_loss(pc, pr, rc, rr, beta=0.5, loss_type=loss_type)
        without, _ = preference_loss(pc, pr, None, None, beta=0.5, loss_type=loss_type)
        assert torch.equal(with_refs, without)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("avg_chosen", [0.0, -1e-30, -1e-12, -1e-7])
def test_orpo_log_probs_near_zero_stay_finite(dtype, avg_chosen):
    # A probability of ~1 per token makes the odds infinite in exact arithmetic.
    pc = torch.tensor([avg_chosen, -0.3], dtype=dtype, requires_grad=True)
    pr = torch.tensor([avg_chosen, 0.0], dtype=dtype, requires_grad=True)
    loss, metrics = preference_loss(pc, pr, None, None, beta=0.1, loss_type="orpo")
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(metrics["log_odds_ratio"])
    assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()


def test_orpo_very_negative_log_probs():
    # log(1 - e^-60) underflows to -0.0 in float64: log_odds = avg, no NaN.
    loss, metrics = preference_loss(
        torch.tensor([-60.0], dtype=torch.float64),
        torch.tensor([-80.0], dtype=torch.float64),
        None,
        None,
        beta=1.0,
        loss_type="orpo",
    )
    assert_close(metrics["log_odds_ratio"], torch.tensor(20.0, dtype=torch.float64))
    assert_close(loss, torch.tensor([60.0 + math.log1p(math.exp(-20.0))], dtype=torch.float64))


def test_sft_term():
    # sums -12 over 4 tokens -> 3 per token, 12 summed; an empty response (sum 0, 0 tokens) -> 0, not NaN
    sums, counts = torch.tensor([-12.0, 0.0]), torch.tensor([4, 0])
    assert_close(sft_term(sums, counts), torch.tensor([3.0, 0.0]))
    assert_close(sft_term(sums, counts, average="sum"), torch.tensor([12.0, 0.0]))
    with pytest.raises(ValueError, match="unknown average 'mean'; valid: token, sum"):
        sft_term(sums, counts, average="mean")
    with pytest.raises(ValueError, match="chosen_token_counts"):
        sft_term(sums, torch.tensor([1, 2, 3]))


def test_split_pairs():
    x = torch.arange(12).view(6, 2)
    chosen, rejected = split_pairs(x)
    assert torch.equal(chosen, x[:3]) and torch.equal(rejected, x[3:])
    with pytest.raises(ValueError, match="2B rows"):
        split_pairs(torch.zeros(5, 2))


def _call(**overrides):
    args = dict(
        policy_chosen_logps=torch.zeros(3),
        policy_rejected_logps=torch.zeros(3),
        ref_chosen_logps=torch.zeros(3),
        ref_rejected_logps=torch.zeros(3),
        beta=0.1,
    )
    args.update(overrides)
    return preference_loss(**args)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(loss_type="dpo"), "unknown loss_type 'dpo'; valid: sigmoid, ipo, hinge, rpo_sq"),
        (dict(beta=0.0), "beta must be > 0"),
        (dict(beta=-1.0), "beta must be > 0"),
        (dict(label_smoothing=0.5), r"label_smoothing must be in \[0, 0.5\)"),
        (dict(label_smoothing=-0.1), r"label_smoothing must be in \[0, 0.5\)"),
        (dict(label_smoothing=0.1, loss_type="ipo"), "label_smoothing applies to loss_type sigmoid or simpo only"),
        (dict(loss_type="rpo_sq"), "needs chosen_rewards and rejected_rewards"),
        (dict(loss_type="rpo_bwd_kl", chosen_rewards=torch.zeros(3)), "needs chosen_rewards and rejected_rewards"),
        (
            dict(loss_type="rpo_fwd_kl", chosen_rewards=torch.zeros(3), rejected_rewards=torch.zeros(3), eta=0.0),
            "eta must be > 0",
        ),
        (
            dict(loss_type="rpo_sq", chosen_rewards=torch.zeros(3), rejected_rewards=torch.zeros(2)),
            "rejected_rewards must have the shape",
        ),
        (dict(ref_chosen_logps=None), "needs ref_chosen_logps and ref_rejected_logps"),
        (dict(policy_rejected_logps=torch.zeros(4)), "policy_rejected_logps must have the shape"),
        (dict(ref_rejected_logps=torch.zeros(3, 1)), "ref_rejected_logps must have the shape"),
        (dict(policy_chosen_logps=torch.zeros(3, 2)), r"policy_chosen_logps must be \[batch\]"),
    ],
)
def test_bad_arguments(overrides, message):
    with pytest.raises(ValueError, match=message):
        _call(**overrides)
