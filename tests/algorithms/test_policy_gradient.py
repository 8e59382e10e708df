"""Shared policy-gradient numerics: hand-worked cases, float64 references, split-vs-whole, gradients, edges."""

import math

import pytest
import torch
from torch.testing import assert_close

from aligner.algorithms.policy_gradient import (
    AGGREGATIONS,
    PolicyLossConfig,
    aggregate_loss,
    aggregation_counts,
    broadcast_advantages,
    clipped_policy_loss,
    generation_mismatch_metrics,
    kl_in_reward,
    kl_loss_term,
    loss_sum_and_count,
    mask_unfinished,
    policy_loss,
    truncated_importance_weights,
)

# Float64 computations by two differently written implementations (sums of a few dozen O(1)
# terms, exp/log of O(1) arguments): a few ulps of O(10) values.
FP64_TOL = 1e-12
# Hand-worked inputs go through one log (to build the log-prob) and one exp (the ratio), and
# the results are at most ~10 in size: a few ulps of the dtype. Six-decimal hand numbers get 5e-7.
HAND_TOL = {torch.float32: 5e-6, torch.float64: 1e-12}
SIX_DECIMALS = 5e-7
SEVEN_DECIMALS = 5e-8
DTYPES = [torch.float32, torch.float64]
MAX_LENGTH = 12


def _random_mask(batch: int, length: int, *, empty_rows: int = 1) -> torch.Tensor:
    """Right-padded responses of random lengths in [1, length], with ``empty_rows`` rows of none and one hole."""
    lengths = torch.randint(1, length + 1, (batch,))
    lengths[:empty_rows] = 0
    mask = torch.arange(length) < lengths.unsqueeze(-1)
    mask[-1, 0] = False if lengths[-1] > 1 else mask[-1, 0]  # a hole (multi-turn style) in the last row
    return mask[torch.randperm(batch)]


# ---- aggregation ------------------------------------------------------------------

# Per-token loss with garbage (inf, nan, 100) at masked positions, which must be ignored:
#   row 0: [1, 2, 3 | inf]  -> 3 tokens, sum 6, mean 2
#   row 1: [4, 5 | nan, 100] -> 2 tokens, sum 9, mean 4.5
#   row 2: all masked        -> not a sequence
# tokens 5, sequences 2, L_max = 10:
#   token-mean              15 / 5        = 3       (numerator 15, count 5)
#   seq-mean-token-mean     (2 + 4.5) / 2 = 3.25    (numerator 6.5, count 2)
#   seq-mean-token-sum      (6 + 9) / 2   = 7.5     (numerator 15, count 2)
#   seq-mean-token-sum-norm 15 / (2 * 10) = 0.75    (numerator 1.5, count 2)
HAND_LOSS = [[1.0, 2.0, 3.0, math.inf], [4.0, 5.0, math.nan, 100.0], [100.0, 100.0, 100.0, 100.0]]
HAND_MASK = [[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]]
HAND_AGGREGATES = {
    "token-mean": (15.0, 5, 3.0),
    "seq-mean-token-mean": (6.5, 2, 3.25),
    "seq-mean-token-sum": (15.0, 2, 7.5),
    "seq-mean-token-sum-norm": (1.5, 2, 0.75),
}
# d loss / d l[i, t] at valid positions: token-mean 1/5; seq-mean-token-mean 1 / (N * tokens_i) = 1/6 (row 0),
# 1/4 (row 1); seq-mean-token-sum 1/N = 1/2; seq-mean-token-sum-norm 1 / (N * L_max) = 1/20.
HAND_GRADIENTS = {
    "token-mean": (0.2, 0.2),
    "seq-mean-token-mean": (1 / 6, 0.25),
    "seq-mean-token-sum": (0.5, 0.5),
    "seq-mean-token-sum-norm": (0.05, 0.05),
}


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_aggregation_hand_worked(mode, dtype, mask_dtype):
    per_token = torch.tensor(HAND_LOSS, dtype=dtype, requires_grad=True)
    mask = torch.tensor(HAND_MASK).to(mask_dtype)
    numerator, count, loss = HAND_AGGREGATES[mode]
    got_numerator, got_count = loss_sum_and_count(per_token, mask, mode, max_length=10)
    assert got_count.dtype == torch.int64 and got_count.item() == count
    assert_close(got_numerator, torch.tensor(numerator, dtype=dtype), atol=HAND_TOL[dtype], rtol=0)
    got = aggregate_loss(per_token, mask, mode, max_length=10)
    assert_close(got, torch.tensor(loss, dtype=dtype), atol=HAND_TOL[dtype], rtol=0)
    got.backward()
    row0, row1 = HAND_GRADIENTS[mode]
    expected = torch.tensor([[row0] * 3 + [0.0], [row1] * 2 + [0.0, 0.0], [0.0] * 4], dtype=dtype)
    assert_close(per_token.grad, expected, atol=HAND_TOL[dtype], rtol=0)


