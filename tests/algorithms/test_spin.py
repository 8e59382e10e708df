"""SPIN's loss against hand-worked numbers and an independent float64 formula; identical pairs carry nothing."""

import math

import pytest
import torch
from torch.testing import assert_close

from aligner.algorithms.spin import spin_loss

# Hand-worked numbers below are written to 6 decimals.
HAND_TOL = 5e-7
# The closed form in float64 two ways: a few ulps of values of order 1.
FP64_TOL = 1e-12


def test_hand_worked_pairs():
    # beta = 0.2, three pairs:
    #   pair 0: real policy -10, ref -12 (Δ_real 2); generated policy -15, ref -14 (Δ_gen -1)
    #           beta (Δ_real - Δ_gen) = 0.2 * 3 = 0.6; loss = log(1 + e^-0.6) = log(1.548812) = 0.437488
    #   pair 1: real -20 vs ref -19 (Δ -1); generated -8 vs ref -9 (Δ 1): gap 0.2 * -2 = -0.4;
    #           loss = log(1 + e^0.4) = log(2.491825) = 0.913015
    #   pair 2: the generated response is the real one (identical): both Δ -0.5, gap 0, loss log 2 = 0.693147
    # rewards: real 0.2 * (2, -1, -0.5) -> mean 0.2 * 0.5 / 3 = 0.033333; generated 0.2 * (-1, 1, -0.5) -> -0.033333
    # margin (0.6 - 0.4 + 0) / 3 = 0.066667; accuracy over the 2 distinct pairs: 1 / 2
    policy_real = torch.tensor([-10.0, -20.0, -3.5], dtype=torch.float64, requires_grad=True)
    policy_generated = torch.tensor([-15.0, -8.0, -3.5], dtype=torch.float64, requires_grad=True)
    ref_real = torch.tensor([-12.0, -19.0, -3.0], dtype=torch.float64)
    ref_generated = torch.tensor([-14.0, -9.0, -3.0], dtype=torch.float64)
    identical = torch.tensor([False, False, True])
    loss, metrics = spin_loss(policy_real, policy_generated, ref_real, ref_generated, identical, beta=0.2)
    assert_close(loss, torch.tensor([0.437488, 0.913015, 0.693147], dtype=torch.float64), atol=HAND_TOL, rtol=0)
    assert metrics["real_reward"].item() == pytest.approx(0.033333, abs=HAND_TOL)
    assert metrics["generated_reward"].item() == pytest.approx(-0.033333, abs=HAND_TOL)
    assert metrics["margin"].item() == pytest.approx(0.066667, abs=HAND_TOL)
    assert metrics["accuracy"].item() == 0.5
    assert metrics["distinct_pairs"].item() == 2
    assert metrics["identical_fraction"].item() == pytest.approx(1 / 3)


def test_matches_the_closed_form_and_its_gradient():
    batch, beta = 64, 0.3
    policy_real, policy_generated = (-40 * torch.rand(2, batch, dtype=torch.float64) - 5).requires_grad_().unbind(0)
    ref_real = policy_real.detach() + torch.randn(batch, dtype=torch.float64)
    ref_generated = policy_generated.detach() + torch.randn(batch, dtype=torch.float64)
    identical = torch.rand(batch) < 0.3
    loss, metrics = spin_loss(policy_real, policy_generated, ref_real, ref_generated, identical, beta=beta)
    x = beta * ((policy_real - ref_real) - (policy_generated - ref_generated))
    want = torch.log1p(torch.exp(-x))  # -logsigmoid, written independently
    assert_close(loss, want, atol=FP64_TOL, rtol=FP64_TOL)
    (grad_real,) = torch.autograd.grad(loss.sum(), policy_real)
    assert_close(grad_real, -beta / (1 + torch.exp(x.detach())), atol=FP64_TOL, rtol=FP64_TOL)
    distinct = ~identical
    want_accuracy = ((x.detach() > 0) & distinct).sum().item() / distinct.sum().item()
    assert metrics["accuracy"].item() == pytest.approx(want_accuracy, abs=FP64_TOL)


def test_an_identical_pair_has_loss_log2_and_no_gradient():
    # The same tokens under the same policy and reference: Δ_real = Δ_generated whatever the weights.
    logps = torch.tensor([-7.25], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-6.5], dtype=torch.float64)
    loss, metrics = spin_loss(logps, logps, ref, ref, torch.tensor([True]), beta=0.2)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-15)
    (grad,) = torch.autograd.grad(loss.sum(), logps)
    assert grad.item() == 0.0
    assert metrics["accuracy"].item() == 0.0 and metrics["distinct_pairs"].item() == 0


def test_bad_inputs_are_named():
    values = torch.zeros(3)
    with pytest.raises(ValueError, match="identical"):
        spin_loss(values, values, values, values, torch.zeros(2, dtype=torch.bool), beta=0.2)
    with pytest.raises(ValueError, match="beta"):
        spin_loss(values, values, values, values, torch.zeros(3, dtype=torch.bool), beta=0.0)
