"""RL numerics as kernels: KL penalty, masked statistics, GAE and group advantages.

Python faces of ``torch.ops.aligner.{kl_penalty_*, masked_moments, gae,
group_advantages}`` (csrc/cpu/rl.cpp, csrc/cuda/rl.cu) with fake kernels and,
where the op is differentiable, autograd.
"""

from __future__ import annotations

import torch
from torch import Tensor

import aligner._C  # noqa: F401  (registers torch.ops.aligner)
from aligner.ops.logprob import check_tensor_args

KL_ESTIMATORS = {"k1": 0, "abs": 1, "k2": 2, "k3": 3}
GAE_MASK_MODES = ("zero", "carry_forward")
GROUP_BASELINES = ("mean", "leave_one_out")
GROUP_SCALES = ("std", None)


def _float_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# ---- KL penalty --------------------------------------------------------------


@torch.library.register_fake("aligner::kl_penalty_forward")
def _kl_forward_fake(logprobs, ref_logprobs, estimator):
    return logprobs.new_empty(logprobs.shape, dtype=_float_dtype(logprobs, ref_logprobs))


@torch.library.register_fake("aligner::kl_penalty_backward")
def _kl_backward_fake(grad, logprobs, ref_logprobs, estimator):
    return torch.empty_like(logprobs), torch.empty_like(ref_logprobs)


def _kl_setup_context(ctx, inputs, output):
    logprobs, ref_logprobs, estimator = inputs
    ctx.save_for_backward(logprobs, ref_logprobs)
    ctx.estimator = estimator


def _kl_backward(ctx, grad):
    logprobs, ref_logprobs = ctx.saved_tensors
    grad_lp, grad_ref = torch.ops.aligner.kl_penalty_backward(grad, logprobs, ref_logprobs, ctx.estimator)
    return grad_lp, grad_ref, None


torch.library.register_autograd("aligner::kl_penalty_forward", _kl_backward, setup_context=_kl_setup_context)


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, *, estimator: str = "k1") -> Tensor:
    """Per-token KL estimate from ``d = logprobs - ref_logprobs``.

    ``k1``: ``d``; ``abs``: ``|d|``; ``k2``: ``d**2 / 2``; ``k3``: ``exp(-d) + d - 1`` (>= 0).
    Shapes must match. Returns float32 (float64 if an input is float64); differentiable
    w.r.t. both inputs.

    Raises:
        ValueError: unknown ``estimator`` or mismatched shapes.
        TypeError: non-floating inputs.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"estimator must be one of {sorted(KL_ESTIMATORS)}, got {estimator!r}")
    check_tensor_args("kl_penalty", logprobs=logprobs, ref_logprobs=ref_logprobs)
    return torch.ops.aligner.kl_penalty_forward(logprobs, ref_logprobs, KL_ESTIMATORS[estimator])


# ---- masked statistics -------------------------------------------------------


@torch.library.register_fake("aligner::masked_moments")
def _moments_fake(x, mask):
    shape = x.shape[:-1]
    dtype = _float_dtype(x)
    return (x.new_empty(shape, dtype=dtype), x.new_empty(shape, dtype=dtype), x.new_empty(shape, dtype=dtype))


def _moments_setup_context(ctx, inputs, output):
    x, mask = inputs
    count, mean, _ = output
    ctx.save_for_backward(x, mask, count, mean)
    ctx.mark_non_differentiable(count)


def _moments_backward(ctx, grad_count, grad_mean, grad_m2):
    x, mask, count, mean = ctx.saved_tensors
    valid = (mask != 0).to(mean.dtype)
    grad = torch.zeros_like(valid)
    if grad_mean is not None:
        # d mean / d x_i = valid_i / count
        grad = grad + valid * (grad_mean / count.clamp_min(1)).unsqueeze(-1)
    if grad_m2 is not None:
        # d m2 / d x_i = 2 (x_i - mean) valid_i  (the path through the mean sums to 0)
        grad = grad + valid * 2 * (x.to(mean.dtype) - mean.unsqueeze(-1)) * grad_m2.unsqueeze(-1)
    return grad.to(x.dtype), None


torch.library.register_autograd("aligner::masked_moments", _moments_backward, setup_context=_moments_setup_context)


def _moments(x: Tensor, mask: Tensor, dim: int | None) -> tuple[Tensor, Tensor, Tensor]:
    """(count, mean, m2) over ``dim`` (all elements when None) of the valid entries."""
    check_tensor_args("masked statistics", x=x, mask=mask)
    if not isinstance(mask, Tensor) or mask.shape != x.shape:
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask must have the shape of x {tuple(x.shape)}, got {got}")
    if dim is None:
        return tuple(t.reshape(()) for t in torch.ops.aligner.masked_moments(x.reshape(1, -1), mask.reshape(1, -1)))
    if not -x.dim() <= dim < max(x.dim(), 1):
        raise ValueError(f"dim {dim} is out of range for x with {x.dim()} dimensions")
    return torch.ops.aligner.masked_moments(x.movedim(dim, -1), mask.movedim(dim, -1))


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over the entries where ``mask != 0``, over ``dim`` or all elements.

    ``mask`` (bool, int or float; nonzero means valid) has the shape of ``x``. An empty
    selection gives 0, never NaN. Returns float32 (float64 for float64 ``x``), with
    ``dim`` removed (0-d when ``dim`` is None). Differentiable w.r.t. ``x``.
    """
    _, mean, _ = _moments(x, mask, dim)
    return mean


