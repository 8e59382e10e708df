"""KTO loss and its reference point against hand-worked numbers and an independent float64 reference."""

import math

import pytest
import torch
from torch.testing import assert_close

from aligner.algorithms.kto import kto_loss, kto_reference_point

# Closed forms evaluated in float64 by two differently written implementations: a few ulps apart.
FP64_TOL = 1e-12
# Hand-worked numbers below are written to 6 decimals.
HAND_TOL = 5e-7


def _reference_loss(policy, ref, desirable, kl_policy, kl_ref, *, beta, desirable_weight, undesirable_weight):
    """Independent float64 formulas (no code shared with aligner.algorithms.kto)."""
    z = max(0.0, float((kl_policy - kl_ref).mean()))
    losses = []
    for logp, ref_logp, good in zip(policy.tolist(), ref.tolist(), desirable.tolist(), strict=True):
        r = logp - ref_logp
        if good:
            losses.append(desirable_weight * (1.0 - 1.0 / (1.0 + math.exp(-beta * (r - z)))))
        else:
            losses.append(undesirable_weight * (1.0 - 1.0 / (1.0 + math.exp(-beta * (z - r)))))
    return torch.tensor(losses, dtype=torch.float64)


def _random_case(batch):
    policy = -40 * torch.rand(batch, dtype=torch.float64) - 5
    ref = policy + 3 * torch.randn(batch, dtype=torch.float64)
    kl_policy = -40 * torch.rand(batch, dtype=torch.float64) - 5
    kl_ref = kl_policy + 3 * torch.randn(batch, dtype=torch.float64) - 1  # mean KL mostly > 0, sometimes < 0
    desirable = torch.rand(batch) < 0.5
    return policy, ref, desirable, kl_policy, kl_ref


def test_hand_worked():
    # beta = 0.1; policy [-10, -20], ref [-12, -18] -> r = [2, -2]; example 0 desirable, 1 not.
    # mismatched pairs: policy [-30, -31], ref [-32, -30] -> KL estimates [2, -1], z = max(0, 0.5) = 0.5
    # desirable:   1 - sigmoid(0.1 * (2 - 0.5))    = 1 - sigmoid(0.15) = 1 - 0.537430 = 0.462570
    # undesirable: 1 - sigmoid(0.1 * (0.5 - (-2))) = 1 - sigmoid(0.25) = 1 - 0.562177 = 0.437823,
    #              times undesirable_weight 1.33   = 0.582305
    loss, metrics = kto_loss(
        torch.tensor([-10.0, -20.0]),
        torch.tensor([-12.0, -18.0]),
        torch.tensor([True, False]),
        beta=0.1,
        undesirable_weight=1.33,
        kl_policy_logps=torch.tensor([-30.0, -31.0]),
        kl_ref_logps=torch.tensor([-32.0, -30.0]),
    )
    assert_close(loss, torch.tensor([0.462570, 0.582305]), atol=HAND_TOL, rtol=0)
    assert_close(metrics["reference_point"], torch.tensor(0.5))
    assert_close(metrics["desirable_reward"], torch.tensor(0.2))
    assert_close(metrics["undesirable_reward"], torch.tensor(-0.2))
    assert metrics["num_desirable"].item() == 1 and metrics["num_undesirable"].item() == 1


def test_negative_kl_estimate_clamps_to_zero():
    # KL estimates [-1, -3] -> mean -2 -> z = 0; r = 0 -> both losses 1 - sigmoid(0) = 0.5
    kl_args = dict(kl_policy_logps=torch.tensor([-31.0, -33.0]), kl_ref_logps=torch.tensor([-30.0, -30.0]))
    loss, metrics = kto_loss(
        torch.tensor([-5.0, -5.0]), torch.tensor([-5.0, -5.0]), torch.tensor([True, False]), **kl_args
    )
    assert_close(loss, torch.tensor([0.5, 0.5]))
    assert metrics["reference_point"].item() == 0.0
    given, _ = kto_loss(
        torch.tensor([-5.0]), torch.tensor([-5.0]), torch.tensor([True]), reference_point=torch.tensor(-2.0)
    )
    assert_close(given, torch.tensor([0.5]))


