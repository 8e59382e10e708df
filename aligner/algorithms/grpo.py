"""GRPO and its variants (DAPO, Dr. GRPO, GSPO): group advantages, dynamic sampling, overlong handling, presets.

Samples are grouped by prompt: the ``G = group_size`` responses to one prompt
are adjacent in every ``[P * G]`` (or ``[P * G, T]``) tensor. The loss itself is
the shared clipped policy-gradient loss of
:mod:`aligner.algorithms.policy_gradient`; a variant is a
:class:`GRPOLossConfig`:

=============  ======================================================================
preset         what differs (defaults as the anchors ship them, REFERENCE.md)
=============  ======================================================================
``grpo``       ``A = (r - mean) / (std + 1e-6)``; clip 0.2 / 0.2; token-mean;
               k3 KL in the loss with coefficient 0.01 (NeMo-RL)
``dapo``       clip-higher 0.2 / 0.28; dual clip 10 (NeMo-RL's DAPO recipe); no KL;
               dynamic sampling; overlong shaping over the last 4096 tokens, factor 1
``dr_grpo``    no std division; ``seq-mean-token-sum-norm`` (sum / (N * L_max)); no KL
``gspo``       one ratio per response, clipped to [1 - 3e-4, 1 + 4e-4];
               ``seq-mean-token-mean``; no KL (veRL's example)
=============  ======================================================================

A step, in the recipe's order: rewards (+ :func:`overlong_penalty` when
``overlong_buffer_len > 0``); with ``dynamic_sampling``, keep the groups of
:func:`groups_with_spread` and generate more until the batch is full;
:func:`grpo_advantages`; with ``overlong_filtering``, drop the unfinished
samples from the loss mask (:func:`aligner.algorithms.policy_gradient.mask_unfinished`,
after the advantages, so they still count in their group's baseline); then
:func:`aligner.algorithms.policy_gradient.policy_loss` with ``config.policy``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from aligner.algorithms.policy_gradient import PolicyLossConfig
from aligner.ops import group_advantages
from aligner.ops.rl import GROUP_BASELINES, GROUP_SCALES

GROUP_STD_EPS = 1e-6  # veRL's epsilon added to the group std
PRESETS = ("grpo", "dapo", "dr_grpo", "gspo")


def _check_groups(rewards: Tensor, group_size: int) -> None:
    if not isinstance(rewards, Tensor) or rewards.dim() not in (1, 2):
        got = tuple(rewards.shape) if isinstance(rewards, Tensor) else type(rewards).__name__
        raise ValueError(f"rewards must be [prompts * group_size] or [prompts, group_size], got {got}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if rewards.numel() % group_size:
        raise ValueError(
            f"rewards has {rewards.numel()} samples, not a multiple of group_size {group_size}: each prompt "
            "must have exactly group_size adjacent samples"
        )
    if rewards.dim() == 2 and rewards.shape[1] != group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} must be [prompts, group_size={group_size}]")


def _check_eps(scale: str | None, eps: float) -> None:
    if scale == "std" and not eps > 0:
        raise ValueError(
            f"eps must be > 0 with scale='std', got {eps}: a group whose rewards all agree has std 0, and 0 / 0 is NaN"
        )
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")


def grpo_advantages(
    rewards: Tensor,
    group_size: int,
    *,
    scale: str | None = "std",
    baseline: str = "mean",
    eps: float = GROUP_STD_EPS,
    valid: Tensor | None = None,
) -> Tensor:
    """Group-relative advantages: ``A_i = (r_i - b_i) / (std_group + eps)`` (no division when ``scale`` is None).

    ``b_i`` is the group mean (``baseline="mean"``, GRPO) or the mean of the
    other valid samples of the group (``"leave_one_out"``); ``std_group`` is
    the unbiased std of the group's valid rewards. A group whose rewards all
    agree gets advantage 0; invalid samples (``valid == 0``) get 0 and count
    in no statistic. Backed by :func:`aligner.ops.group_advantages`.

    Args:
        rewards: ``[P * G]`` or ``[P, G]`` sequence rewards, a prompt's samples adjacent.
        group_size: ``G``, samples per prompt.
        scale: ``"std"`` (GRPO) or None (Dr. GRPO).
        baseline: ``"mean"`` or ``"leave_one_out"``.
        eps: added to the std; ``> 0`` with ``scale="std"``.
        valid: optional mask of ``rewards``' shape.

    Returns:
        Float32 (float64 for float64 rewards) of ``rewards``' shape; constant (no gradient).

    Raises:
        ValueError: unknown scale or baseline, ``group_size < 1``, a sample count that
            is not a multiple of it, ``eps <= 0`` with ``scale="std"``.
    """
    _check_groups(rewards, group_size)
    if scale not in GROUP_SCALES:
        raise ValueError(f"scale must be one of {GROUP_SCALES}, got {scale!r}")
    if baseline not in GROUP_BASELINES:
        raise ValueError(f"baseline must be one of {GROUP_BASELINES}, got {baseline!r}")
    _check_eps(scale, eps)
    return group_advantages(rewards, group_size, baseline=baseline, scale=scale, eps=eps, valid=valid)


def groups_with_spread(rewards: Tensor, group_size: int) -> Tensor:
    """DAPO's dynamic sampling: which groups have rewards that do not all agree.

    A group whose samples all got the same reward (all right, all wrong) has
    zero advantage everywhere and only dilutes the batch; DAPO drops it and
    generates more prompts until the batch is full (veRL: up to 10 generation
    rounds; NeMo-RL raises when it cannot fill the batch). Equality is exact,
    as veRL's check is.

    Args:
        rewards: ``[P * G]`` or ``[P, G]``.
        group_size: ``G``.

    Returns:
        ``[P]`` bool, True for a group to keep. ``keep.repeat_interleave(G)``
        selects its samples.

    Raises:
        ValueError: as :func:`grpo_advantages` for the shape.
    """
    _check_groups(rewards, group_size)
    grouped = rewards.reshape(-1, group_size)
    return grouped.amax(dim=-1) != grouped.amin(dim=-1)


def overlong_penalty(lengths: Tensor, *, max_length: int, buffer_len: int, penalty_factor: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment, a reward term ``<= 0`` that grows linearly near the length limit.

    ``penalty = min(0, -(length - (max_length - buffer_len)) / buffer_len * penalty_factor)``:
    0 up to ``max_length - buffer_len`` tokens, then linear down to
    ``-penalty_factor`` at ``max_length`` (the hard limit of generation).

    Args:
        lengths: ``[B]`` response lengths in tokens (at most ``max_length``).
        max_length: the generation limit.
        buffer_len: ``1 <= buffer_len <= max_length``, tokens before the limit over which the penalty ramps.
        penalty_factor: ``>= 0``, the penalty at the limit.

    Returns:
        ``[B]`` float32, to add to the rewards.

    Raises:
        ValueError: ``buffer_len`` out of range or ``penalty_factor < 0``.
    """
    if not 1 <= buffer_len <= max_length:
        raise ValueError(
            f"buffer_len must be in [1, max_length={max_length}], got {buffer_len}; lower overlong_buffer_len "
            "or raise the generation limit"
        )
    if penalty_factor < 0:
        raise ValueError(f"penalty_factor must be >= 0, got {penalty_factor}")
    excess = lengths.to(torch.float32) - (max_length - buffer_len)
    return (-excess / buffer_len * penalty_factor).clamp(max=0.0)


