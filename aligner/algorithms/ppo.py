"""PPO with a critic (NeMo-Aligner's algorithm): token rewards with a KL penalty, advantages, the critic's loss.

Per-token tensors are ``[B, T]`` aligned with the response tokens, with a ``mask``
(REFERENCE.md "Token layout"). A rollout batch becomes training targets as::

    rewards, metrics = ppo_token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=controller.value)
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)      # aligner.ops, the fused scan
    advantages = whiten_over_group(advantages, mask, group=data_parallel_group)
    controller.update(metrics["kl_sum"], n_steps=rollouts)

and each update trains the actor on :func:`aligner.algorithms.policy_gradient.clipped_policy_loss`
of ``advantages`` and the critic on :func:`value_loss` of ``returns``. Every function here is
pure except :meth:`KLController.update` (the controller's state, checkpointed with the run).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from aligner.algorithms.policy_gradient import check_token_tensors, masked_token_kl
from aligner.ops import masked_mean

# The KL in the reward: NeMo-Aligner's k1 and its absolute value (use_absolute_kl).
KL_IN_REWARD_ESTIMATORS = ("k1", "abs")
# Ziegler et al. (2019): the proportional error of the adaptive controller is clipped to +-0.2.
ADAPTIVE_KL_ERROR_CLIP = 0.2


def last_valid_index(mask: Tensor) -> Tensor:
    """``[B]`` int64: the column of each row's last nonzero ``mask`` entry, -1 for a row without one."""
    columns = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask != 0, columns, -1).amax(dim=1)