def test_aggregation_counts_hand_worked():
    tokens, sequences = aggregation_counts(torch.tensor(HAND_MASK))
    assert (tokens.item(), sequences.item()) == (5, 2)
    assert tokens.dtype == sequences.dtype == torch.int64


def _reference_aggregate(per_token, mask, mode, max_length):
    """Row-by-row float64 loops (no code shared with the module)."""
    rows = []
    for values, keep in zip(per_token.double().tolist(), (mask != 0).tolist(), strict=True):
        kept = [v for v, k in zip(values, keep, strict=True) if k]
        if kept:
            rows.append(kept)
    if not rows:
        return 0.0
    if mode == "token-mean":
        return sum(sum(r) for r in rows) / sum(len(r) for r in rows)
    if mode == "seq-mean-token-mean":
        return sum(sum(r) / len(r) for r in rows) / len(rows)
    if mode == "seq-mean-token-sum":
        return sum(sum(r) for r in rows) / len(rows)
    return sum(sum(r) for r in rows) / (len(rows) * max_length)


@pytest.mark.parametrize("mode", AGGREGATIONS)
@pytest.mark.parametrize(("batch", "length"), [(1, 1), (5, 7), (16, 33)])
def test_aggregation_matches_float64_reference(mode, batch, length):
    per_token = torch.randn(batch, length, dtype=torch.float64)
    mask = _random_mask(batch, length, empty_rows=1 if batch > 1 else 0)
    got = aggregate_loss(per_token, mask, mode, max_length=MAX_LENGTH)
    expected = _reference_aggregate(per_token, mask, mode, MAX_LENGTH)
    assert_close(got, torch.tensor(expected, dtype=torch.float64), atol=FP64_TOL, rtol=FP64_TOL)


def _split(per_token, mask, parts):
    """Micro-batches of the given row counts, each trimmed to its own longest valid column (own padding)."""
    pieces, start = [], 0
    for rows in parts:
        chunk_mask = mask[start : start + rows]
        valid_columns = (chunk_mask != 0).any(dim=0).nonzero()
        width = int(valid_columns.max()) + 1 if len(valid_columns) else 1
        pieces.append((per_token[start : start + rows, :width], chunk_mask[:, :width]))
        start += rows
    return pieces


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_split_into_micro_batches_and_ranks_equals_one_batch(mode):
    """Two 'ranks' x uneven micro-batches, each padded to its own width: same loss and gradient as one batch."""
    batch, length = 11, 13
    per_token = torch.randn(batch, length, dtype=torch.float64, requires_grad=True)
    mask = _random_mask(batch, length, empty_rows=2)
    whole = aggregate_loss(per_token, mask, mode, max_length=MAX_LENGTH)
    (whole_grad,) = torch.autograd.grad(whole, per_token)

    ranks = [[1, 4], [3, 2, 1]]  # rank 0 has micro-batches of 1 and 4 rows, rank 1 of 3, 2 and 1
    micro_batches = _split(per_token, mask, [rows for rank in ranks for rows in rank])
    counts = [aggregation_counts(chunk_mask) for _, chunk_mask in micro_batches]
    global_tokens = sum(tokens for tokens, _ in counts)  # what the all-reduce of the summed counts gives
    global_sequences = sum(sequences for _, sequences in counts)

    # NeMo-RL style: each micro-batch normalized by the global count, losses (gradients) summed.
    shares = [
        aggregate_loss(
            chunk,
            chunk_mask,
            mode,
            max_length=MAX_LENGTH,
            global_tokens=global_tokens,
            global_sequences=global_sequences,
        )
        for chunk, chunk_mask in micro_batches
    ]
    total = torch.stack(shares).sum()
    (split_grad,) = torch.autograd.grad(total, per_token)
    assert_close(total, whole, atol=FP64_TOL, rtol=FP64_TOL)
    assert_close(split_grad, whole_grad, atol=FP64_TOL, rtol=FP64_TOL)

    # train_step style: sum of numerators over sum of counts.
    pairs = [loss_sum_and_count(chunk, chunk_mask, mode, max_length=MAX_LENGTH) for chunk, chunk_mask in micro_batches]
    numerator = torch.stack([n for n, _ in pairs]).sum()
    count = sum(c for _, c in pairs)
    assert_close(numerator / count, whole, atol=FP64_TOL, rtol=FP64_TOL)
    (pair_grad,) = torch.autograd.grad(numerator / count, per_token)
    assert_close(pair_grad, whole_grad, atol=FP64_TOL, rtol=FP64_TOL)

    # The test has teeth: the naive mean of per-micro-batch means is another number.
    naive = torch.stack([aggregate_loss(c, m, mode, max_length=MAX_LENGTH) for c, m in micro_batches]).mean()
    assert not torch.allclose(naive, whole)


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_all_masked_gives_zero_not_nan(mode):
    per_token = torch.full((3, 4), math.nan, requires_grad=True)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    loss = aggregate_loss(per_token, mask, mode, max_length=4)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(per_token.grad, torch.zeros(3, 4))
    shared = aggregate_loss(per_token.detach(), mask, mode, max_length=4, global_tokens=0, global_sequences=0)
    assert shared.item() == 0.0


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_aggregation_gradcheck(mode):
    per_token = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    mask = _random_mask(4, 5)
    assert torch.autograd.gradcheck(lambda x: aggregate_loss(x, mask, mode, max_length=7), (per_token,))


