"""The DPO family of preference losses: DPO/cDPO, IPO, hinge, reward-aware RPO, SimPO, ORPO.

Inputs are per-pair sequence log-probs (sums over the response tokens, from
:func:`aligner.algorithms.logprobs.sequence_logprobs`) except for SimPO and ORPO,
which take length-normalized ones (``sums / counts``) and no reference model.
With ``Δ = (logp_c - ref_c) - (logp_r - ref_r)``:

==============  ==============================================================================
``sigmoid``     DPO ``-logsigmoid(beta Δ)``; with label smoothing ``s`` (cDPO)
                ``-(1 - s) logsigmoid(beta Δ) - s logsigmoid(-beta Δ)``
``ipo``         ``(Δ - 1 / (2 beta))^2``
``hinge``       ``relu(1 - beta Δ)``
``rpo_sq``      ``(beta Δ - eta Δr)^2`` with ``Δr = r*_c - r*_r`` the dataset rewards
``rpo_bwd_kl``  ``KL(B(beta Δ) || B(eta Δr))``, ``B(x) = (sigmoid(x), sigmoid(-x))``
``rpo_fwd_kl``  ``KL(B(eta Δr) || B(beta Δ))``
``simpo``       ``-logsigmoid(beta (avg_c - avg_r) - gamma)`` (label smoothing as cDPO)
``orpo``        ``-avg_c - beta logsigmoid(log_odds_c - log_odds_r)``,
                ``log_odds = avg - log(1 - exp(avg))``
==============  ==============================================================================

The RPO losses are NeMo-Aligner's reward-aware preference optimization. Each
loss is per pair; the trainer averages over the global number of pairs and adds
``sft_weight * sft_term(...)`` when asked to. The ``[2B]`` preference batch
(chosen rows first) is split with :func:`split_pairs`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "rpo_sq", "rpo_fwd_kl", "rpo_bwd_kl", "simpo", "orpo")
REFERENCE_FREE_LOSS_TYPES = ("simpo", "orpo")  # losses that use no reference policy
_REWARD_AWARE = ("rpo_sq", "rpo_fwd_kl", "rpo_bwd_kl")
_SMOOTHABLE = ("sigmoid", "simpo")
SFT_AVERAGES = ("token", "sum")


def split_pairs(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(chosen, rejected)`` halves of a ``[2B, ...]`` preference-batch tensor (chosen rows first).

    Raises:
        ValueError: ``x`` is 0-dim or its first dimension is odd.
    """
    if x.dim() == 0 or x.shape[0] % 2:
        raise ValueError(f"a preference batch has 2B rows (B chosen, then B rejected); got shape {tuple(x.shape)}")
    half = x.shape[0] // 2
    return x[:half], x[half:]


def _check_same_batch(named: dict[str, Tensor | None]) -> None:
    reference_name, reference = next(iter(named.items()))
    if reference.dim() != 1:
        raise ValueError(f"{reference_name} must be [batch] (one value per pair), got shape {tuple(reference.shape)}")
    for name, tensor in named.items():
        if tensor is not None and tensor.shape != reference.shape:
            raise ValueError(
                f"{name} must have the shape of {reference_name} {tuple(reference.shape)}, got {tuple(tensor.shape)}"
            )


def _check_arguments(loss_type: str, beta: float, label_smoothing: float, eta: float, refs, rewards) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type not in _SMOOTHABLE:
        raise ValueError(
            f"label_smoothing applies to loss_type {' or '.join(_SMOOTHABLE)} only, got {loss_type!r} "
            f"with label_smoothing={label_smoothing}"
        )
    if loss_type not in REFERENCE_FREE_LOSS_TYPES and any(ref is None for ref in refs):
        raise ValueError(f"loss_type {loss_type!r} needs ref_chosen_logps and ref_rejected_logps")
    if loss_type in _REWARD_AWARE:
        if any(reward is None for reward in rewards):
            raise ValueError(
                f"loss_type {loss_type!r} needs chosen_rewards and rejected_rewards (the dataset's "
                "chosen_reward / rejected_reward fields)"
            )
        if not eta > 0:
            raise ValueError(f"eta must be > 0, got {eta}")


def _bernoulli_kl(p_logit: Tensor, q_logit: Tensor) -> Tensor:
    """``KL(B(p_logit) || B(q_logit))`` for two-outcome distributions ``B(x) = (sigmoid(x), sigmoid(-x))``."""
    log_p, log_not_p = F.logsigmoid(p_logit), F.logsigmoid(-p_logit)
    log_q, log_not_q = F.logsigmoid(q_logit), F.logsigmoid(-q_logit)
    return log_p.exp() * (log_p - log_q) + log_not_p.exp() * (log_not_p - log_not_q)


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate on both sides of ``-log 2`` (Mächler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _log_odds(avg_logps: Tensor) -> Tensor:
    # A log-prob above -eps is rounding noise of a probability of 1 (the kernel's log-sum-exp is
    # exact to an ulp); capping it there keeps the odds and their gradient finite.
    capped = avg_logps.clamp(max=-torch.finfo(avg_logps.dtype).eps)
    return capped - _log1mexp(capped)


def _cdpo(logits: Tensor, label_smoothing: float) -> Tensor:
    loss = -F.logsigmoid(logits)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-logits)
    return loss


