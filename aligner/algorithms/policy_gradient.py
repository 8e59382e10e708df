"""The policy-gradient numerics shared by GRPO (and DAPO, Dr. GRPO, GSPO), REINFORCE/RLOO and PPO.

Per-token tensors are ``[B, T]``, aligned with the response tokens (REFERENCE.md
"Token layout"), with a ``mask`` of the same shape (bool, int or float;
nonzero means the token is trained). Every function here is pure.

A loss is built per token and aggregated once::

    per_token, metrics = clipped_policy_loss(logprobs, old_logprobs, advantages, mask, eps_low=0.2, eps_high=0.28)
    kl, kl_metrics = kl_loss_term(logprobs, ref_logprobs, mask)            # optional
    loss_sum, count = loss_sum_and_count(per_token + beta * kl, mask, "token-mean")

:func:`policy_loss` does exactly that from a :class:`PolicyLossConfig`. The
terms share one aggregation because every aggregation is linear in the
per-token loss: aggregating their sum is the sum of their aggregates, as
veRL and NeMo-RL compute it.

Aggregation (veRL's names), over the ``N`` sequences with at least one valid
token and their valid tokens ``t``, with ``l[i, t]`` the per-token loss:

===========================  ==========================================  ===============
mode                         loss                                        count (unit)
===========================  ==========================================  ===============
``token-mean``               ``sum_i,t l / #tokens``                     tokens
``seq-mean-token-mean``      ``sum_i (sum_t l / #tokens_i) / N``         sequences
``seq-mean-token-sum``       ``sum_i sum_t l / N``                       sequences
``seq-mean-token-sum-norm``  ``sum_i sum_t l / (N * L_max)`` (Dr. GRPO)  sequences
===========================  ==========================================  ===============

``L_max`` is a constant (the generation limit, ``max_length``), never the
padded width of a batch, so that it does not depend on how a batch is split.
Each mode is ``numerator / count`` with a numerator and a count that add up
over micro-batches and data-parallel ranks, which gives two equivalent ways to
train on a global batch split any way:

- :func:`loss_sum_and_count` returns ``(numerator, count)`` per micro-batch:
  the trainer's ``train_step`` contract, which divides the summed gradients by
  the summed count (megatron's per-token-loss mode);
- :func:`aggregate_loss` divides the numerator by a GLOBAL count passed in
  (NeMo-RL's ``global_valid_toks`` / ``global_valid_seqs``): the sum over all
  micro-batches and ranks of these losses is the global loss. The counts come
  from :func:`aggregation_counts`, summed over micro-batches and all-reduced
  over ranks before the first forward.

Never a mean of per-micro-batch means: that weighs a token of a short
micro-batch more than one of a long micro-batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from aligner.ops import kl_penalty, masked_mean
from aligner.ops.rl import KL_ESTIMATORS

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
RATIO_LEVELS = ("token", "sequence")
KL_REDUCTIONS = ("mean", "sum")

# exp(20) = 4.9e8 is finite in fp32; an unclamped log-ratio of ~89 overflows to inf, and the exp's
# backward then multiplies a zero gradient by inf (NaN). veRL clamps the token log-ratio at +-20.
TOKEN_LOG_RATIO_LIMIT = 20.0
# GSPO's sequence log-ratio is clamped above at 10, as veRL does.
SEQUENCE_LOG_RATIO_MAX = 10.0
# NeMo-RL's clamps of the KL-in-loss estimate (veRL's for k3): d = logp - ref_logp to +-20, the estimate to +-10.
KL_INPUT_CLAMP = 20.0
KL_OUTPUT_CLAMP = 10.0
# veRL's truncated-importance-sampling threshold (TRL uses 3).
TIS_CAP = 2.0


# ---- checks -----------------------------------------------------------------


def check_token_tensors(op: str, mask: Tensor, **tensors: Tensor) -> None:
    """``mask`` is ``[B, T]`` and every named tensor has its shape."""
    if not isinstance(mask, Tensor) or mask.dim() != 2:
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"{op}: mask must be [batch, response_tokens], got {got}")
    for name, tensor in tensors.items():
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.shape != mask.shape:
            raise ValueError(f"{op}: {name} must have the shape of mask {tuple(mask.shape)}, got {tuple(tensor.shape)}")


def _check_aggregation(mode: str, max_length: int | None) -> None:
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {mode!r}; valid: {', '.join(AGGREGATIONS)}")
    if mode == "seq-mean-token-sum-norm" and (max_length is None or max_length < 1):
        raise ValueError(
            "aggregation 'seq-mean-token-sum-norm' divides by N * max_length: pass max_length >= 1 (the "
            f"generation limit, a constant for the whole run), got {max_length!r}"
        )


def _compute_dtype(tensor: Tensor) -> torch.dtype:
    """float64 stays float64; anything narrower is computed in float32."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def broadcast_advantages(advantages: Tensor, mask: Tensor) -> Tensor:
    """Advantages as ``[B, T]``: per-token ones as given, per-sequence ``[B]`` ones repeated over the tokens.

    Raises:
        ValueError: ``advantages`` neither ``[B]`` nor of ``mask``'s shape ``[B, T]``.
    """
    if advantages.shape == mask.shape:
        return advantages
    if advantages.shape == mask.shape[:1]:
        return advantages.unsqueeze(-1).expand(mask.shape)
    raise ValueError(
        f"advantages must be [batch] (one per sequence) or [batch, response_tokens] {tuple(mask.shape)}, "
        f"got {tuple(advantages.shape)}"
    )