def test_aggregation_argument_errors():
    per_token, mask = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="unknown aggregation 'mean'.*token-mean"):
        aggregate_loss(per_token, mask, "mean")
    with pytest.raises(ValueError, match="max_length"):
        aggregate_loss(per_token, mask, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="pass global_sequences"):
        aggregate_loss(per_token, mask, "seq-mean-token-mean", global_tokens=6)
    with pytest.raises(ValueError, match="pass global_tokens"):
        aggregate_loss(per_token, mask, "token-mean", global_sequences=2)
    with pytest.raises(ValueError, match="per_token_loss must have the shape of mask"):
        loss_sum_and_count(torch.zeros(2, 4), mask, "token-mean")
    with pytest.raises(ValueError, match=r"mask must be \[batch, response_tokens\]"):
        aggregation_counts(torch.ones(6))


# ---- clipped surrogate -----------------------------------------------------------

# eps_low 0.2, eps_high 0.28 (clip range [0.8, 1.28]); old log-probs -1, new = -1 + ln(ratio):
#   row 0, A = +1:  r = 1.5: max(-1.5, -1.28) = -1.28 (clipped, no gradient)
#                   r = 0.5: max(-0.5, -0.8)  = -0.5  (d/dlogp = -A r = -0.5)
#                   r = 1.1: -1.1                      (d/dlogp = -1.1)
#   row 1, A = -2:  r = 1.5: max(3, 2.56) = 3          (d/dlogp = -A r = 3)
#                   r = 0.5: max(1, 1.6)  = 1.6 (clipped, no gradient)
#                   r = 4:   max(8, 2.56) = 8          (d/dlogp = 8); dual clip c = 3: min(8, -A c = 6) = 6
#                   (4th token masked)
# clip fraction 2/6; dual-clip fraction 1/6; ratios mean (1.5 + 0.5 + 1.1 + 1.5 + 0.5 + 4) / 6 = 9.1 / 6,
# min 0.5, max 4.
HAND_RATIOS = [[1.5, 0.5, 1.1, 1.0], [1.5, 0.5, 4.0, 1.0]]
HAND_PG_MASK = [[1, 1, 1, 0], [1, 1, 1, 0]]


def _hand_pg_inputs(dtype):
    old = torch.full((2, 4), -1.0, dtype=dtype)
    logprobs = (old + torch.tensor(HAND_RATIOS, dtype=torch.float64).log().to(dtype)).requires_grad_()
    return logprobs, old, torch.tensor([1.0, -2.0], dtype=dtype), torch.tensor(HAND_PG_MASK, dtype=torch.bool)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_clipped_policy_loss_hand_worked(dtype, dual_clip):
    logprobs, old, advantages, mask = _hand_pg_inputs(dtype)
    loss, metrics = clipped_policy_loss(
        logprobs, old, advantages, mask, eps_low=0.2, eps_high=0.28, dual_clip=dual_clip
    )
    last = 8.0 if dual_clip is None else 6.0
    expected = torch.tensor([[-1.28, -0.5, -1.1, 0.0], [3.0, 1.6, last, 0.0]], dtype=dtype)
    tol = HAND_TOL[dtype]
    assert loss.dtype == dtype
    assert_close(loss, expected, atol=tol, rtol=0)
    loss.sum().backward()
    last_grad = 8.0 if dual_clip is None else 0.0
    expected_grad = torch.tensor([[0.0, -0.5, -1.1, 0.0], [3.0, 0.0, last_grad, 0.0]], dtype=dtype)
    assert_close(logprobs.grad, expected_grad, atol=tol, rtol=0)
    assert_close(metrics["clip_fraction"], torch.tensor(2 / 6, dtype=dtype), atol=tol, rtol=0)
    dual_fraction = 0.0 if dual_clip is None else 1 / 6
    assert_close(metrics["dual_clip_fraction"], torch.tensor(dual_fraction, dtype=dtype), atol=tol, rtol=0)
    assert_close(metrics["ratio_mean"], torch.tensor(9.1 / 6, dtype=dtype), atol=tol, rtol=0)
    assert_close(metrics["ratio_min"], torch.tensor(0.5, dtype=dtype), atol=tol, rtol=0)
    assert_close(metrics["ratio_max"], torch.tensor(4.0, dtype=dtype), atol=tol, rtol=0)
    assert all(not value.requires_grad and value.dim() == 0 for value in metrics.values())


