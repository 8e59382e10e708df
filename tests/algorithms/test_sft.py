"""SFT summed NLL and its global token-mean normalization."""

import pytest
import torch
from torch.testing import assert_close

from aligner.algorithms.sft import sft_loss, token_mean

# Sums of at most a few hundred float64 terms of order 1-10, in different orders: a few ulps.
FP64_TOL = 1e-12


def test_hand_worked():
    # row 0 trains tokens with log-probs -1 and -2 -> NLL 3; row 1 trains one token, -0.5 -> 0.5.
    # The untrained positions hold anything (here -inf and 7): they must not leak in.
    token_logprobs = torch.tensor([[-1.0, -2.0, float("-inf")], [-0.5, 7.0, 0.0]], requires_grad=True)
    loss_mask = torch.tensor([[True, True, False], [True, False, False]])
    nll, metrics = sft_loss(token_logprobs, loss_mask)
    assert_close(nll, torch.tensor([3.0, 0.5]))
    assert metrics["num_tokens"].item() == 3
    assert_close(metrics["nll_sum"], torch.tensor(3.5))
    loss = token_mean(nll, metrics["num_tokens"])  # 3.5 / 3
    assert_close(loss, torch.tensor(3.5 / 3))
    loss.backward()
    assert_close(token_logprobs.grad, -loss_mask.float() / 3)


def test_all_rows_masked_gives_zero_not_nan():
    token_logprobs = torch.randn(2, 5, requires_grad=True)
    nll, metrics = sft_loss(token_logprobs, torch.zeros(2, 5, dtype=torch.bool))
    assert metrics["num_tokens"].item() == 0
    loss = token_mean(nll, metrics["num_tokens"])
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(token_logprobs.grad, torch.zeros(2, 5))


@pytest.mark.parametrize("batch", [1, 6])
def test_matches_float64_reference(batch):
    seq = 17
    token_logprobs = -5 * torch.rand(batch, seq, dtype=torch.float64)
    loss_mask = torch.rand(batch, seq) < 0.6
    nll, metrics = sft_loss(token_logprobs, loss_mask.long())  # a 0/1 mask works too
    expected = torch.tensor(
        [
            -sum(lp for lp, m in zip(row_lp, row_m, strict=True) if m)
            for row_lp, row_m in zip(token_logprobs.tolist(), loss_mask.tolist(), strict=True)
        ],
        dtype=torch.float64,
    )
    assert_close(nll, expected, atol=FP64_TOL, rtol=FP64_TOL)
    assert metrics["num_tokens"].item() == int(loss_mask.sum())


def test_micro_batches_give_the_global_token_mean():
    """Summing token_mean over micro-batches with the global count = one token mean over the batch."""
    token_logprobs = (-5 * torch.rand(8, 11, dtype=torch.float64)).requires_grad_()
    loss_mask = torch.rand(8, 11) < 0.5
    loss_mask[0, :] = False  # an example with no trained token
    global_tokens = loss_mask.sum()
    accumulated = sum(
        token_mean(sft_loss(token_logprobs[rows], loss_mask[rows])[0], global_tokens)
        for rows in (slice(0, 3), slice(3, 8))  # uneven micro-batches
    )
    (grad_accumulated,) = torch.autograd.grad(accumulated, token_logprobs)
    global_mean = -(token_logprobs * loss_mask).sum() / global_tokens
    (grad_global,) = torch.autograd.grad(global_mean, token_logprobs)
    assert_close(accumulated, global_mean, atol=FP64_TOL, rtol=FP64_TOL)
    assert_close(grad_accumulated, grad_global, atol=FP64_TOL, rtol=FP64_TOL)


def test_gradcheck():
    token_logprobs = (-3 * torch.rand(3, 4, dtype=torch.float64)).requires_grad_()
    loss_mask = torch.rand(3, 4) < 0.5
    assert torch.autograd.gradcheck(lambda lp: sft_loss(lp, loss_mask)[0], (token_logprobs,))


def test_bad_shapes():
    with pytest.raises(ValueError, match="loss_mask must have the shape"):
        sft_loss(torch.zeros(2, 3), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"token_logprobs must be \[batch, seq\]"):
        sft_loss(torch.zeros(2, 3, 4), torch.ones(2, 3, 4, dtype=torch.bool))