def _masked_extreme(x: Tensor, valid: Tensor, largest: bool) -> Tensor:
    """Max (or min) of the valid entries of ``x``; 1 (a neutral ratio) when none is valid."""
    fill = -math.inf if largest else math.inf
    kept = torch.where(valid, x, fill)
    extreme = kept.amax() if largest else kept.amin()
    return torch.where(valid.any(), extreme, torch.ones_like(extreme))


# ---- aggregation --------------------------------------------------------------


def aggregation_counts(mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(tokens, sequences)`` of a micro-batch: its valid tokens and its rows with at least one valid token.

    Sum both over the micro-batches of a step and all-reduce them over the
    data-parallel ranks to get the ``global_tokens`` / ``global_sequences`` of
    :func:`aggregate_loss`. Returns int64 0-dim tensors on ``mask``'s device.

    Raises:
        ValueError: ``mask`` not ``[B, T]``.
    """
    check_token_tensors("aggregation_counts", mask)
    valid = mask != 0
    return valid.sum(), valid.any(dim=-1).sum()


def loss_sum_and_count(
    per_token_loss: Tensor, mask: Tensor, mode: str, *, max_length: int | None = None
) -> tuple[Tensor, Tensor]:
    """This micro-batch's numerator and count of the aggregation ``mode`` (module docstring table).

    ``sum(numerators) / sum(counts)`` over any split of a global batch into
    micro-batches and ranks is the global loss: pass the pair to the trainer's
    ``train_step`` as its ``(loss_sum, count)``. Masked positions of
    ``per_token_loss`` are ignored (they may hold anything finite or not).

    Args:
        per_token_loss: ``[B, T]`` float.
        mask: ``[B, T]``, nonzero for valid tokens.
        mode: one of :data:`AGGREGATIONS`.
        max_length: ``L_max`` of ``seq-mean-token-sum-norm`` (required there, ignored otherwise).

    Returns:
        ``(numerator, count)``: a 0-dim float (float32, or float64 for float64
        input) differentiable w.r.t. ``per_token_loss``, and a 0-dim int64:
        valid tokens for ``token-mean``, sequences with a valid token otherwise.

    Raises:
        ValueError: unknown ``mode``, missing ``max_length`` for ``seq-mean-token-sum-norm``,
            or tensors that are not ``[B, T]`` of one shape.
    """
    _check_aggregation(mode, max_length)
    check_token_tensors("loss_sum_and_count", mask, per_token_loss=per_token_loss)
    valid = mask != 0
    kept = torch.where(valid, per_token_loss.to(_compute_dtype(per_token_loss)), 0.0)
    if mode == "token-mean":
        return kept.sum(), valid.sum()
    row_sums = kept.sum(dim=-1)
    row_tokens = valid.sum(dim=-1)
    sequences = (row_tokens > 0).sum()
    if mode == "seq-mean-token-mean":
        numerator = (row_sums / row_tokens.clamp(min=1)).sum()
    elif mode == "seq-mean-token-sum":
        numerator = row_sums.sum()
    else:
        numerator = row_sums.sum() / max_length
    return numerator, sequences


def aggregate_loss(
    per_token_loss: Tensor,
    mask: Tensor,
    mode: str,
    *,
    max_length: int | None = None,
    global_tokens: Tensor | int | None = None,
    global_sequences: Tensor | int | None = None,
) -> Tensor:
    """The loss of aggregation ``mode``: ``numerator / count`` (module docstring table).

    With no global count, the count is this batch's own: the loss of this batch
    alone. With the global count of the mode's unit (``global_tokens`` for
    ``token-mean``, ``global_sequences`` for the ``seq-*`` modes; from
    :func:`aggregation_counts` summed over the whole global batch), the result
    is this micro-batch's share of the global loss, so that summing the
    gradients of all micro-batches of all ranks gives exactly the gradient of
    the loss over the whole global batch. A data-parallel all-reduce that
    AVERAGES gradients over ``dp`` ranks divides by ``dp`` once more; scale by
    ``dp`` in that case. A count of 0 gives a loss of 0, not NaN.

    Args:
        per_token_loss: ``[B, T]`` float.
        mask: ``[B, T]``, nonzero for valid tokens.
        mode: one of :data:`AGGREGATIONS`.
        max_length: ``L_max`` of ``seq-mean-token-sum-norm``.
        global_tokens: valid tokens of the global batch (``token-mean``).
        global_sequences: sequences with a valid token in the global batch (``seq-*``).

    Returns:
        0-dim float, differentiable w.r.t. ``per_token_loss``.

    Raises:
        ValueError: as :func:`loss_sum_and_count`; or only the global count of
            the other unit given (e.g. ``global_tokens`` alone for a ``seq-*``
            mode), which would silently normalize by this batch alone.
    """
    numerator, local_count = loss_sum_and_count(per_token_loss, mask, mode, max_length=max_length)
    if mode == "token-mean":
        global_count, unit, other = global_tokens, "tokens", global_sequences
    else:
        global_count, unit, other = global_sequences, "sequences", global_tokens
    if global_count is None:
        if other is not None:
            raise ValueError(
                f"aggregation {mode!r} normalizes by the number of {unit}: pass global_{unit} "
                f"(only the other unit's global count was given)"
            )
        count = local_count
    else:
        count = torch.as_tensor(global_count, device=numerator.device)
    return numerator / count.clamp(min=1).to(numerator.dtype)


# ---- loss terms ---------------------------------------------------------------


def clipped_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
    ratio_level: str = "token",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token clipped surrogate of PPO / GRPO (clip-higher, dual-clip, GSPO's sequence ratio).

    With ``r`` the importance ratio and ``A`` the advantage::

        l = max(-A * r, -A * clip(r, 1 - eps_low, 1 + eps_high))
        l = min(l, -A * c)  where A < 0, with dual clip c (Ye et al. 2020)

    ``ratio_level="token"``: ``r_t = exp(logp_t - old_logp_t)``, the log-ratio
    clamped to +-:data:`TOKEN_LOG_RATIO_LIMIT`. ``ratio_level="sequence"``
    (GSPO): one ratio per response ``s_i = exp(masked mean_t(logp - old_logp))``,
    the log-ratio clamped above at :data:`SEQUENCE_LOG_RATIO_MAX`, clipped once
    per response and repeated on its tokens (NeMo-RL's form). Aggregated with
    any of :data:`AGGREGATIONS`, which weigh the tokens of one sequence alike,
    its gradient equals veRL's (whose per-token ratio has the value ``s_i`` and
    the gradient ``s_i * grad logp_t``); per-token weights that differ within a
    sequence (TIS) make the two differ. Clamped values pass no gradient.

    ``old_logprobs`` are the trainer's log-probs of the rollout policy (never the
    engine's); with ``old == new`` the ratio is exactly 1 and nothing is clipped.

    Args:
        logprobs: ``[B, T]`` current policy log-probs of the response tokens (differentiable).
        old_logprobs: ``[B, T]`` log-probs of the policy that drew the rollouts (constant).
        advantages: ``[B]`` (per sequence) or ``[B, T]`` (per token), constant.
        mask: ``[B, T]``, nonzero for trained tokens.
        eps_low, eps_high: the ratio is clipped to ``[1 - eps_low, 1 + eps_high]``.
        dual_clip: ``c > 1`` or None (off).
        ratio_level: ``"token"`` or ``"sequence"``.

    Returns:
        ``(per_token_loss, metrics)``: ``[B, T]`` float32 (float64 for float64
        ``logprobs``), 0 at masked positions, differentiable w.r.t. ``logprobs``;
        aggregate with :func:`loss_sum_and_count` or :func:`aggregate_loss`.
        Metrics (detached 0-dim, over valid tokens): ``clip_fraction`` (the
        clipped branch is the larger), ``dual_clip_fraction``, ``ratio_mean``,
        ``ratio_min``, ``ratio_max`` (1 when nothing is valid).

    Raises:
        ValueError: shapes, ``eps_low`` outside ``[0, 1)``, ``eps_high < 0``,
            ``dual_clip <= 1``, unknown ``ratio_level``.
    """
    check_token_tensors("clipped_policy_loss", mask, logprobs=logprobs, old_logprobs=old_logprobs)
    if not 0.0 <= eps_low < 1.0:
        raise ValueError(f"eps_low must be in [0, 1) (the ratio's lower clip is 1 - eps_low), got {eps_low}")
    if eps_high < 0.0:
        raise ValueError(f"eps_high must be >= 0, got {eps_high}")
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1 (it bounds the loss at -dual_clip * A for A < 0), got {dual_clip}")
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"unknown ratio_level {ratio_level!r}; valid: {', '.join(RATIO_LEVELS)}")
    dtype = _compute_dtype(logprobs)
    valid = mask != 0
    advantages = broadcast_advantages(advantages, mask).detach().to(dtype)
    log_ratio = torch.where(valid, logprobs.to(dtype) - old_logprobs.detach().to(dtype), 0.0)
    if ratio_level == "token":
        log_ratio = log_ratio.clamp(-TOKEN_LOG_RATIO_LIMIT, TOKEN_LOG_RATIO_LIMIT)
    else:
        sequence_log_ratio = masked_mean(log_ratio, mask, dim=-1).clamp(max=SEQUENCE_LOG_RATIO_MAX)  # [B]
        log_ratio = sequence_log_ratio.unsqueeze(-1).expand(mask.shape)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        bound = -advantages * dual_clip
        dual_clipped = (advantages < 0) & (bound < loss)
        loss = torch.where(dual_clipped, bound, loss)
    else:
        dual_clipped = torch.zeros_like(valid)
    loss = torch.where(valid, loss, 0.0)

    ratio = ratio.detach()
    metrics = {
        "clip_fraction": masked_mean((clipped > unclipped).detach().to(dtype), mask),
        "dual_clip_fraction": masked_mean(dual_clipped.to(dtype), mask),
        "ratio_mean": masked_mean(ratio, mask),
        "ratio_min": _masked_extreme(ratio, valid, largest=False),
        "ratio_max": _masked_extreme(ratio, valid, largest=True),
    }
    return loss, metrics