# GSPO, eps 0.2 / 0.28, seq-mean-token-mean; old log-probs -1:
#   row 0, A = +1, log-ratios [ln 2, 0]: s = exp(ln 2 / 2) = sqrt 2 = 1.414214 > 1.28:
#          per token max(-1.414214, -1.28) = -1.28 (clipped, no gradient)
#   row 1, A = -1, log-ratios [ln 0.81, 0, masked]: s = exp(ln 0.81 / 2) = 0.9 (inside the clip range):
#          per token -A s = 0.9
#   loss = (-1.28 + 0.9) / 2 = -0.19
#   row 1's token mean is -A s = s; ds/dlogp_t = s / 2 = 0.45 (s = exp of the mean over 2 tokens);
#   the mean over N = 2 sequences halves it: d loss / d logp_(1,t) = 0.225, GSPO's gradient
#   (-A) s_i / |y_i| / N = 0.9 / 2 / 2.
def test_sequence_ratio_hand_worked():
    old = torch.full((2, 3), -1.0, dtype=torch.float64)
    log_ratios = torch.tensor([[math.log(2.0), 0.0, 0.0], [math.log(0.81), 0.0, 5.0]], dtype=torch.float64)
    logprobs = (old + log_ratios).requires_grad_()
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    per_token, metrics = clipped_policy_loss(
        logprobs, old, torch.tensor([1.0, -1.0], dtype=torch.float64), mask, eps_low=0.2, eps_high=0.28,
        ratio_level="sequence",
    )  # fmt: skip
    tol = HAND_TOL[torch.float64]
    assert_close(per_token, torch.tensor([[-1.28, -1.28, 0.0], [0.9, 0.9, 0.0]], dtype=torch.float64), atol=tol, rtol=0)
    loss = aggregate_loss(per_token, mask, "seq-mean-token-mean")
    assert_close(loss, torch.tensor(-0.19, dtype=torch.float64), atol=tol, rtol=0)
    loss.backward()
    expected_grad = torch.tensor([[0.0, 0.0, 0.0], [0.225, 0.225, 0.0]], dtype=torch.float64)
    assert_close(logprobs.grad, expected_grad, atol=tol, rtol=0)
    assert_close(metrics["clip_fraction"], torch.tensor(0.5, dtype=torch.float64), atol=tol, rtol=0)
    assert_close(metrics["ratio_max"], torch.tensor(math.sqrt(2.0), dtype=torch.float64), atol=tol, rtol=0)


def test_sequence_log_ratio_is_clamped_at_10():
    # mean log-ratio 12 > 10: s = e^10 = 22026.465795; A = -1 and no dual clip: loss -A s per token, no gradient.
    old = torch.zeros(1, 2, dtype=torch.float64)
    logprobs = torch.tensor([[12.0, 12.0]], dtype=torch.float64, requires_grad=True)
    loss, _ = clipped_policy_loss(logprobs, old, torch.tensor([-1.0]), torch.ones(1, 2), ratio_level="sequence")
    assert_close(loss, torch.full((1, 2), 22026.465795, dtype=torch.float64), atol=1e-6, rtol=0)
    loss.sum().backward()
    assert torch.equal(logprobs.grad, torch.zeros(1, 2, dtype=torch.float64))


def test_huge_token_log_ratios_stay_finite():
    # A log-ratio of 30 is clamped to 20: -A e^20 = 485165195.409790 for A = -1; a log-ratio of 100 with
    # A = 0 would be 0 * inf = NaN unclamped. Both give finite losses and zero gradients.
    old = torch.zeros(1, 2)
    logprobs = torch.tensor([[30.0, 100.0]], requires_grad=True)
    loss, metrics = clipped_policy_loss(logprobs, old, torch.tensor([[-1.0, 0.0]]), torch.ones(1, 2))
    assert_close(loss, torch.tensor([[485165195.409790, 0.0]]), rtol=1e-6, atol=0)
    loss.sum().backward()
    assert torch.equal(logprobs.grad, torch.zeros(1, 2))
    assert torch.isfinite(metrics["ratio_max"])


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_on_policy_ratio_is_exactly_one(ratio_level, dtype):
    """One update per rollout (old == new): ratio exactly 1, nothing clipped, gradient -A on valid tokens."""
    batch, length = 6, 9
    logprobs = (-3 * torch.rand(batch, length, dtype=dtype)).requires_grad_()
    advantages = torch.randn(batch, dtype=dtype)
    mask = _random_mask(batch, length)
    loss, metrics = clipped_policy_loss(
        logprobs, logprobs.detach().clone(), advantages, mask, dual_clip=3.0, ratio_level=ratio_level
    )
    for name in ("ratio_mean", "ratio_min", "ratio_max"):
        assert metrics[name].item() == 1.0, name
    assert metrics["clip_fraction"].item() == 0.0
    assert metrics["dual_clip_fraction"].item() == 0.0
    expected = torch.where(mask, -advantages.unsqueeze(-1).expand(batch, length), 0.0)
    assert torch.equal(loss, expected)
    if ratio_level == "token":
        loss.sum().backward()
        assert_close(logprobs.grad, expected, atol=0, rtol=0)


