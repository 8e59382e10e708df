"""Reward-model losses: pairwise Bradley-Terry and multi-attribute regression (SteerLM).

Rewards are read at each sequence's last real token
(:func:`aligner.algorithms.logprobs.last_token_values`). In a preference batch
rows ``0..B-1`` are the chosen responses and ``B..2B-1`` the rejected ones
(:func:`aligner.algorithms.dpo.split_pairs`).

Normalizers: the pairwise loss is a mean over pairs (divide the global sum by
the global number of pairs). The regression loss is a mean over LABELLED
entries: divide the global sum of :func:`regression_loss`'s per-example losses
by the global count of attribute labels that are not ``ignore_value``
(:func:`labelled_mean`), so an example with one label weighs less than one
with five.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_pair(chosen_rewards: Tensor, rejected_rewards: Tensor) -> None:
    if chosen_rewards.dim() != 1:
        raise ValueError(f"chosen_rewards must be [batch], got shape {tuple(chosen_rewards.shape)}")
    if rejected_rewards.shape != chosen_rewards.shape:
        raise ValueError(
            f"rejected_rewards must have the shape of chosen_rewards {tuple(chosen_rewards.shape)}, "
            f"got {tuple(rejected_rewards.shape)}"
        )


def pairwise_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    *,
    margin: float | Tensor | None = None,
    centering_coef: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Bradley-Terry loss of a reward model on preference pairs.

    ``loss[b] = -logsigmoid(r_c[b] - r_r[b] - margin[b]) + centering_coef * (r_c[b] + r_r[b])^2``;
    the centering term (Eisenstein et al.) keeps rewards near zero mean.

    Args:
        chosen_rewards: ``[B]`` scores of the chosen responses.
        rejected_rewards: ``[B]`` scores of the rejected responses.
        margin: ``None`` (0), a float, or a ``[B]`` tensor of per-pair margins
            (e.g. Llama-2's preference-strength margins).
        centering_coef: ``>= 0`` weight of the reward-centering term.

    Returns:
        ``(loss [B], metrics)``; differentiable w.r.t. both rewards. Metrics
        (detached 0-dim): ``accuracy`` (fraction with ``r_c > r_r``), ``margin``
        (mean ``r_c - r_r``), ``chosen_reward`` and ``rejected_reward`` (means).

    Raises:
        ValueError: rewards not ``[B]`` and of one shape, a tensor margin of
            another shape, ``centering_coef < 0``.
    """
    _check_pair(chosen_rewards, rejected_rewards)
    if centering_coef < 0:
        raise ValueError(f"centering_coef must be >= 0, got {centering_coef}")
    if isinstance(margin, Tensor) and margin.shape != chosen_rewards.shape:
        raise ValueError(
            f"margin must be a float or a tensor of shape {tuple(chosen_rewards.shape)}, got {tuple(margin.shape)}"
        )
    difference = chosen_rewards - rejected_rewards
    shifted = difference if margin is None else difference - margin
    loss = -F.logsigmoid(shifted)
    if centering_coef:
        loss = loss + centering_coef * (chosen_rewards + rejected_rewards).square()
    difference = difference.detach()
    metrics = {
        "accuracy": (difference > 0).to(difference.dtype).mean(),
        "margin": difference.mean(),
        "chosen_reward": chosen_rewards.detach().mean(),
        "rejected_reward": rejected_rewards.detach().mean(),
    }
    return loss, metrics


def regression_loss(
    predictions: Tensor, targets: Tensor, *, ignore_value: float = -100.0
) -> tuple[Tensor, dict[str, Tensor]]:
    """Squared error of a multi-attribute reward model over the labelled attributes.

    ``loss[b] = sum_k [targets[b, k] != ignore_value] * (predictions[b, k] - targets[b, k])^2``.
    Divide the global sum by the global number of labels (:func:`labelled_mean`)
    for the MSE over labelled entries.

    Args:
        predictions: ``[B, K]`` predicted attribute values.
        targets: ``[B, K]`` labels, ``ignore_value`` where an attribute is unlabelled.
        ignore_value: the marker of a missing label.

    Returns:
        ``(loss [B], metrics)``; differentiable w.r.t. ``predictions`` (an example
        with no label gives 0). Metrics (detached): ``num_labels`` (0-dim int64),
        ``sse`` (0-dim, sum of ``loss``), ``attribute_mse`` ``[K]`` (mean squared
        error of each attribute over its labelled examples, 0 where none) and
        ``attribute_count`` ``[K]`` int64 (labelled examples per attribute).

    Raises:
        ValueError: ``predictions`` not 2-D or ``targets`` of another shape.
    """
    if predictions.dim() != 2:
        raise ValueError(f"predictions must be [batch, attributes], got shape {tuple(predictions.shape)}")
    if targets.shape != predictions.shape:
        raise ValueError(
            f"targets must have the shape of predictions {tuple(predictions.shape)}, got {tuple(targets.shape)}"
        )
    labelled = targets != ignore_value
    # where before squaring: an unlabelled entry must not reach the loss or its gradient.
    error = torch.where(labelled, predictions - targets.to(predictions.dtype), torch.zeros_like(predictions))
    squared = error.square()
    loss = squared.sum(dim=-1)
    attribute_count = labelled.sum(dim=0)
    attribute_sse = squared.detach().sum(dim=0)
    metrics = {
        "num_labels": attribute_count.sum(),
        "sse": attribute_sse.sum(),
        "attribute_mse": attribute_sse / attribute_count.clamp(min=1).to(attribute_sse.dtype),
        "attribute_count": attribute_count,
    }
    return loss, metrics


def labelled_mean(per_example_loss: Tensor, global_num_labels: Tensor | int) -> Tensor:
    """This micro-batch's share of the global MSE over labelled entries.

    ``sum(per_example_loss) / global_num_labels``, where the normalizer counts
    the labels that are not ``ignore_value`` in the whole global batch (every
    micro-batch and data-parallel rank of the step); 0, not NaN, when there is
    none.

    Args:
        per_example_loss: ``[B]`` from :func:`regression_loss`.
        global_num_labels: the global batch's label count (int or 0-dim tensor).

    Returns:
        0-dim loss, differentiable w.r.t. ``per_example_loss``.
    """
    count = torch.as_tensor(global_num_labels, device=per_example_loss.device)
    return per_example_loss.sum() / count.clamp(min=1).to(per_example_loss.dtype)
