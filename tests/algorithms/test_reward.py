"""Pairwise (Bradley-Terry) and multi-attribute regression reward-model losses."""

import math

import pytest
import torch
from torch.testing import assert_close

from aligner.algorithms.reward import labelled_mean, pairwise_loss, regression_loss

# Closed forms evaluated in float64 by two differently written implementations: a few ulps apart.
FP64_TOL = 1e-12
# Hand-worked numbers below are written to 6 decimals.
HAND_TOL = 5e-7


def test_pairwise_hand_worked():
    # r_c = [1, 0], r_r = [0, 0.5]:
    #   pair 0: -logsigmoid(1)    = log(1 + e^-1)   = 0.313262
    #   pair 1: -logsigmoid(-0.5) = log(1 + e^0.5)  = 0.974077
    #   accuracy 1/2, mean margin (1 - 0.5) / 2 = 0.25, chosen mean 0.5, rejected mean 0.25
    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.5])
    loss, metrics = pairwise_loss(chosen, rejected)
    assert_close(loss, torch.tensor([0.313262, 0.974077]), atol=HAND_TOL, rtol=0)
    assert metrics["accuracy"].item() == 0.5
    assert_close(metrics["margin"], torch.tensor(0.25))
    assert_close(metrics["chosen_reward"], torch.tensor(0.5))
    assert_close(metrics["rejected_reward"], torch.tensor(0.25))
    # margin [0.5, 0]: pair 0 becomes -logsigmoid(0.5) = 0.474077;
    # centering 0.01 * (r_c + r_r)^2 adds 0.01 * [1, 0.25]
    loss, _ = pairwise_loss(chosen, rejected, margin=torch.tensor([0.5, 0.0]), centering_coef=0.01)
    assert_close(loss, torch.tensor([0.474077 + 0.01, 0.974077 + 0.0025]), atol=HAND_TOL, rtol=0)
    # a float margin applies to every pair: 1 - 0.5 -> 0.474077, -0.5 - 0.5 -> log(1 + e^1) = 1.313262
    loss, _ = pairwise_loss(chosen, rejected, margin=0.5)
    assert_close(loss, torch.tensor([0.474077, 1.313262]), atol=HAND_TOL, rtol=0)


@pytest.mark.parametrize("batch", [1, 12])
def test_pairwise_matches_float64_reference(batch):
    chosen, rejected = 3 * torch.randn(2, batch, dtype=torch.float64)
    margin = torch.rand(batch, dtype=torch.float64)
    coef = torch.rand(()).item()
    loss, metrics = pairwise_loss(chosen, rejected, margin=margin, centering_coef=coef)
    expected = torch.tensor(
        [
            math.log1p(math.exp(-(c - r - m))) + coef * (c + r) ** 2
            for c, r, m in zip(chosen.tolist(), rejected.tolist(), margin.tolist(), strict=True)
        ],
        dtype=torch.float64,
    )
    assert_close(loss, expected, atol=FP64_TOL, rtol=FP64_TOL)
    wins = sum(c > r for c, r in zip(chosen.tolist(), rejected.tolist(), strict=True))
    assert metrics["accuracy"].item() == wins / batch


def test_pairwise_gradcheck():
    chosen, rejected = torch.randn(2, 3, dtype=torch.float64)
    margin = torch.rand(3, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda c, r: pairwise_loss(c, r, margin=margin, centering_coef=0.1)[0],
        (chosen.requires_grad_(), rejected.requires_grad_()),
    )


