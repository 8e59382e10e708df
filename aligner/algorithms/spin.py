"""SPIN's loss: DPO's sigmoid loss with the real (SFT) response as chosen and the model's own as rejected.

Self-play fine-tuning (Chen et al. 2024, arXiv:2401.01335; NeMo-Aligner's SPIN). With sequence log-prob
sums of the policy and of the reference (the model at the start of the iteration, which also generated
the rejected responses), ``Δ = logp - ref``::

    loss = -logsigmoid(beta * (Δ_real - Δ_generated))

which is :func:`aligner.algorithms.dpo.preference_loss` (``sigmoid``) under SPIN's names. A pair whose
generated response is the real one token for token has ``Δ_real = Δ_generated`` whatever the weights:
its loss is ``log 2`` and its gradient 0. It has no preference to get right, so it is left out of the
accuracy and counted in ``identical_fraction`` instead (as the model approaches the data, more pairs
are identical: SPIN's fixed point is ``p_model = p_data``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from aligner.algorithms.dpo import preference_loss


def spin_loss(
    policy_real_logps: Tensor,
    policy_generated_logps: Tensor,
    ref_real_logps: Tensor,
    ref_generated_logps: Tensor,
    identical: Tensor,
    *,
    beta: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair SPIN loss ``-logsigmoid(beta * ((logp_real - ref_real) - (logp_generated - ref_generated)))``.

    Args:
        policy_real_logps, policy_generated_logps: ``[B]`` summed policy log-probs of the real and
            the generated responses.
        ref_real_logps, ref_generated_logps: ``[B]`` the same under the reference (constants).
        identical: ``[B]`` bool, True where the generated response equals the real one.
        beta: ``> 0``, the inverse temperature (NeMo-Aligner's ``ref_policy_kl_penalty``).

    Returns:
        ``(loss [B], metrics)``; the loss is differentiable w.r.t. the policy log-probs. Metrics
        (detached 0-dim): ``real_reward`` / ``generated_reward`` (mean implicit rewards
        ``beta * (logp - ref)``), ``margin`` (their mean gap), ``accuracy`` (over the pairs that
        are not identical, the fraction whose real reward is the larger; 0 when every pair is
        identical), ``distinct_pairs`` (how many that is) and ``identical_fraction``.

    Raises:
        ValueError: ``beta <= 0``, or inputs that are not ``[B]`` of one shape (``identical`` included).
    """
    if identical.shape != policy_real_logps.shape:
        raise ValueError(
            f"identical must have the shape of policy_real_logps {tuple(policy_real_logps.shape)}, "
            f"got {tuple(identical.shape)}"
        )
    loss, metrics = preference_loss(
        policy_real_logps, policy_generated_logps, ref_real_logps, ref_generated_logps, beta=beta, loss_type="sigmoid"
    )
    gap = beta * ((policy_real_logps - ref_real_logps) - (policy_generated_logps - ref_generated_logps)).detach()
    distinct = ~identical.to(torch.bool)
    distinct_pairs = distinct.sum()
    correct = ((gap > 0) & distinct).sum()
    accuracy = correct.to(gap.dtype) / distinct_pairs.clamp(min=1).to(gap.dtype)
    return loss, {
        "real_reward": metrics["chosen_reward"],
        "generated_reward": metrics["rejected_reward"],
        "margin": metrics["margin"],
        "accuracy": accuracy,
        "distinct_pairs": distinct_pairs.to(gap.dtype),
        "identical_fraction": (~distinct).to(gap.dtype).mean(),
    }
