"""Float64 pure-torch references of every op in :mod:`aligner.ops`.

Each function has the signature of the op it mirrors, upcasts its inputs to
float64, computes the textbook formula with plain torch (no aligner kernel),
and returns float64. They are slow and allocate freely; the tests compare the
kernels against them, so they are written to be obviously right, not fast.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _log_softmax(logits: Tensor, temperature: float) -> Tensor:
    return torch.log_softmax(logits.double() / temperature, dim=-1)


def _entropy_from_log_softmax(log_probs: Tensor) -> Tensor:
    # 0 * log 0 := 0. Selecting log p = 0 where p = 0 keeps both the value and
    # the gradient finite (0 * -inf would be NaN in either).
    probs = log_probs.exp()
    return -(probs * torch.where(probs > 0, log_probs, 0.0)).sum(-1)


def _gather_labels(log_probs: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    keep = labels != ignore_index
    safe_labels = torch.where(keep, labels, 0).long()
    picked = log_probs.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    return torch.where(keep, picked, 0.0)


def token_logprobs(logits: Tensor, labels: Tensor, *, temperature: float = 1.0, ignore_index: int = -100) -> Tensor:
    """``log_softmax(logits / T, -1)[..., label]``, 0 where ``label == ignore_index``. ``[..., V] -> [...]``."""
    return _gather_labels(_log_softmax(logits, temperature), labels, ignore_index)


def token_entropy(logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """``-sum_j p_j log p_j`` with ``p = softmax(logits / T)`` and ``0 log 0 = 0``. ``[..., V] -> [...]``."""
    return _entropy_from_log_softmax(_log_softmax(logits, temperature))


def token_logprobs_and_entropy(
    logits: Tensor, labels: Tensor, *, temperature: float = 1.0, ignore_index: int = -100
) -> tuple[Tensor, Tensor]:
    """``(token_logprobs(...), token_entropy(...))``; the entropy is computed for every row."""
    log_probs = _log_softmax(logits, temperature)
    return _gather_labels(log_probs, labels, ignore_index), _entropy_from_log_softmax(log_probs)


def linear_argmax(hidden: Tensor, weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(argmax, max, logsumexp)`` over the last dim of ``hidden @ weight.T`` in float64. ``[..., H] -> [...]``."""
    logits = hidden.double() @ weight.double().T
    return logits.argmax(dim=-1), logits.max(dim=-1).values, logits.logsumexp(dim=-1)


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, *, estimator: str = "k1") -> Tensor:
    """Per-element KL estimate of ``d = logprobs - ref_logprobs``.

    ``k1``: ``d``; ``abs``: ``|d|``; ``k2``: ``d**2 / 2``; ``k3``: ``exp(-d) + d - 1``.
    """
    d = logprobs.double() - ref_logprobs.double()
    if estimator == "k1":
        return d
    if estimator == "abs":
        return d.abs()
    if estimator == "k2":
        return d * d / 2
    if estimator == "k3":
        return torch.exp(-d) + d - 1
    raise ValueError(f"unknown estimator {estimator!r}")


def _masked_sum_and_count(x: Tensor, mask: Tensor, dim: int | None) -> tuple[Tensor, Tensor]:
    valid = mask != 0
    kept = torch.where(valid, x.double(), 0.0)
    if dim is None:
        return kept.sum(), valid.sum().double()
    return kept.sum(dim), valid.sum(dim).double()


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """``sum(x * valid) / count(valid)`` over ``dim`` (all elements when None); 0 where nothing is valid."""
    total, count = _masked_sum_and_count(x, mask, dim)
    return torch.where(count > 0, total / count.clamp_min(1), 0.0)


def masked_var(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Population variance ``mean((x - mean)**2)`` over the valid entries; 0 where nothing is valid."""
    mean = masked_mean(x, mask, dim)
    deviation = x.double() - (mean if dim is None else mean.unsqueeze(dim))
    return masked_mean(deviation * deviation, mask, dim)


def masked_whiten(x: Tensor, mask: Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """``(x - mean) / sqrt(var + eps)`` (``+ mean`` if not ``shift_mean``) over all valid entries; 0 elsewhere."""
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    whitened = (x.double() - mean) / torch.sqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask != 0, whitened, 0.0)


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float, lam: float, mask_mode: str = "zero"
) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation over ``[B, T]`` as a plain reverse loop over time.

    ``delta_t = r_t + gamma V_{t+1} - V_t``, ``A_t = delta_t + gamma lam A_{t+1}``, returns ``A + V``,
    with V and A after the last position 0; outputs are 0 at masked positions.

    ``"zero"`` follows NeMo-Aligner's ``calculate_advantages_and_returns``: rewards and
    values are multiplied by the mask, then the recurrence runs over every position.
    ``"carry_forward"`` follows verl's multi-turn ``compute_gae_advantage_return``: at a
    masked position the running ``(V_next, A_next)`` pass through unchanged.
    """
    valid = mask != 0
    rewards = torch.where(valid, rewards.double(), 0.0)
    values = torch.where(valid, values.double(), 0.0)
    batch, length = rewards.shape
    next_value = torch.zeros(batch, dtype=torch.float64)
    next_advantage = torch.zeros(batch, dtype=torch.float64)
    advantages = torch.zeros(batch, length, dtype=torch.float64)
    for t in reversed(range(length)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = advantage
        if mask_mode == "zero":
            next_value, next_advantage = values[:, t], advantage
        elif mask_mode == "carry_forward":
            next_value = torch.where(valid[:, t], values[:, t], next_value)
            next_advantage = torch.where(valid[:, t], advantage, next_advantage)
        else:
            raise ValueError(f"unknown mask_mode {mask_mode!r}")
    advantages = torch.where(valid, advantages, 0.0)
    returns = torch.where(valid, advantages + values, 0.0)
    return advantages, returns


def group_advantages(
    rewards: Tensor,
    group_size: int,
    *,
    baseline: str = "mean",
    scale: str | None = "std",
    eps: float = 1e-6,
    valid: Tensor | None = None,
) -> Tensor:
    """GRPO / RLOO advantages over groups of ``group_size`` adjacent samples.

    Per group, over its ``n`` valid samples: ``A_i = r_i - b_i`` with ``b_i`` the group mean
    (``"mean"``) or ``(sum - r_i) / (n - 1)`` (``"leave_one_out"``, and ``A = 0`` when ``n <= 1``);
    divided by ``std + eps`` when ``scale == "std"``, std the unbiased std (0 when ``n <= 1``).
    Invalid samples get 0. Returns float64 of the shape of ``rewards``.
    """
    r = rewards.double().reshape(-1, group_size)  # [groups, group_size]
    ok = torch.ones_like(r, dtype=torch.bool) if valid is None else (valid != 0).reshape(r.shape)
    r = torch.where(ok, r, 0.0)
    n = ok.sum(-1, keepdim=True).double()
    total = r.sum(-1, keepdim=True)
    mean = total / n.clamp_min(1)
    squares = torch.where(ok, (r - mean) ** 2, 0.0).sum(-1, keepdim=True)
    std = torch.where(n > 1, torch.sqrt(squares / (n - 1).clamp_min(1)), 0.0)
    if baseline == "mean":
        advantages = r - mean
    elif baseline == "leave_one_out":
        advantages = torch.where(n > 1, r - (total - r) / (n - 1).clamp_min(1), 0.0)
    else:
        raise ValueError(f"unknown baseline {baseline!r}")
    if scale == "std":
        advantages = advantages / (std + eps)
    return torch.where(ok, advantages, 0.0).reshape(rewards.shape)