def ppo_token_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    *,
    kl_coef: float,
    estimator: str = "k1",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token rewards: ``-kl_coef * kl_t`` on every response token, plus the sequence score on the last one.

    ``kl_t = logprobs_t - ref_logprobs_t`` (``k1``) or its absolute value (``abs``), of the rollout
    policy against the reference, detached. A row without a response token gets no reward.

    Args:
        scores: ``[B]`` sequence scores (reward model or function).
        logprobs, ref_logprobs: ``[B, T]`` rollout-policy and reference log-probs of the response tokens.
        mask: ``[B, T]``, nonzero on response tokens.
        kl_coef: ``>= 0``, the KL penalty's weight (the KL controller's value).
        estimator: ``k1`` or ``abs``.

    Returns:
        ``(rewards, metrics)``: ``[B, T]`` float32 (float64 for float64 inputs), 0 outside the mask;
        ``metrics``: ``kl`` (mean over response tokens), ``kl_sum`` (mean over rows of the summed
        KL, what the adaptive controller follows), ``score_mean``.

    Raises:
        ValueError: an unknown estimator, ``kl_coef < 0``, or shapes that do not match.
    """
    check_token_tensors("ppo_token_rewards", mask, logprobs=logprobs, ref_logprobs=ref_logprobs)
    if scores.shape != mask.shape[:1]:
        raise ValueError(f"scores must be [batch] ({mask.shape[0]}), got shape {tuple(scores.shape)}")
    if estimator not in KL_IN_REWARD_ESTIMATORS:
        raise ValueError(f"estimator must be one of {KL_IN_REWARD_ESTIMATORS}, got {estimator!r}")
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    dtype = torch.float64 if torch.float64 in (scores.dtype, logprobs.dtype) else torch.float32
    valid = mask != 0
    kl = masked_token_kl(logprobs, ref_logprobs, mask, estimator=estimator, dtype=dtype)
    rewards = -kl_coef * kl
    last = last_valid_index(mask)
    rows = (last >= 0).nonzero().squeeze(1)
    rewards[rows, last[rows]] += scores.detach().to(dtype)[rows]
    metrics = {
        "kl": masked_mean(kl, mask) if valid.any() else kl.sum(),
        "kl_sum": kl.sum(dim=1).mean(),
        "score_mean": scores.detach().to(dtype).mean(),
    }
    return rewards, metrics


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *, clip: float | None = 0.2
) -> tuple[Tensor, dict[str, Tensor]]:
    """The critic's per-token loss ``0.5 * max((V - R)^2, (V_clip - R)^2)``.

    ``V_clip = V_old + clip(V - V_old, -c, c)`` keeps the critic near its rollout-time values.
    Without ``clip`` (None) it is ``0.5 * (V - R)^2``. Aggregate it with
    :func:`aligner.algorithms.policy_gradient.loss_sum_and_count` (NeMo-Aligner: token mean).

    Args:
        values: ``[B, T]`` the critic's values now (differentiable).
        old_values: ``[B, T]`` its values at rollout time.
        returns: ``[B, T]`` GAE returns (``advantages + old_values``).
        mask: ``[B, T]``, nonzero on response tokens.
        clip: ``c > 0``, or None.

    Returns:
        ``(per_token, metrics)``: per-token loss (0 outside the mask); ``value_clip_fraction`` (share of
        tokens where the clipped term is the larger), ``value_error`` (masked mean of ``(V - R)^2``).

    Raises:
        ValueError: shapes that do not match, ``clip <= 0``.
    """
    check_token_tensors("value_loss", mask, values=values, old_values=old_values, returns=returns)
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be > 0 (or None to disable it), got {clip}")
    valid = mask != 0
    old, target = old_values.detach().to(values.dtype), returns.detach().to(values.dtype)
    unclipped = (values - target) ** 2
    if clip is None:
        per_token, clipped_share = 0.5 * unclipped, torch.zeros((), dtype=values.dtype, device=values.device)
    else:
        clipped = (old + (values - old).clamp(-clip, clip) - target) ** 2
        per_token = 0.5 * torch.maximum(unclipped, clipped)
        clipped_share = masked_mean((clipped > unclipped).to(values.dtype), mask) if valid.any() else unclipped.sum()
    per_token = torch.where(valid, per_token, 0.0)
    error = masked_mean(unclipped.detach(), mask) if valid.any() else unclipped.detach().sum() * 0
    return per_token, {"value_clip_fraction": clipped_share.detach(), "value_error": error}


def whiten_over_group(
    x: Tensor, mask: Tensor, *, group: dist.ProcessGroup | None = None, shift_mean: bool = True, eps: float = 1e-8
) -> Tensor:
    """``(x - mean) * rsqrt(var + eps)`` with mean and population variance over the valid entries of every rank.

    The statistics are all-reduced over ``group`` (the data-parallel group: one rollout batch
    split over ranks whitens as the whole batch); without a group, or a group of one rank, they
    are this rank's (:func:`aligner.ops.masked_whiten`'s result, up to rounding). With
    ``shift_mean=False`` the mean is added back (NeMo-Aligner). 0 outside the mask; float32
    (float64 for float64 ``x``); not differentiable.
    """
    check_token_tensors("whiten_over_group", mask, x=x)
    valid = mask != 0
    values = torch.where(valid, x.detach().double(), 0.0)
    stats = torch.stack([valid.sum().double(), values.sum(), (values * values).sum()])
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(stats, group=group)
    count, total, squares = stats.unbind()
    count = count.clamp(min=1.0)
    mean = total / count
    var = (squares / count - mean * mean).clamp(min=0.0)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.where(valid, whitened, 0.0).to(dtype)


@dataclass
class KLController:
    """The KL penalty's coefficient: fixed (``target`` None) or adaptive (Ziegler et al., 2019).

    Adaptive: after a rollout batch of ``n_steps`` samples with (per-sequence summed) KL ``kl``,
    ``value *= 1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon``: the coefficient grows
    while the KL is above the target and shrinks while below, by at most 20% per ``horizon``
    samples. Its state is checkpointed with the run (:meth:`state_dict`).

    Attributes:
        value: the current coefficient (``>= 0``).
        target: the KL to hold, or None for a fixed coefficient.
        horizon: samples over which the coefficient moves by the clipped proportional error.
    """

    value: float
    target: float | None = None
    horizon: int = 10000

    def __post_init__(self) -> None:
        if self.value < 0:
            raise ValueError(f"the KL coefficient must be >= 0, got {self.value}")
        if self.target is not None and not self.target > 0:
            raise ValueError(f"the KL target must be > 0 (or None for a fixed coefficient), got {self.target}")
        if self.horizon < 1:
            raise ValueError(f"the KL horizon must be >= 1, got {self.horizon}")

    def update(self, kl: float, n_steps: int) -> float:
        """Move the coefficient after a batch of ``n_steps`` samples with mean KL ``kl``; returns the new value."""
        if self.target is not None:
            error = min(max(kl / self.target - 1.0, -ADAPTIVE_KL_ERROR_CLIP), ADAPTIVE_KL_ERROR_CLIP)
            self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