def masked_var(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Population variance of the valid entries of ``x`` (0 for an empty selection)."""
    count, _, m2 = _moments(x, mask, dim)
    return m2 / count.clamp_min(1)


@torch.library.register_fake("aligner::masked_whiten")
def _whiten_fake(x, mask, shift_mean, eps):
    dtype = _float_dtype(x)
    return x.new_empty(x.shape, dtype=dtype), x.new_empty((), dtype=dtype), x.new_empty((), dtype=dtype)


def _whiten_setup_context(ctx, inputs, output):
    x, mask, shift_mean, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, mask, mean, rstd)
    ctx.shift_mean = shift_mean
    ctx.mark_non_differentiable(mean, rstd)


def _whiten_backward(ctx, grad_out, grad_mean, grad_rstd):
    # y = (x - mean) * rstd over the n valid entries (batch-norm backward):
    #   dx = valid * rstd * (g - mean(g) - y * mean(g * y)),  plus valid * mean(g) when the mean is added back.
    x, mask, mean, rstd = ctx.saved_tensors
    valid = (mask != 0).to(mean.dtype)
    n = valid.sum().clamp_min(1)
    g = grad_out * valid
    y = (x.to(mean.dtype) - mean) * rstd * valid
    mean_g = g.sum() / n
    mean_gy = (g * y).sum() / n
    grad = valid * rstd * (g - mean_g - y * mean_gy)
    if not ctx.shift_mean:
        grad = grad + valid * mean_g
    return grad.to(x.dtype), None, None, None


torch.library.register_autograd("aligner::masked_whiten", _whiten_backward, setup_context=_whiten_setup_context)


def masked_whiten(x: Tensor, mask: Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """``(x - mean) * rsqrt(var + eps)`` with mean and population variance over the valid entries.

    With ``shift_mean=False`` the mean is added back (only the scale changes), as in
    NeMo-Aligner. Positions where ``mask == 0`` are 0 in the output. Returns float32
    (float64 for float64 ``x``); differentiable w.r.t. ``x``.

    Raises:
        ValueError: ``mask`` not of the shape of ``x``; ``eps < 0``.
    """
    check_tensor_args("masked_whiten", x=x, mask=mask)
    if not isinstance(mask, Tensor) or mask.shape != x.shape:
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask must have the shape of x {tuple(x.shape)}, got {got}")
    whitened, _, _ = torch.ops.aligner.masked_whiten(x, mask, bool(shift_mean), float(eps))
    return whitened


# ---- advantages --------------------------------------------------------------


@torch.library.register_fake("aligner::gae")
def _gae_fake(rewards, values, mask, gamma, lam, carry_forward):
    dtype = _float_dtype(rewards, values)
    return rewards.new_empty(rewards.shape, dtype=dtype), rewards.new_empty(rewards.shape, dtype=dtype)


@torch.library.register_fake("aligner::group_advantages")
def _group_fake(rewards, valid, group_size, leave_one_out, scale_by_std, eps):
    return rewards.new_empty(rewards.shape, dtype=_float_dtype(rewards))


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float, lam: float, mask_mode: str = "zero"
) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation over ``[B, T]``, as a reverse scan per sequence.

    ``delta_t = r_t + gamma * V_{t+1} - V_t``, ``A_t = delta_t + gamma * lam * A_{t+1}``,
    ``returns = A + V``; the value and advantage after the last position are 0.

    ``mask_mode="zero"`` (NeMo-Aligner): masked positions enter the recurrence as
    ``r = V = 0``, so right padding means "value after the last valid token is 0".
    ``mask_mode="carry_forward"`` (verl, NeMo-RL multi-turn): masked positions are
    skipped; ``V_{t+1}`` and ``A_{t+1}`` are those of the next valid token.
    Both modes return 0 at masked positions. Not differentiable (inputs are detached).

    Returns:
        ``(advantages, returns)``, float32 ``[B, T]`` (float64 for float64 inputs).

    Raises:
        ValueError: shapes differ or are not 2-D, gamma/lam outside [0, 1], unknown mask_mode.
    """
    if mask_mode not in GAE_MASK_MODES:
        raise ValueError(f"mask_mode must be one of {GAE_MASK_MODES}, got {mask_mode!r}")
    check_tensor_args("gae", rewards=rewards, values=values, mask=mask)
    return torch.ops.aligner.gae(
        rewards.detach(), values.detach(), mask, float(gamma), float(lam), mask_mode == "carry_forward"
    )


def group_advantages(
    rewards: Tensor,
    group_size: int,
    *,
    baseline: str = "mean",
    scale: str | None = "std",
    eps: float = 1e-6,
    valid: Tensor | None = None,
) -> Tensor:
    """GRPO / RLOO advantages of samples grouped by prompt.

    ``rewards`` is ``[P * G]`` or ``[P, G]`` with the ``G = group_size`` samples of a prompt
    adjacent. Over the valid samples of a group (``valid``: optional mask of the same
    shape; invalid samples get 0): ``baseline="mean"`` subtracts the group mean;
    ``"leave_one_out"`` subtracts the mean of the other valid samples (RLOO) and gives a
    group with at most one valid sample zero advantage. ``scale="std"`` divides by the
    group's unbiased std plus ``eps`` (GRPO); ``scale=None`` does not (Dr. GRPO, RLOO).
    Returns float32 of the shape of ``rewards``; not differentiable.

    Raises:
        ValueError: unknown baseline/scale, ``rewards.numel()`` not divisible by group_size.
    """
    if baseline not in GROUP_BASELINES:
        raise ValueError(f"baseline must be one of {GROUP_BASELINES}, got {baseline!r}")
    if scale not in GROUP_SCALES:
        raise ValueError(f"scale must be one of {GROUP_SCALES}, got {scale!r}")
    check_tensor_args("group_advantages", optional=("valid",), rewards=rewards, valid=valid)
    return torch.ops.aligner.group_advantages(
        rewards.detach(), valid, int(group_size), baseline == "leave_one_out", scale == "std", float(eps)
    )
