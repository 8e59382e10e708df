"""REINFORCE with a leave-one-out baseline (NeMo-Aligner) and RLOO advantages (veRL's form).

The ``G = group_size`` samples of one prompt are adjacent in every ``[P * G]``
tensor. NeMo-Aligner's REINFORCE (used for Llama-3.1-Nemotron-70B-Instruct):

    r'_i = r_i - kl_coef * mean_t(kl_t)                   KL to the initial policy, in the reward
    b_i  = mean of r'_j over the OTHER valid samples j of i's group
    A_i  = r'_i - b_i                                     0 for a group with at most one valid sample
    loss = masked_mean_t(-logp_t * A_i)

where "valid" is ``is_end`` (the sample ended on its own) and unfinished samples
get no policy gradient (:func:`aligner.algorithms.policy_gradient.mask_unfinished`).
veRL's RLOO writes the same advantage as ``(r_i - mean) * n / (n - 1)`` over the
group's ``n`` samples. The loss has no ratio: its gradient equals the clipped
loss's at ratio 1 (one update per rollout).
"""

from __future__ import annotations

import torch
from torch import Tensor

from aligner.algorithms.policy_gradient import broadcast_advantages, kl_in_reward, loss_sum_and_count
from aligner.ops import group_advantages, masked_mean


def rloo_advantages(rewards: Tensor, group_size: int, *, valid: Tensor | None = None) -> Tensor:
    """Leave-one-out advantages: ``A_i = r_i - mean of the other valid samples of its group``.

    Equal to veRL's ``(r_i - mean_group) * n / (n - 1)`` with ``n`` valid
    samples; a group with ``n <= 1`` valid samples gets 0 (NeMo-Aligner's
    "baseline = reward"; veRL would pass a lone sample's raw reward through).
    Invalid samples get 0 and are left out of every baseline. No std division.

    Args:
        rewards: ``[P * G]`` (or ``[P, G]``) sequence rewards.
        group_size: ``G >= 2``.
        valid: optional mask of ``rewards``' shape (NeMo-Aligner: ``is_end``).

    Returns:
        Float32 (float64 for float64 rewards) of ``rewards``' shape; constant.

    Raises:
        ValueError: ``group_size < 2`` or a sample count that is not a multiple of it.
    """
    if group_size < 2:
        raise ValueError(f"a leave-one-out baseline needs group_size >= 2 samples per prompt, got {group_size}")
    return group_advantages(rewards, group_size, baseline="leave_one_out", scale=None, valid=valid)


def reinforce_advantages(
    rewards: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    group_size: int,
    *,
    kl_coef: float,
    kl_estimator: str = "k1",
    valid: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """NeMo-Aligner's REINFORCE advantages: KL in the reward (token mean), then the leave-one-out baseline.

    Args:
        rewards: ``[B]`` sequence rewards, ``B = P * group_size``, a prompt's samples adjacent.
        logprobs: ``[B, T]`` log-probs of the rollout policy.
        ref_logprobs: ``[B, T]`` log-probs of the initial (reference) policy.
        mask: ``[B, T]``, nonzero for response tokens.
        group_size: samples per prompt, ``>= 2``.
        kl_coef: ``>= 0``; 0 gives plain RLOO.
        kl_estimator: ``k1`` or ``abs`` (NeMo-Aligner's ``use_absolute_kl``); ``k2``/``k3`` accepted.
        valid: ``[B]`` samples that count in the baselines (NeMo-Aligner: ``is_end``).

    Returns:
        ``(advantages [B], metrics)``, metrics (detached 0-dim): ``kl_in_reward``
        (mean per-sequence KL) and ``rewards_with_kl`` (mean of ``r'``).

    Raises:
        ValueError: as :func:`aligner.algorithms.policy_gradient.kl_in_reward` and :func:`rloo_advantages`.
    """
    rewards_with_kl, metrics = kl_in_reward(
        rewards, logprobs, ref_logprobs, mask, kl_coef=kl_coef, estimator=kl_estimator, reduction="mean"
    )
    advantages = rloo_advantages(rewards_with_kl, group_size, valid=valid)
    metrics["rewards_with_kl"] = rewards_with_kl.mean() if rewards_with_kl.numel() else rewards_with_kl.sum()
    return advantages, metrics


def reinforce_loss(
    logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    aggregation: str = "token-mean",
    max_length: int | None = None,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """A micro-batch's ``(loss_sum, count, metrics)`` of the REINFORCE loss ``-logp_t * A``.

    Aggregated by :func:`aligner.algorithms.policy_gradient.loss_sum_and_count`
    (``token-mean`` is NeMo-Aligner's masked mean); ``sum(loss_sum) / sum(count)``
    over the global batch is the loss.

    Args:
        logprobs: ``[B, T]`` current policy log-probs (differentiable).
        advantages: ``[B]`` (or ``[B, T]``), constant.
        mask: ``[B, T]``, nonzero for trained tokens (unfinished samples zeroed).
        aggregation: one of :data:`aligner.algorithms.policy_gradient.AGGREGATIONS`.
        max_length: the generation limit, for ``seq-mean-token-sum-norm``.

    Returns:
        ``(loss_sum, count, metrics)`` with ``metrics = {"advantage": mean advantage over valid tokens}``.

    Raises:
        ValueError: shapes, or as :func:`aligner.algorithms.policy_gradient.loss_sum_and_count`.
    """
    if logprobs.dim() != 2 or mask.shape != logprobs.shape:
        raise ValueError(
            f"logprobs and mask must be [batch, response_tokens] of one shape, got {tuple(logprobs.shape)} "
            f"and {tuple(mask.shape)}"
        )
    dtype = torch.float64 if logprobs.dtype == torch.float64 else torch.float32
    per_token_advantages = broadcast_advantages(advantages, mask).detach().to(dtype)
    valid = mask != 0
    per_token = torch.where(valid, -logprobs.to(dtype) * per_token_advantages, 0.0)
    loss_sum, count = loss_sum_and_count(per_token, mask, aggregation, max_length=max_length)
    return loss_sum, count, {"advantage": masked_mean(per_token_advantages, mask)}