def test_length_one_responses_sequence_ratio_equals_token_ratio():
    batch = 7
    old = -2 * torch.rand(batch, 1, dtype=torch.float64)
    logprobs = old + 0.4 * torch.randn(batch, 1, dtype=torch.float64)
    advantages, mask = torch.randn(batch, dtype=torch.float64), torch.ones(batch, 1)
    token, token_metrics = clipped_policy_loss(logprobs, old, advantages, mask, dual_clip=2.0)
    sequence, sequence_metrics = clipped_policy_loss(
        logprobs, old, advantages, mask, dual_clip=2.0, ratio_level="sequence"
    )
    assert_close(sequence, token, atol=FP64_TOL, rtol=FP64_TOL)
    for name, value in token_metrics.items():
        assert_close(sequence_metrics[name], value, atol=FP64_TOL, rtol=FP64_TOL, msg=name)


def test_all_masked_policy_loss_is_zero():
    logprobs = torch.full((2, 3), -math.inf, requires_grad=True)  # pads may hold anything
    mask = torch.zeros(2, 3, dtype=torch.bool)
    for ratio_level in ("token", "sequence"):
        loss, metrics = clipped_policy_loss(logprobs, torch.zeros(2, 3), torch.ones(2), mask, ratio_level=ratio_level)
        total = aggregate_loss(loss, mask, "seq-mean-token-mean")
        (grad,) = torch.autograd.grad(total, logprobs)
        assert total.item() == 0.0 and torch.equal(grad, torch.zeros(2, 3))
        assert metrics["clip_fraction"].item() == 0.0
        assert metrics["ratio_min"].item() == metrics["ratio_max"].item() == 1.0


def _reference_clipped(logprobs, old, advantages, mask, eps_low, eps_high, dual_clip, ratio_level):
    """Scalar float64 loops over rows and tokens."""
    out = torch.zeros(logprobs.shape, dtype=torch.float64)
    for i in range(logprobs.shape[0]):
        valid = [t for t in range(logprobs.shape[1]) if mask[i, t]]
        if ratio_level == "sequence" and valid:
            mean_log_ratio = sum(float(logprobs[i, t] - old[i, t]) for t in valid) / len(valid)
            sequence_ratio = math.exp(min(mean_log_ratio, 10.0))
        for t in valid:
            a = float(advantages[i, t])
            r = sequence_ratio if ratio_level == "sequence" else math.exp(float(logprobs[i, t] - old[i, t]))
            value = max(-a * r, -a * min(max(r, 1 - eps_low), 1 + eps_high))
            if dual_clip is not None and a < 0:
                value = min(value, -a * dual_clip)
            out[i, t] = value
    return out


def _away_from_kinks(log_ratio, kinks, gap=2e-3):
    """Shift values closer than ``gap`` to a kink of the loss, so finite differences see a smooth function."""
    for kink in kinks:
        log_ratio = torch.where((log_ratio - kink).abs() < gap, log_ratio + 2 * gap, log_ratio)
    return log_ratio


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize("dual_clip", [None, 1.5])
@pytest.mark.parametrize("per_token_advantages", [False, True])
def test_clipped_policy_loss_matches_float64_reference(ratio_level, dual_clip, per_token_advantages):
    batch, length, eps_low, eps_high = 9, 11, 0.2, 0.28
    old = -4 * torch.rand(batch, length, dtype=torch.float64)
    logprobs = old + 0.5 * torch.randn(batch, length, dtype=torch.float64)
    advantages = torch.randn(batch, length if per_token_advantages else 1, dtype=torch.float64)
    advantages = advantages if per_token_advantages else advantages.squeeze(-1)
    mask = _random_mask(batch, length)
    loss, metrics = clipped_policy_loss(
        logprobs, old, advantages, mask, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip,
        ratio_level=ratio_level,
    )  # fmt: skip
    expected = _reference_clipped(
        logprobs, old, broadcast_advantages(advantages, mask), mask, eps_low, eps_high, dual_clip, ratio_level
    )
    assert_close(loss, expected, atol=FP64_TOL, rtol=FP64_TOL)
    assert 0.0 <= metrics["clip_fraction"].item() <= 1.0


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_clipped_policy_loss_gradcheck(ratio_level):
    batch, length = 4, 5
    old = -3 * torch.rand(batch, length, dtype=torch.float64)
    mask = _random_mask(batch, length, empty_rows=0)
    log_ratio = 0.5 * torch.randn(batch, length, dtype=torch.float64)
    if ratio_level == "token":
        log_ratio = _away_from_kinks(log_ratio, [math.log(0.8), math.log(1.28), math.log(1.5)])
    else:  # the kinks are on each row's mean log-ratio: keep it near 0, inside the clip range
        log_ratio = 0.1 * log_ratio
    advantages = torch.randn(batch, dtype=torch.float64)
    logprobs = (old + log_ratio).requires_grad_()

    def loss_fn(logprobs):
        per_token, _ = clipped_policy_loss(
            logprobs, old, advantages, mask, eps_low=0.2, eps_high=0.28, dual_clip=1.5, ratio_level=ratio_level
        )
        return aggregate_loss(per_token, mask, "seq-mean-token-mean")

    assert torch.autograd.gradcheck(loss_fn, (logprobs,))