def kl_loss_term(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    *,
    estimator: str = "k3",
    input_clamp: float | None = KL_INPUT_CLAMP,
    output_clamp: float | None = KL_OUTPUT_CLAMP,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token KL-to-reference estimate for a KL term in the loss (add ``kl_coef`` times it).

    ``d = clamp(logp - ref_logp, +-input_clamp)``, then
    :func:`aligner.ops.kl_penalty` of ``d`` (``k1`` ``d``, ``abs`` ``|d|``,
    ``k2`` ``d^2 / 2``, ``k3`` ``exp(-d) + d - 1``), clamped to
    ``+-output_clamp``: NeMo-RL's and veRL's clamps (None: no clamp). ``k3`` on
    this ``d`` is NeMo-RL's k3 on ``ref_logp - logp`` and veRL's
    ``low_var_kl``.

    Args:
        logprobs: ``[B, T]`` current policy log-probs (differentiable).
        ref_logprobs: ``[B, T]`` reference policy log-probs (constant).
        mask: ``[B, T]``, nonzero for trained tokens.
        estimator: one of ``k1``, ``abs``, ``k2``, ``k3``.
        input_clamp, output_clamp: positive bounds or None.

    Returns:
        ``(per_token_kl, metrics)``: ``[B, T]`` float32 (float64 for float64
        input), 0 at masked positions, differentiable w.r.t. ``logprobs``;
        ``metrics = {"kl": mean over valid tokens}`` (detached 0-dim).

    Raises:
        ValueError: unknown estimator, non-positive clamps, or shapes.
    """
    check_token_tensors("kl_loss_term", mask, logprobs=logprobs, ref_logprobs=ref_logprobs)
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; valid: {', '.join(KL_ESTIMATORS)}")
    for name, bound in (("input_clamp", input_clamp), ("output_clamp", output_clamp)):
        if bound is not None and not bound > 0:
            raise ValueError(f"{name} must be > 0 or None, got {bound}")
    dtype = _compute_dtype(logprobs)
    valid = mask != 0
    d = torch.where(valid, logprobs.to(dtype) - ref_logprobs.detach().to(dtype), 0.0)
    if input_clamp is not None:
        d = d.clamp(-input_clamp, input_clamp)
    # d against zeros: the op computes d - 0 = d exactly, so the clamp acts on the true difference.
    kl = kl_penalty(d, torch.zeros_like(d), estimator=estimator)
    if output_clamp is not None:
        kl = kl.clamp(-output_clamp, output_clamp)
    kl = torch.where(valid, kl, 0.0)
    return kl, {"kl": masked_mean(kl.detach(), mask)}


def masked_token_kl(
    logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, *, estimator: str, dtype: torch.dtype
) -> Tensor:
    """``[B, T]`` per-token :func:`aligner.ops.kl_penalty` of the detached ``logprobs - ref_logprobs``, in ``dtype``.

    0 outside ``mask`` (the difference is zeroed there first, so padding never reaches the
    estimator); unclamped. The KL a reward is penalized by (REINFORCE's, PPO's token rewards).
    """
    valid = mask != 0
    d = torch.where(valid, logprobs.detach().to(dtype) - ref_logprobs.detach().to(dtype), 0.0)
    return torch.where(valid, kl_penalty(d, torch.zeros_like(d), estimator=estimator), 0.0)


def kl_in_reward(
    rewards: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    *,
    kl_coef: float,
    estimator: str = "k1",
    reduction: str = "mean",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Sequence rewards with a KL penalty: ``r'_i = r_i - kl_coef * reduce_t(kl_t)`` over valid tokens.

    ``kl_t`` is :func:`aligner.ops.kl_penalty` of ``logp_t - ref_logp_t``
    (``k1`` or ``abs`` as NeMo-Aligner's ``use_absolute_kl``; ``k2``/``k3`` also
    accepted), unclamped. ``reduction="mean"``: NeMo-Aligner's REINFORCE
    (masked mean over the response); ``"sum"``: TRL's RLOO (sequence sum). A row
    without valid tokens has KL 0. Not differentiable: the result is a reward.

    Args:
        rewards: ``[B]`` sequence rewards.
        logprobs: ``[B, T]`` log-probs of the rollout policy.
        ref_logprobs: ``[B, T]`` reference log-probs.
        mask: ``[B, T]``, nonzero for response tokens.
        kl_coef: ``>= 0``.
        estimator: one of ``k1``, ``abs``, ``k2``, ``k3``.
        reduction: ``"mean"`` or ``"sum"``.

    Returns:
        ``(rewards_with_kl, metrics)``: ``[B]`` float32 (float64 for float64
        rewards); ``metrics = {"kl_in_reward": mean over sequences of the reduced KL}``.

    Raises:
        ValueError: unknown estimator or reduction, ``kl_coef < 0``, shapes.
    """
    check_token_tensors("kl_in_reward", mask, logprobs=logprobs, ref_logprobs=ref_logprobs)
    if rewards.shape != mask.shape[:1]:
        raise ValueError(f"rewards must be [batch] ({mask.shape[0]}), got shape {tuple(rewards.shape)}")
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; valid: {', '.join(KL_ESTIMATORS)}")
    if reduction not in KL_REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; valid: {', '.join(KL_REDUCTIONS)}")
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    dtype = torch.float64 if torch.float64 in (rewards.dtype, logprobs.dtype) else torch.float32
    kl = masked_token_kl(logprobs, ref_logprobs, mask, estimator=estimator, dtype=dtype)
    sequence_kl = masked_mean(kl, mask, dim=-1) if reduction == "mean" else kl.sum(dim=-1)
    shaped = rewards.detach().to(dtype) - kl_coef * sequence_kl
    return shaped, {"kl_in_reward": sequence_kl.mean() if sequence_kl.numel() else sequence_kl.sum()}


# ---- engine vs trainer --------------------------------------------------------


def truncated_importance_weights(
    train_logprobs: Tensor, generation_logprobs: Tensor, mask: Tensor, *, cap: float = TIS_CAP
) -> tuple[Tensor, dict[str, Tensor]]:
    """Truncated importance-sampling (TIS) weights that correct for engine-vs-trainer mismatch.

    The engine samples from ``pi_gen`` (its own kernels and precision), the loss
    assumes ``pi_train_old`` (the trainer's log-probs of the same weights). Each
    token's loss is multiplied by ``w_t = min(exp(logp_train_old_t -
    logp_gen_t), cap)``: the importance ratio truncated at ``cap`` so that a
    token the engine drew with a far too small probability cannot blow up the
    update (the TIS blog post of Yao et al., 2025; NeMo-RL ``tis``, veRL's
    threshold 2, TRL's 3).
    Weights are constants (no gradient) and 0 at masked positions.

    Args:
        train_logprobs: ``[B, T]`` trainer log-probs of the rollout policy (``old_logprobs``).
        generation_logprobs: ``[B, T]`` the engine's log-probs of the drawn tokens,
            as drawn (after temperature / top-k / top-p).
        mask: ``[B, T]``, nonzero for trained tokens.
        cap: ``> 0``.

    Returns:
        ``(weights, metrics)``: ``[B, T]`` float32 (float64 for float64 input);
        ``metrics = {"tis_truncated_fraction": fraction of valid tokens whose ratio exceeded cap}``.

    Raises:
        ValueError: ``cap <= 0`` or shapes.
    """
    check_token_tensors(
        "truncated_importance_weights", mask, train_logprobs=train_logprobs, generation_logprobs=generation_logprobs
    )
    if not cap > 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    dtype = _compute_dtype(train_logprobs)
    valid = mask != 0
    log_ratio = torch.where(valid, train_logprobs.detach().to(dtype) - generation_logprobs.detach().to(dtype), 0.0)
    ratio = torch.exp(log_ratio)  # inf for a huge log-ratio: min() turns it into cap
    weights = torch.where(valid, ratio.clamp(max=cap), 0.0)
    return weights, {"tis_truncated_fraction": masked_mean((ratio > cap).to(dtype), mask)}


def generation_mismatch_metrics(train_logprobs: Tensor, generation_logprobs: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """NeMo-RL's metrics of engine-vs-trainer log-prob mismatch, over the valid tokens.

    - ``token_mult_prob_error = mean exp(|logp_train - logp_gen|)``: 1 when they
      agree; a factor by which a token's probability is off on average.
    - ``gen_kl_error = mean k3(d)``, ``d = logp_gen - logp_train``,
      ``k3(d) = exp(-d) + d - 1``: k3's estimate of ``KL(pi_gen || pi_train)``
      from the engine's own samples (as NeMo-RL, with its default ``k3`` and no
      clamps). About 1e-3 is normal on a GPU; a rising trend means a refit bug.

    Args:
        train_logprobs: ``[B, T]`` trainer log-probs of the rollout policy.
        generation_logprobs: ``[B, T]`` the engine's log-probs, as drawn.
        mask: ``[B, T]``, nonzero for response tokens.

    Returns:
        Detached 0-dim tensors (0 for ``gen_kl_error`` and 0 for
        ``token_mult_prob_error`` when nothing is valid).

    Raises:
        ValueError: shapes.
    """
    check_token_tensors(
        "generation_mismatch_metrics", mask, train_logprobs=train_logprobs, generation_logprobs=generation_logprobs
    )
    dtype = _compute_dtype(train_logprobs)
    valid = mask != 0
    train = torch.where(valid, train_logprobs.detach().to(dtype), 0.0)
    generation = torch.where(valid, generation_logprobs.detach().to(dtype), 0.0)
    return {
        "token_mult_prob_error": masked_mean(torch.exp((train - generation).abs()), mask),
        "gen_kl_error": masked_mean(kl_penalty(generation, train, estimator="k3"), mask),
    }


def mask_unfinished(mask: Tensor, is_end: Tensor) -> Tensor:
    """``mask`` with the rows of samples that did not end (hit the length limit without EOS) zeroed.

    NeMo-Aligner gives an unfinished sample no policy gradient; DAPO's overlong
    filtering does the same. Only the loss mask changes: the sample keeps its
    reward in its group's baseline.

    Args:
        mask: ``[B, T]``.
        is_end: ``[B]`` bool (or 0/1), True for a sample that ended on its own.

    Returns:
        ``[B, T]`` of ``mask``'s dtype.

    Raises:
        ValueError: shapes.
    """
    check_token_tensors("mask_unfinished", mask)
    if is_end.shape != mask.shape[:1]:
        raise ValueError(f"is_end must be [batch] ({mask.shape[0]}), got shape {tuple(is_end.shape)}")
    return torch.where((is_end != 0).unsqueeze(-1), mask, torch.zeros_like(mask))


# ---- the composed loss -------------------------------------------------------


@dataclass
class PolicyLossConfig:
    """The clipped policy-gradient loss: surrogate, KL to the reference, entropy bonus, IS correction.

    Attributes:
        eps_low: lower clip, the ratio is clipped below at ``1 - eps_low``.
        eps_high: upper clip, at ``1 + eps_high`` (DAPO's clip-higher sets it above eps_low).
        dual_clip: ``c > 1`` bounds the loss at ``-c * A`` for negative advantages; null: off.
        ratio_level: ``token`` (PPO, GRPO) or ``sequence`` (GSPO).
        aggregation: ``token-mean``, ``seq-mean-token-mean``, ``seq-mean-token-sum`` or
            ``seq-mean-token-sum-norm`` (Dr. GRPO; needs the generation limit as ``max_length``).
        kl_coef: weight of the KL-to-reference term in the loss (0: no reference model needed).
        kl_estimator: ``k1``, ``abs``, ``k2`` or ``k3`` for the KL term.
        entropy_coef: weight of the entropy bonus (subtracted from the loss).
        tis_cap: truncate the engine-vs-trainer importance weights at this value; null: no correction.
    """

    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: float | None = None
    ratio_level: str = "token"
    aggregation: str = "token-mean"
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    tis_cap: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.eps_low < 1.0:
            raise ValueError(f"eps_low must be in [0, 1), got {self.eps_low}")
        if self.eps_high < 0:
            raise ValueError(f"eps_high must be >= 0, got {self.eps_high}")
        if self.dual_clip is not None and not self.dual_clip > 1:
            raise ValueError(f"dual_clip must be > 1 or null, got {self.dual_clip}")
        if self.ratio_level not in RATIO_LEVELS:
            raise ValueError(f"ratio_level must be one of {RATIO_LEVELS}, got {self.ratio_level!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {tuple(KL_ESTIMATORS)}, got {self.kl_estimator!r}")
        if self.kl_coef < 0 or self.entropy_coef < 0:
            raise ValueError(f"kl_coef and entropy_coef must be >= 0, got {self.kl_coef} and {self.entropy_coef}")
        if self.tis_cap is not None and not self.tis_cap > 0:
            raise ValueError(f"tis_cap must be > 0 or null, got {self.tis_cap}")


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    config: PolicyLossConfig,
    *,
    ref_logprobs: Tensor | None = None,
    entropy: Tensor | None = None,
    generation_logprobs: Tensor | None = None,
    max_length: int | None = None,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """A micro-batch's ``(loss_sum, count, metrics)`` of the clipped policy-gradient loss.

    Per token: ``w_t * l_t + kl_coef * kl_t - entropy_coef * H_t``, with ``l``
    from :func:`clipped_policy_loss`, ``kl`` from :func:`kl_loss_term`, ``H``
    the policy's entropy and ``w`` the TIS weights of
    :func:`truncated_importance_weights` (1 when ``tis_cap`` is null),
    aggregated by :func:`loss_sum_and_count` with ``config.aggregation``.
    The TIS weights multiply the surrogate only (veRL).

    Args:
        logprobs, old_logprobs, advantages, mask: as :func:`clipped_policy_loss`.
        config: the loss's settings.
        ref_logprobs: ``[B, T]``, required when ``config.kl_coef > 0``; when given
            with ``kl_coef == 0`` the KL is still reported.
        entropy: ``[B, T]`` per-token entropy of the current policy
            (differentiable), required when ``config.entropy_coef > 0``.
        generation_logprobs: ``[B, T]`` the engine's log-probs, required when
            ``config.tis_cap`` is set; when given, the mismatch metrics of
            :func:`generation_mismatch_metrics` are reported.
        max_length: the generation limit, required by ``seq-mean-token-sum-norm``.

    Returns:
        ``(loss_sum, count, metrics)``, the trainer's ``train_step`` contract:
        ``sum(loss_sum) / sum(count)`` over the global batch is the loss.
        Metrics: those of :func:`clipped_policy_loss`, ``kl``, ``entropy``,
        ``token_mult_prob_error``, ``gen_kl_error``, ``tis_truncated_fraction``
        (each when its input is given).

    Raises:
        ValueError: a missing input the config needs, or any error of the terms.
    """
    if config.kl_coef > 0 and ref_logprobs is None:
        raise ValueError(f"kl_coef is {config.kl_coef}: pass ref_logprobs (or set kl_coef to 0)")
    if config.entropy_coef > 0 and entropy is None:
        raise ValueError(f"entropy_coef is {config.entropy_coef}: pass entropy (or set entropy_coef to 0)")
    if config.tis_cap is not None and generation_logprobs is None:
        raise ValueError(f"tis_cap is {config.tis_cap}: pass generation_logprobs (or set tis_cap to null)")
    per_token, metrics = clipped_policy_loss(
        logprobs,
        old_logprobs,
        advantages,
        mask,
        eps_low=config.eps_low,
        eps_high=config.eps_high,
        dual_clip=config.dual_clip,
        ratio_level=config.ratio_level,
    )
    if generation_logprobs is not None:
        metrics.update(generation_mismatch_metrics(old_logprobs, generation_logprobs, mask))
        if config.tis_cap is not None:
            weights, tis_metrics = truncated_importance_weights(
                old_logprobs, generation_logprobs, mask, cap=config.tis_cap
            )
            per_token = per_token * weights
            metrics.update(tis_metrics)
    if ref_logprobs is not None:
        kl, kl_metrics = kl_loss_term(logprobs, ref_logprobs, mask, estimator=config.kl_estimator)
        metrics.update(kl_metrics)
        if config.kl_coef > 0:
            per_token = per_token + config.kl_coef * kl
    if entropy is not None:
        check_token_tensors("policy_loss", mask, entropy=entropy)
        valid_entropy = torch.where(mask != 0, entropy.to(per_token.dtype), 0.0)
        metrics["entropy"] = masked_mean(valid_entropy.detach(), mask)
        if config.entropy_coef > 0:
            per_token = per_token - config.entropy_coef * valid_entropy
    loss_sum, count = loss_sum_and_count(per_token, mask, config.aggregation, max_length=max_length)
    return loss_sum, count, metrics