def preference_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_rewards: Tensor | None = None,
    rejected_rewards: Tensor | None = None,
    eta: float = 1.0,
    simpo_gamma: float = 0.5,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair loss of a DPO-family objective (formulas in the module docstring).

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[B]`` policy log-probs of the
            chosen / rejected responses: summed over tokens, or for ``simpo`` and
            ``orpo`` averaged over tokens.
        ref_chosen_logps, ref_rejected_logps: ``[B]`` summed reference log-probs;
            ignored (and may be ``None``) for ``simpo`` and ``orpo``.
        beta: ``> 0``, the inverse temperature (ORPO: the odds-ratio weight lambda).
        loss_type: one of :data:`LOSS_TYPES`.
        label_smoothing: ``[0, 0.5)``, the assumed label-flip rate of cDPO
            (``sigmoid`` and ``simpo`` only).
        chosen_rewards, rejected_rewards: ``[B]`` dataset rewards, required by the
            ``rpo_*`` losses.
        eta: ``> 0``, scale of the dataset reward gap in the ``rpo_*`` losses.
        simpo_gamma: SimPO's target margin ``gamma`` (in reward units, after beta).

    Returns:
        ``(loss [B], metrics)``; differentiable w.r.t. the policy log-probs (the
        reference log-probs and rewards are treated as constants by the caller).
        Metrics (detached 0-dim): ``chosen_reward`` / ``rejected_reward`` (mean
        implicit rewards ``beta * (logp - ref)``; ``beta * avg_logp`` for SimPO
        and ORPO), ``accuracy`` (fraction with chosen reward > rejected reward),
        ``margin`` (mean reward gap); ORPO adds ``nll`` and ``log_odds_ratio``.

    Raises:
        ValueError: unknown ``loss_type`` (the message lists the valid ones),
            ``beta <= 0``, ``label_smoothing`` outside ``[0, 0.5)`` or set for a loss
            that does not use it, missing reference log-probs, missing rewards or
            ``eta <= 0`` for ``rpo_*``, or inputs that are not ``[B]`` of one shape.
    """
    _check_arguments(
        loss_type,
        beta,
        label_smoothing,
        eta,
        (ref_chosen_logps, ref_rejected_logps),
        (chosen_rewards, rejected_rewards),
    )
    uses_refs = loss_type not in REFERENCE_FREE_LOSS_TYPES
    _check_same_batch(
        {
            "policy_chosen_logps": policy_chosen_logps,
            "policy_rejected_logps": policy_rejected_logps,
            "ref_chosen_logps": ref_chosen_logps if uses_refs else None,
            "ref_rejected_logps": ref_rejected_logps if uses_refs else None,
            "chosen_rewards": chosen_rewards,
            "rejected_rewards": rejected_rewards,
        }
    )
    metrics: dict[str, Tensor] = {}
    if uses_refs:
        chosen_reward = beta * (policy_chosen_logps - ref_chosen_logps)
        rejected_reward = beta * (policy_rejected_logps - ref_rejected_logps)
    else:
        chosen_reward = beta * policy_chosen_logps
        rejected_reward = beta * policy_rejected_logps
    reward_gap = chosen_reward - rejected_reward  # beta * Δ for the reference-based losses

    if loss_type == "sigmoid":
        loss = _cdpo(reward_gap, label_smoothing)
    elif loss_type == "ipo":
        delta = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
        loss = (delta - 1 / (2 * beta)).square()
    elif loss_type == "hinge":
        loss = F.relu(1 - reward_gap)
    elif loss_type in _REWARD_AWARE:
        target_gap = eta * (chosen_rewards - rejected_rewards).to(reward_gap.dtype)
        if loss_type == "rpo_sq":
            loss = (reward_gap - target_gap).square()
        elif loss_type == "rpo_bwd_kl":
            loss = _bernoulli_kl(reward_gap, target_gap)
        else:
            loss = _bernoulli_kl(target_gap, reward_gap)
    elif loss_type == "simpo":
        loss = _cdpo(reward_gap - simpo_gamma, label_smoothing)
    else:
        log_odds_ratio = _log_odds(policy_chosen_logps) - _log_odds(policy_rejected_logps)
        nll = -policy_chosen_logps
        loss = nll - beta * F.logsigmoid(log_odds_ratio)
        metrics["nll"] = nll.detach().mean()
        metrics["log_odds_ratio"] = log_odds_ratio.detach().mean()

    reward_gap = reward_gap.detach()
    metrics.update(
        chosen_reward=chosen_reward.detach().mean(),
        rejected_reward=rejected_reward.detach().mean(),
        accuracy=(reward_gap > 0).to(reward_gap.dtype).mean(),
        margin=reward_gap.mean(),
    )
    return loss, metrics


def sft_term(policy_chosen_logps_sum: Tensor, chosen_token_counts: Tensor, *, average: str = "token") -> Tensor:
    """Per-pair NLL of the chosen response, for an optional SFT term added to a preference loss.

    ``average="token"``: ``-logp_sum / count`` (mean NLL per token of each
    response); ``average="sum"``: ``-logp_sum``. A response without tokens (sum 0)
    gives 0, not NaN.

    Args:
        policy_chosen_logps_sum: ``[B]`` summed policy log-probs of the chosen responses.
        chosen_token_counts: ``[B]`` number of response tokens of each.
        average: ``"token"`` or ``"sum"``.

    Returns:
        ``[B]``, differentiable w.r.t. ``policy_chosen_logps_sum``.

    Raises:
        ValueError: unknown ``average`` or mismatched shapes.
    """
    if average not in SFT_AVERAGES:
        raise ValueError(f"unknown average {average!r}; valid: {', '.join(SFT_AVERAGES)}")
    _check_same_batch({"policy_chosen_logps_sum": policy_chosen_logps_sum, "chosen_token_counts": chosen_token_counts})
    nll = -policy_chosen_logps_sum
    if average == "sum":
        return nll
    return nll / chosen_token_counts.clamp(min=1).to(nll.dtype)