@dataclass
class GRPOLossConfig:
    """The GRPO family's advantage, sampling, length handling and loss settings (presets in the module docstring).

    Attributes:
        scale: ``std`` divides the advantage by the group's std (GRPO); null does not (Dr. GRPO).
        baseline: ``mean`` (the group mean) or ``leave_one_out`` (the mean of the other samples).
        eps: added to the group std.
        dynamic_sampling: drop groups whose rewards all agree and generate more (DAPO).
        overlong_buffer_len: tokens before the generation limit over which the overlong
            penalty ramps (DAPO); 0: no penalty.
        overlong_penalty_factor: the overlong penalty at the generation limit.
        overlong_filtering: leave unfinished (truncated) samples out of the loss; they
            stay in their group's baseline.
        policy: the clipped policy-gradient loss.
    """

    scale: str | None = "std"
    baseline: str = "mean"
    eps: float = GROUP_STD_EPS
    dynamic_sampling: bool = False
    overlong_buffer_len: int = 0
    overlong_penalty_factor: float = 1.0
    overlong_filtering: bool = False
    policy: PolicyLossConfig = field(default_factory=lambda: PolicyLossConfig(kl_coef=0.01, kl_estimator="k3"))

    def __post_init__(self) -> None:
        if self.scale not in GROUP_SCALES:
            raise ValueError(f"scale must be one of {GROUP_SCALES}, got {self.scale!r}")
        if self.baseline not in GROUP_BASELINES:
            raise ValueError(f"baseline must be one of {GROUP_BASELINES}, got {self.baseline!r}")
        _check_eps(self.scale, self.eps)
        if self.overlong_buffer_len < 0:
            raise ValueError(f"overlong_buffer_len must be >= 0 (0: off), got {self.overlong_buffer_len}")
        if self.overlong_penalty_factor < 0:
            raise ValueError(f"overlong_penalty_factor must be >= 0, got {self.overlong_penalty_factor}")

    @classmethod
    def preset(cls, name: str) -> GRPOLossConfig:
        """A fresh config of one of :data:`PRESETS` (``grpo``, ``dapo``, ``dr_grpo``, ``gspo``).

        Raises:
            ValueError: an unknown name.
        """
        if name == "grpo":
            return cls()
        if name == "dapo":
            return cls(
                dynamic_sampling=True,
                overlong_buffer_len=4096,
                overlong_penalty_factor=1.0,
                policy=PolicyLossConfig(eps_low=0.2, eps_high=0.28, dual_clip=10.0, aggregation="token-mean"),
            )
        if name == "dr_grpo":
            return cls(scale=None, policy=PolicyLossConfig(aggregation="seq-mean-token-sum-norm"))
        if name == "gspo":
            return cls(
                policy=PolicyLossConfig(
                    eps_low=3e-4, eps_high=4e-4, ratio_level="sequence", aggregation="seq-mean-token-mean"
                )
            )
        raise ValueError(f"unknown GRPO preset {name!r}; valid: {', '.join(PRESETS)}")