def test_regression_hand_worked():
    # example 0: attributes 0 and 2 labelled: (1 - 2)^2 + (3 - 1)^2 = 1 + 4 = 5; example 1: nothing labelled -> 0
    # 2 labels in all -> labelled mean 5 / 2; per attribute MSE [1, none -> 0, 4] over counts [1, 0, 1]
    predictions = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], requires_grad=True)
    targets = torch.tensor([[2.0, -100.0, 1.0], [-100.0, -100.0, -100.0]])
    loss, metrics = regression_loss(predictions, targets)
    assert_close(loss, torch.tensor([5.0, 0.0]))
    assert metrics["num_labels"].item() == 2
    assert_close(metrics["sse"], torch.tensor(5.0))
    assert_close(metrics["attribute_mse"], torch.tensor([1.0, 0.0, 4.0]))
    assert metrics["attribute_count"].tolist() == [1, 0, 1]
    mean = labelled_mean(loss, metrics["num_labels"])
    assert_close(mean, torch.tensor(2.5))
    mean.backward()
    # d/dp of (p - t)^2 / 2 = (p - t): [-1, 0, 2] on row 0, nothing on row 1
    assert_close(predictions.grad, torch.tensor([[-1.0, 0.0, 2.0], [0.0, 0.0, 0.0]]))


def test_regression_all_missing_gives_zero_not_nan():
    predictions = torch.randn(1, 5, requires_grad=True)
    loss, metrics = regression_loss(predictions, torch.full((1, 5), -100.0))
    mean = labelled_mean(loss, metrics["num_labels"])
    mean.backward()
    assert mean.item() == 0.0 and metrics["num_labels"].item() == 0
    assert torch.equal(predictions.grad, torch.zeros(1, 5))
    assert torch.equal(metrics["attribute_mse"], torch.zeros(5))


@pytest.mark.parametrize("batch", [1, 10])
def test_regression_matches_float64_reference(batch):
    attributes = 5
    predictions = 4 * torch.rand(batch, attributes, dtype=torch.float64)
    targets = torch.randint(0, 5, (batch, attributes)).double()
    targets[torch.rand(batch, attributes) < 0.3] = -100.0
    loss, metrics = regression_loss(predictions, targets)
    expected_rows, per_attribute = [], [[] for _ in range(attributes)]
    for row_p, row_t in zip(predictions.tolist(), targets.tolist(), strict=True):
        total = 0.0
        for k, (p, t) in enumerate(zip(row_p, row_t, strict=True)):
            if t != -100.0:
                total += (p - t) ** 2
                per_attribute[k].append((p - t) ** 2)
        expected_rows.append(total)
    assert_close(loss, torch.tensor(expected_rows, dtype=torch.float64), atol=FP64_TOL, rtol=FP64_TOL)
    expected_mse = torch.tensor([sum(e) / len(e) if e else 0.0 for e in per_attribute], dtype=torch.float64)
    assert_close(metrics["attribute_mse"], expected_mse, atol=FP64_TOL, rtol=FP64_TOL)
    assert metrics["num_labels"].item() == sum(len(e) for e in per_attribute)


def test_regression_custom_ignore_value_and_gradcheck():
    predictions = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    targets = torch.randn(3, 4, dtype=torch.float64)
    targets[0, 1] = targets[2, 3] = -1.0
    loss, metrics = regression_loss(predictions, targets, ignore_value=-1.0)
    assert metrics["num_labels"].item() == 10
    assert torch.autograd.gradcheck(lambda p: regression_loss(p, targets, ignore_value=-1.0)[0], (predictions,))


def test_bad_arguments():
    with pytest.raises(ValueError, match="rejected_rewards must have the shape"):
        pairwise_loss(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match=r"chosen_rewards must be \[batch\]"):
        pairwise_loss(torch.zeros(3, 1), torch.zeros(3, 1))
    with pytest.raises(ValueError, match="margin must be a float or a tensor of shape"):
        pairwise_loss(torch.zeros(3), torch.zeros(3), margin=torch.zeros(2))
    with pytest.raises(ValueError, match="centering_coef must be >= 0"):
        pairwise_loss(torch.zeros(3), torch.zeros(3), centering_coef=-0.1)
    with pytest.raises(ValueError, match="targets must have the shape"):
        regression_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"predictions must be \[batch, attributes\]"):
        regression_loss(torch.zeros(3), torch.zeros(3))
