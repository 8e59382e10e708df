"""Rejection sampling (NeMo-Aligner's): keep the best of each prompt's samples by reward, to fine-tune on them.

The ``k = group_size`` samples of a prompt are adjacent in every ``[P * k]``
tensor (the layout of :class:`aligner.data.prompts.PromptBatch`).
:func:`select_top` ranks each prompt's samples by reward and gives its ``top_n``
best as *slots*, each kept when its reward reaches ``min_reward``; the recipe
trains (SFT: NLL of the response, prompt tokens masked) on the kept slots only.
NeMo-Aligner's defaults: ``k = 4``, ``top_n = 1``, no threshold (every prompt
keeps its best sample, however poor). :func:`kept_set_metrics` describes the
kept set against all samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Selection:
    """The slots of a kept set: ``top_n`` per prompt, its best samples first.

    Attributes:
        rows: ``[P * top_n]`` int64: slot ``g * top_n + i`` holds the index, into the ``[P * k]``
            samples, of prompt ``g``'s ``(i + 1)``-th best sample.
        kept: ``[P * top_n]`` bool: the slot's sample is kept (its reward reaches ``min_reward``;
            every slot without a threshold).
        top_n: slots per prompt.
    """

    rows: Tensor
    kept: Tensor
    top_n: int

    def sample_mask(self, num_samples: int) -> Tensor:
        """``[num_samples]`` bool: True for the samples that are kept."""
        mask = torch.zeros(num_samples, dtype=torch.bool)
        mask[self.rows[self.kept]] = True
        return mask


def select_top(rewards: Tensor, group_size: int, *, top_n: int = 1, min_reward: float | None = None) -> Selection:
    """Each prompt's ``top_n`` samples by reward, and which of them reach ``min_reward``.

    Ties go to the sample drawn first (a stable sort), so the choice is deterministic. A
    sample is kept when ``reward >= min_reward`` (inclusive: ``min_reward: 1.0`` keeps the
    exactly-right answers of a 0/1 reward); a prompt may keep fewer than ``top_n``, or none.

    Args:
        rewards: ``[P * k]`` float, a prompt's ``k`` samples adjacent.
        group_size: ``k``, samples per prompt.
        top_n: slots per prompt, ``1 <= top_n <= k``.
        min_reward: the lowest reward kept; None keeps every slot.

    Returns:
        The :class:`Selection`.

    Raises:
        ValueError: ``rewards`` not 1-D or not ``P * k`` samples, a ``top_n`` outside ``[1, k]``,
            or a reward that is not finite (it could not be ranked).
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be [prompts * group_size], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(
            f"rewards has {rewards.numel()} samples, not a multiple of group_size {group_size}: each prompt "
            "must have exactly group_size adjacent samples"
        )
    if not 1 <= top_n <= group_size:
        raise ValueError(f"top_n must be in [1, group_size={group_size}], got {top_n}")
    if not torch.isfinite(rewards).all():
        bad = (~torch.isfinite(rewards)).nonzero().squeeze(1)[:3].tolist()
        raise ValueError(f"rewards must be finite to be ranked; samples {bad} are not")
    grouped = rewards.detach().cpu().reshape(-1, group_size)
    order = torch.sort(grouped, dim=1, descending=True, stable=True).indices[:, :top_n]  # [P, top_n]
    rows = (order + torch.arange(grouped.shape[0])[:, None] * group_size).reshape(-1)
    chosen = grouped.reshape(-1)[rows]
    kept = torch.ones_like(rows, dtype=torch.bool) if min_reward is None else chosen >= min_reward
    return Selection(rows=rows, kept=kept, top_n=top_n)


def kept_set_metrics(rewards: Tensor, selection: Selection, response_lengths: Tensor) -> dict[str, float]:
    """The kept set against all samples.

    Args:
        rewards: ``[N]`` every sample's reward (the :func:`select_top` input).
        selection: its output.
        response_lengths: ``[N]`` response tokens of every sample.

    Returns:
        ``kept_count``; ``kept_fraction`` (of the ``N`` samples); ``kept_reward_mean`` and
        ``kept_reward_min`` (NaN with nothing kept) beside ``reward_min`` of all samples;
        ``prompts_without_kept`` (prompts none of whose samples is kept);
        ``kept_response_length_mean`` (NaN with nothing kept).
    """
    kept = selection.sample_mask(rewards.numel())
    count = int(kept.sum())
    kept_rewards = rewards.detach().cpu().double()[kept]
    kept_lengths = response_lengths.detach().cpu().double()[kept]
    per_prompt = selection.kept.reshape(-1, selection.top_n)
    return {
        "kept_count": float(count),
        "kept_fraction": count / rewards.numel(),
        "kept_reward_mean": kept_rewards.mean().item() if count else math.nan,
        "kept_reward_min": kept_rewards.min().item() if count else math.nan,
        "reward_min": rewards.double().min().item(),
        "prompts_without_kept": float((~per_prompt.any(dim=1)).sum()),
        "kept_response_length_mean": kept_lengths.mean().item() if count else math.nan,
    }
