"""KTO (Kahneman-Tversky optimization) on unpaired desirable / undesirable examples.

With ``r = logp - ref_logp`` (sequence sums) and the reference point
``z = max(0, mean over the batch of (kl_logp - kl_ref_logp))``, computed on
mismatched prompt/response pairs and detached:

    desirable:    desirable_weight   * (1 - sigmoid(beta * (r - z)))
    undesirable:  undesirable_weight * (1 - sigmoid(beta * (z - r)))

The mean that gives ``z`` runs over the whole global batch: the trainer sums
:func:`kto_reference_point`'s ``(sum, count)`` over micro-batches and
data-parallel ranks (one all-reduce of two numbers) and passes
``reference_point = sum / count`` to :func:`kto_loss`, which clamps it at 0
and detaches it. The loss is per example; the trainer averages over the global
number of examples.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_kl_pair(kl_policy_logps: Tensor, kl_ref_logps: Tensor) -> None:
    if kl_policy_logps.dim() != 1:
        raise ValueError(f"kl_policy_logps must be [batch], got shape {tuple(kl_policy_logps.shape)}")
    if kl_ref_logps.shape != kl_policy_logps.shape:
        raise ValueError(
            f"kl_ref_logps must have the shape of kl_policy_logps {tuple(kl_policy_logps.shape)}, "
            f"got {tuple(kl_ref_logps.shape)}"
        )


def kto_reference_point(kl_policy_logps: Tensor, kl_ref_logps: Tensor) -> tuple[Tensor, Tensor]:
    """The summed KL estimate of the mismatched pairs and their count, ready for an all-reduce.

    Args:
        kl_policy_logps: ``[B]`` policy sequence log-probs of the mismatched pairs.
        kl_ref_logps: ``[B]`` reference sequence log-probs of the same pairs.

    Returns:
        ``(sum, count)``: detached 0-dim tensors of the dtype of
        ``kl_policy_logps`` (so both fit one all-reduce),
        ``sum = sum_b (kl_policy_logps[b] - kl_ref_logps[b])`` and ``count = B``.
        ``reference_point = sum / count`` over the global batch.

    Raises:
        ValueError: inputs not ``[B]`` of one shape.
    """
    _check_kl_pair(kl_policy_logps, kl_ref_logps)
    total = (kl_policy_logps.detach() - kl_ref_logps.detach()).sum()
    return total, torch.tensor(kl_policy_logps.shape[0], dtype=total.dtype, device=total.device)


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    kl_policy_logps: Tensor | None = None,
    kl_ref_logps: Tensor | None = None,
    reference_point: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-example KTO loss (formula in the module docstring).

    Give the reference point either as the mismatched pairs' log-probs
    (``kl_policy_logps`` and ``kl_ref_logps``: ``z`` is their mean difference
    over this batch) or as ``reference_point`` (the global mean from
    :func:`kto_reference_point`, or 0.0 for no KL reference); either way
    ``z = max(0, .)`` and is detached.

    Args:
        policy_logps: ``[B]`` summed policy log-probs of the responses.
        ref_logps: ``[B]`` summed reference log-probs of the same responses.
        desirable: ``[B]`` bool, True for a desirable (thumbs-up) example.
        beta: ``> 0``.
        desirable_weight, undesirable_weight: ``>= 0`` class weights (raise the
            smaller class's so that ``weight * count`` is balanced, as the KTO paper advises).
        kl_policy_logps, kl_ref_logps: ``[B']`` log-probs of the mismatched pairs.
        reference_point: the mean KL estimate, instead of the two tensors above.

    Returns:
        ``(loss [B], metrics)``, differentiable w.r.t. ``policy_logps``. Metrics
        (detached 0-dim): ``reference_point`` (``z``), ``desirable_reward`` /
        ``undesirable_reward`` (mean of ``beta * r`` over that class, 0 if the
        batch has none), ``num_desirable`` / ``num_undesirable`` (int64).

    Raises:
        ValueError: shape mismatches, ``desirable`` not bool, ``beta <= 0``, a
            negative weight, or not exactly one source for the reference point.
    """
    if policy_logps.dim() != 1:
        raise ValueError(f"policy_logps must be [batch], got shape {tuple(policy_logps.shape)}")
    for name, tensor in (("ref_logps", ref_logps), ("desirable", desirable)):
        if tensor.shape != policy_logps.shape:
            raise ValueError(
                f"{name} must have the shape of policy_logps {tuple(policy_logps.shape)}, got {tuple(tensor.shape)}"
            )
    if desirable.dtype != torch.bool:
        raise ValueError(f"desirable must be a bool tensor, got {desirable.dtype}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if desirable_weight < 0 or undesirable_weight < 0:
        raise ValueError(
            f"desirable_weight and undesirable_weight must be >= 0, got {desirable_weight} and {undesirable_weight}"
        )
    has_pairs = kl_policy_logps is not None or kl_ref_logps is not None
    if has_pairs == (reference_point is not None):
        raise ValueError(
            "give the KL reference point either as kl_policy_logps and kl_ref_logps or as reference_point "
            "(exactly one; reference_point=0.0 for none)"
        )
    if has_pairs:
        if kl_policy_logps is None or kl_ref_logps is None:
            raise ValueError("kl_policy_logps and kl_ref_logps go together; one of them is missing")
        total, count = kto_reference_point(kl_policy_logps, kl_ref_logps)
        reference_point = total / count
    z = torch.as_tensor(reference_point, dtype=policy_logps.dtype, device=policy_logps.device).detach().clamp(min=0)

    log_ratio = policy_logps - ref_logps
    desirable_loss = desirable_weight * (1 - torch.sigmoid(beta * (log_ratio - z)))
    undesirable_loss = undesirable_weight * (1 - torch.sigmoid(beta * (z - log_ratio)))
    loss = torch.where(desirable, desirable_loss, undesirable_loss)

    rewards = beta * log_ratio.detach()
    num_desirable = desirable.sum()
    num_undesirable = (~desirable).sum()
    zero = torch.zeros_like(rewards)
    metrics = {
        "reference_point": z,
        "desirable_reward": torch.where(desirable, rewards, zero).sum() / num_desirable.clamp(min=1),
        "undesirable_reward": torch.where(desirable, zero, rewards).sum() / num_undesirable.clamp(min=1),
        "num_desirable": num_desirable,
        "num_undesirable": num_undesirable,
    }
    return loss, metrics