@pytest.mark.parametrize("batch", [1, 16])
def test_matches_float64_reference(batch):
    policy, ref, desirable, kl_policy, kl_ref = _random_case(batch)
    weights = dict(
        beta=0.05 + torch.rand(()).item(), desirable_weight=1.0, undesirable_weight=0.5 + torch.rand(()).item()
    )
    loss, _ = kto_loss(policy, ref, desirable, kl_policy_logps=kl_policy, kl_ref_logps=kl_ref, **weights)
    expected = _reference_loss(policy, ref, desirable, kl_policy, kl_ref, **weights)
    assert_close(loss, expected, atol=FP64_TOL, rtol=FP64_TOL)


def test_reference_point_from_sums_equals_batch_mean():
    """The trainer's path: (sum, count) per micro-batch, summed (all-reduced), divided, passed in."""
    policy, ref, desirable, kl_policy, kl_ref = _random_case(10)
    parts = [kto_reference_point(kl_policy[:4], kl_ref[:4]), kto_reference_point(kl_policy[4:], kl_ref[4:])]
    total = sum(part[0] for part in parts)
    count = sum(part[1] for part in parts)
    assert count.item() == 10 and count.dtype == total.dtype
    from_point, metrics = kto_loss(policy, ref, desirable, reference_point=total / count)
    from_pairs, _ = kto_loss(policy, ref, desirable, kl_policy_logps=kl_policy, kl_ref_logps=kl_ref)
    assert_close(from_point, from_pairs, atol=FP64_TOL, rtol=FP64_TOL)
    assert_close(metrics["reference_point"], (kl_policy - kl_ref).mean().clamp(min=0), atol=FP64_TOL, rtol=0)


def test_gradcheck_and_detached_reference_point():
    policy, ref, desirable, kl_policy, kl_ref = _random_case(4)
    desirable[:2] = torch.tensor([True, False])  # both classes present

    def loss_fn(policy, ref):
        return kto_loss(
            policy, ref, desirable, beta=0.3, undesirable_weight=1.5, kl_policy_logps=kl_policy, kl_ref_logps=kl_ref
        )[0]

    assert torch.autograd.gradcheck(loss_fn, (policy.clone().requires_grad_(), ref.clone().requires_grad_()))
    kl_policy = kl_policy.clone().requires_grad_()
    loss, _ = kto_loss(policy.requires_grad_(), ref, desirable, kl_policy_logps=kl_policy, kl_ref_logps=kl_ref)
    (grad_kl,) = torch.autograd.grad(loss.sum(), kl_policy, allow_unused=True)
    assert grad_kl is None  # z is a constant of the loss


def test_one_class_only_metrics_are_finite():
    loss, metrics = kto_loss(torch.tensor([-3.0]), torch.tensor([-4.0]), torch.tensor([True]), reference_point=0.0)
    # beta 0.1, r = 1, z = 0: 1 - sigmoid(0.1) = 0.475021
    assert_close(loss, torch.tensor([0.475021]), atol=HAND_TOL, rtol=0)
    assert metrics["undesirable_reward"].item() == 0.0 and metrics["num_undesirable"].item() == 0


def _call(**overrides):
    args = dict(
        policy_logps=torch.zeros(3),
        ref_logps=torch.zeros(3),
        desirable=torch.ones(3, dtype=torch.bool),
        reference_point=0.0,
    )
    args.update(overrides)
    return kto_loss(**args)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(desirable=torch.ones(3)), "desirable must be a bool tensor"),
        (dict(ref_logps=torch.zeros(2)), "ref_logps must have the shape"),
        (dict(desirable=torch.ones(4, dtype=torch.bool)), "desirable must have the shape"),
        (dict(policy_logps=torch.zeros(3, 1)), r"policy_logps must be \[batch\]"),
        (dict(beta=0.0), "beta must be > 0"),
        (dict(undesirable_weight=-1.0), "must be >= 0"),
        (dict(reference_point=None), "exactly one"),
        (dict(kl_policy_logps=torch.zeros(3), kl_ref_logps=torch.zeros(3)), "exactly one"),
        (dict(reference_point=None, kl_policy_logps=torch.zeros(3)), "one of them is missing"),
        (
            dict(reference_point=None, kl_policy_logps=torch.zeros(3), kl_ref_logps=torch.zeros(2)),
            "kl_ref_logps must have",
        ),
    ],
)
def test_bad_arguments(overrides, message):
    with pytest.raises(ValueError, match=message):
        _call(**overrides)