def test_clipped_policy_loss_argument_errors():
    x, mask = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="eps_low"):
        clipped_policy_loss(x, x, torch.zeros(2), mask, eps_low=1.0)
    with pytest.raises(ValueError, match="eps_high"):
        clipped_policy_loss(x, x, torch.zeros(2), mask, eps_high=-0.1)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        clipped_policy_loss(x, x, torch.zeros(2), mask, dual_clip=1.0)
    with pytest.raises(ValueError, match="ratio_level"):
        clipped_policy_loss(x, x, torch.zeros(2), mask, ratio_level="seq")
    with pytest.raises(ValueError, match="advantages must be"):
        clipped_policy_loss(x, x, torch.zeros(3), mask)
    with pytest.raises(ValueError, match="old_logprobs must have the shape of mask"):
        clipped_policy_loss(x, torch.zeros(2, 4), torch.zeros(2), mask)


# ---- KL -----------------------------------------------------------------------------

# d = logp - ref = [0, 1, -1, 30, -30 | masked 7]; input clamp 20, output clamp 10:
#   k1:  [0, 1, -1, 20 -> 10, -20 -> -10]                   grads [1, 1, 1, 0, 0]
#   abs: [0, 1, 1, 10, 10]                                  grads [sign d: 0 at d=0 (torch's abs), 1, -1, 0, 0]
#   k2:  [0, 0.5, 0.5, 200 -> 10, 10]                       grads [d: 0, 1, -1, 0, 0]
#   k3:  exp(-d) + d - 1 = [0, 0.3678794, 0.7182818, 19.0000000 -> 10, e^20 - 21 -> 10]
#        grads 1 - exp(-d) = [0, 0.6321206, -1.7182818, 0, 0]
HAND_KL_D = [0.0, 1.0, -1.0, 30.0, -30.0, 7.0]
HAND_KL = {
    "k1": ([0.0, 1.0, -1.0, 10.0, -10.0], [1.0, 1.0, 1.0, 0.0, 0.0]),
    "abs": ([0.0, 1.0, 1.0, 10.0, 10.0], [0.0, 1.0, -1.0, 0.0, 0.0]),
    "k2": ([0.0, 0.5, 0.5, 10.0, 10.0], [0.0, 1.0, -1.0, 0.0, 0.0]),
    "k3": ([0.0, 0.3678794, 0.7182818, 10.0, 10.0], [0.0, 0.6321206, -1.7182818, 0.0, 0.0]),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("estimator", list(HAND_KL))
def test_kl_loss_term_hand_worked(estimator, dtype):
    ref = torch.full((1, 6), -2.0, dtype=dtype)
    logprobs = (ref + torch.tensor([HAND_KL_D], dtype=dtype)).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    kl, metrics = kl_loss_term(logprobs, ref, mask, estimator=estimator)
    values, grads = HAND_KL[estimator]
    tol = HAND_TOL[dtype] if dtype == torch.float32 else SEVEN_DECIMALS
    assert_close(kl, torch.tensor([values + [0.0]], dtype=dtype), atol=tol, rtol=0)
    assert_close(metrics["kl"], torch.tensor(sum(values) / 5, dtype=dtype), atol=tol, rtol=0)
    kl.sum().backward()
    assert_close(logprobs.grad, torch.tensor([grads + [0.0]], dtype=dtype), atol=tol, rtol=0)


def test_kl_loss_term_without_clamps():
    # d = 30: k1 30, k3 e^-30 + 29 = 29.000000
    ref, logprobs, mask = torch.zeros(1, 1), torch.full((1, 1), 30.0), torch.ones(1, 1)
    k1, _ = kl_loss_term(logprobs, ref, mask, estimator="k1", input_clamp=None, output_clamp=None)
    k3, _ = kl_loss_term(logprobs, ref, mask, estimator="k3", input_clamp=None, output_clamp=None)
    assert k1.item() == 30.0
    assert_close(k3, torch.tensor([[29.0]]), atol=5e-6, rtol=0)  # fp32 ulp at 29 is 1.9e-6


@pytest.mark.parametrize("estimator", list(HAND_KL))
def test_kl_loss_term_matches_float64_reference_and_gradcheck(estimator):
    batch, length = 6, 8
    ref = -4 * torch.rand(batch, length, dtype=torch.float64)
    d = 25 * torch.randn(batch, length, dtype=torch.float64)  # some beyond the +-20 input clamp
    logprobs = ref + d
    mask = _random_mask(batch, length)
    kl, metrics = kl_loss_term(logprobs, ref, mask, estimator=estimator)
    clamped = d.clamp(-20, 20)
    formulas = {
        "k1": clamped,
        "abs": clamped.abs(),
        "k2": clamped**2 / 2,
        "k3": torch.exp(-clamped) + clamped - 1,
    }
    expected = torch.where(mask, formulas[estimator].clamp(-10, 10), 0.0)
    assert_close(kl, expected, atol=FP64_TOL, rtol=FP64_TOL)
    expected_mean = expected.sum() / mask.sum() if mask.any() else torch.tensor(0.0, dtype=torch.float64)
    assert_close(metrics["kl"], expected_mean, atol=FP64_TOL, rtol=FP64_TOL)

    small = (ref + 0.3 * torch.randn(batch, length, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: kl_loss_term(x, ref, mask, estimator=estimator)[0], (small,))


# rewards [1, 2, 0.5]; logp - ref: row 0 [0.5, -0.1, 0.2], row 1 [0.3 | masked 99], row 2 all masked.
#   k1 mean: row 0 0.6 / 3 = 0.2, row 1 0.3, row 2 0  -> with kl_coef 0.1: [0.98, 1.97, 0.5]
#   k1 sum:  row 0 0.6,           row 1 0.3           -> [0.94, 1.97, 0.5]
#   abs mean: row 0 0.8 / 3 = 0.266667, row 1 0.3     -> [0.973333, 1.97, 0.5]
# metric: mean over the 3 sequences of the reduced KL, e.g. k1 mean (0.2 + 0.3 + 0) / 3 = 0.166667
HAND_KL_IN_REWARD = {
    ("k1", "mean"): ([0.98, 1.97, 0.5], 0.5 / 3),
    ("k1", "sum"): ([0.94, 1.97, 0.5], 0.9 / 3),
    ("abs", "mean"): ([0.973333, 1.97, 0.5], (0.8 / 3 + 0.3) / 3),
}


@pytest.mark.parametrize(("estimator", "reduction"), list(HAND_KL_IN_REWARD))
def test_kl_in_reward_hand_worked(estimator, reduction):
    ref = torch.full((3, 3), -1.0)
    logprobs = ref + torch.tensor([[0.5, -0.1, 0.2], [0.3, 99.0, 0.0], [5.0, 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    shaped, metrics = kl_in_reward(
        torch.tensor([1.0, 2.0, 0.5]), logprobs, ref, mask, kl_coef=0.1, estimator=estimator, reduction=reduction
    )
    expected, mean_kl = HAND_KL_IN_REWARD[estimator, reduction]
    assert_close(shaped, torch.tensor(expected), atol=SIX_DECIMALS, rtol=0)
    assert_close(metrics["kl_in_reward"], torch.tensor(mean_kl), atol=SIX_DECIMALS, rtol=0)


def test_kl_in_reward_errors():
    x, mask = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="reduction"):
        kl_in_reward(torch.zeros(2), x, x, mask, kl_coef=0.1, reduction="max")
    with pytest.raises(ValueError, match="kl_coef"):
        kl_in_reward(torch.zeros(2), x, x, mask, kl_coef=-0.1)
    with pytest.raises(ValueError, match="rewards must be"):
        kl_in_reward(torch.zeros(3), x, x, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_loss_term(x, x, mask, estimator="k4")


# ---- engine vs trainer -----------------------------------------------------------


# train - gen = [0, ln 1.5, ln 3, -ln 2 | masked 50]:
#   TIS weights, cap 2: min(exp(.), 2) = [1, 1.5, 2, 0.5, 0]; truncated fraction 1/4
#   token_mult_prob_error = mean exp|.| = (1 + 1.5 + 3 + 2) / 4 = 1.875
#   gen_kl_error: d = gen - train = [0, -ln 1.5, -ln 3, ln 2], k3 = exp(-d) + d - 1:
#     [0, 1.5 - 0.405465 - 1, 3 - 1.098612 - 1, 0.5 + 0.693147 - 1] = [0, 0.094535, 0.901388, 0.193147]
#     mean 0.2972674
def _hand_mismatch_inputs():
    train = torch.full((1, 5), -1.0)
    gaps = torch.tensor([[0.0, math.log(1.5), math.log(3.0), -math.log(2.0), 50.0]])
    return train, train - gaps, torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool)


def test_truncated_importance_weights_hand_worked():
    train, generation, mask = _hand_mismatch_inputs()
    weights, metrics = truncated_importance_weights(train, generation, mask, cap=2.0)
    assert_close(weights, torch.tensor([[1.0, 1.5, 2.0, 0.5, 0.0]]), atol=HAND_TOL[torch.float32], rtol=0)
    assert_close(metrics["tis_truncated_fraction"], torch.tensor(0.25))
    assert not weights.requires_grad


def test_generation_mismatch_metrics_hand_worked():
    train, generation, mask = _hand_mismatch_inputs()
    metrics = generation_mismatch_metrics(train, generation, mask)
    assert_close(metrics["token_mult_prob_error"], torch.tensor(1.875), atol=HAND_TOL[torch.float32], rtol=0)
    assert_close(metrics["gen_kl_error"], torch.tensor(0.2972674), atol=HAND_TOL[torch.float32], rtol=0)


def test_generation_mismatch_metrics_of_identical_logprobs():
    logprobs = -3 * torch.rand(4, 6)
    metrics = generation_mismatch_metrics(logprobs, logprobs.clone(), _random_mask(4, 6))
    assert metrics["token_mult_prob_error"].item() == 1.0
    assert metrics["gen_kl_error"].item() == 0.0


def test_mask_unfinished():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    got = mask_unfinished(mask, torch.tensor([True, False, True]))
    assert torch.equal(got, torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]))
    with pytest.raises(ValueError, match="is_end must be"):
        mask_unfinished(mask, torch.ones(2, dtype=torch.bool))


# ---- the composed loss ---------------------------------------------------------------


# One row, 2 tokens, old == new (ratio 1), A = 1, token-mean:
#   TIS cap 1.5: train - gen = [ln 2, 0] -> weights [min(2, 1.5), 1] = [1.5, 1]
#   KL k1, kl_coef 0.1: logp - ref = [0, 1] -> kl [0, 1]
#   entropy [0.5, 1.5], entropy_coef 0.01
#   per token: t0 = 1.5 * (-1) + 0.1 * 0 - 0.01 * 0.5 = -1.505
#              t1 = 1   * (-1) + 0.1 * 1 - 0.01 * 1.5 = -0.915
#   loss_sum -2.42, count 2
#   d/dlogp = w * (-A) * r + 0.1 * d(k1)/dlogp = [-1.5 + 0.1, -1 + 0.1] = [-1.4, -0.9]; d/dentropy = -0.01 each
def test_policy_loss_hand_worked():
    logprobs = torch.tensor([[-1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    entropy = torch.tensor([[0.5, 1.5]], dtype=torch.float64, requires_grad=True)
    old = logprobs.detach().clone()
    ref = old - torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    generation = old - torch.tensor([[math.log(2.0), 0.0]], dtype=torch.float64)
    config = PolicyLossConfig(kl_coef=0.1, kl_estimator="k1", entropy_coef=0.01, tis_cap=1.5)
    loss_sum, count, metrics = policy_loss(
        logprobs, old, torch.tensor([1.0], dtype=torch.float64), torch.ones(1, 2), config,
        ref_logprobs=ref, entropy=entropy, generation_logprobs=generation,
    )  # fmt: skip
    tol = HAND_TOL[torch.float64]
    assert count.item() == 2
    assert_close(loss_sum, torch.tensor(-2.42, dtype=torch.float64), atol=tol, rtol=0)
    loss_sum.backward()
    assert_close(logprobs.grad, torch.tensor([[-1.4, -0.9]], dtype=torch.float64), atol=tol, rtol=0)
    assert_close(entropy.grad, torch.tensor([[-0.01, -0.01]], dtype=torch.float64), atol=tol, rtol=0)
    assert_close(metrics["kl"], torch.tensor(0.5, dtype=torch.float64), atol=tol, rtol=0)
    assert_close(metrics["entropy"], torch.tensor(1.0, dtype=torch.float64), atol=tol, rtol=0)
    assert_close(metrics["tis_truncated_fraction"], torch.tensor(0.5, dtype=torch.float64), atol=tol, rtol=0)
    assert_close(metrics["token_mult_prob_error"], torch.tensor(1.5, dtype=torch.float64), atol=tol, rtol=0)
    assert set(metrics) >= {"clip_fraction", "ratio_mean", "gen_kl_error"}


def test_policy_loss_reports_without_adding():
    """ref_logprobs and entropy with zero coefficients: reported, not added."""
    logprobs = -3 * torch.rand(3, 4, dtype=torch.float64)
    advantages, mask = torch.randn(3, dtype=torch.float64), _random_mask(3, 4, empty_rows=0)
    plain, _, _ = policy_loss(logprobs, logprobs, advantages, mask, PolicyLossConfig())
    both, _, metrics = policy_loss(
        logprobs, logprobs, advantages, mask, PolicyLossConfig(), ref_logprobs=logprobs - 1, entropy=logprobs.exp()
    )
    assert torch.equal(plain, both)
    assert "kl" in metrics and "entropy" in metrics


def test_policy_loss_missing_inputs():
    x, mask = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="pass ref_logprobs"):
        policy_loss(x, x, torch.zeros(2), mask, PolicyLossConfig(kl_coef=0.1))
    with pytest.raises(ValueError, match="pass entropy"):
        policy_loss(x, x, torch.zeros(2), mask, PolicyLossConfig(entropy_coef=0.1))
    with pytest.raises(ValueError, match="pass generation_logprobs"):
        policy_loss(x, x, torch.zeros(2), mask, PolicyLossConfig(tis_cap=2.0))
    with pytest.raises(ValueError, match="max_length"):
        policy_loss(x, x, torch.zeros(2), mask, PolicyLossConfig(aggregation="seq-mean-token-sum-norm"))


@pytest.mark.parametrize(
    "bad",
    [
        {"eps_low": 1.0},
        {"eps_high": -0.1},
        {"dual_clip": 0.5},
        {"ratio_level": "seq"},
        {"aggregation": "mean"},
        {"kl_estimator": "k4"},
        {"kl_coef": -1.0},
        {"tis_cap": 0.0},
    ],
    ids=str,
)
def test_policy_loss_config_checks(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        PolicyLossConfig(**bad)
