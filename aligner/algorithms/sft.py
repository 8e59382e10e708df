"""Supervised fine-tuning loss (also SteerLM's attribute-conditioned SFT).

The loss of a step is the token mean over the GLOBAL batch:

    loss = sum over every trained token of every micro-batch on every data-parallel rank of -log p(token)
           / (number of those tokens)

not a mean of per-micro-batch (or per-rank) means, which would weight a token
of a short micro-batch more than a token of a long one and make the step
depend on how the batch was split. :func:`sft_loss` therefore returns summed
NLLs and a token count; the trainer counts the global batch's tokens first
(the labels are known before any forward), then backpropagates
``token_mean(per_example_nll, global_num_tokens)`` for each micro-batch so the
accumulated gradient is that of the global token mean.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sft_loss(token_logprobs: Tensor, loss_mask: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Summed negative log-likelihood of the trained tokens of each sequence.

    ``nll[b] = -sum_t loss_mask[b, t] * token_logprobs[b, t]``.

    Args:
        token_logprobs: ``[B, S]`` float log-probs of each label (from
            :func:`aligner.algorithms.logprobs.sequence_logprobs`).
        loss_mask: ``[B, S]`` bool (or 0/1) mask of trained tokens
            (``labels != -100``).

    Returns:
        ``(nll [B], metrics)``: the per-example summed NLL, differentiable w.r.t.
        ``token_logprobs`` (a row without trained tokens gives 0), and
        ``metrics = {"nll_sum": 0-dim, "num_tokens": 0-dim int64}``, detached.
        Normalize with :func:`token_mean` over the global batch.

    Raises:
        ValueError: ``token_logprobs`` not 2-D or ``loss_mask`` of another shape.
    """
    if token_logprobs.dim() != 2:
        raise ValueError(f"token_logprobs must be [batch, seq], got shape {tuple(token_logprobs.shape)}")
    if loss_mask.shape != token_logprobs.shape:
        raise ValueError(
            f"loss_mask must have the shape of token_logprobs {tuple(token_logprobs.shape)}, "
            f"got {tuple(loss_mask.shape)}"
        )
    mask = loss_mask.bool()
    # where, not a product: an untrained position may hold -inf (a masked-out vocabulary id).
    nll = -torch.where(mask, token_logprobs, torch.zeros_like(token_logprobs)).sum(dim=-1)
    metrics = {"nll_sum": nll.detach().sum(), "num_tokens": mask.sum()}
    return nll, metrics


def token_mean(per_example_nll: Tensor, global_num_tokens: Tensor | int) -> Tensor:
    """This micro-batch's share of the global token-mean loss: ``sum(per_example_nll) / global_num_tokens``.

    The normalizer is the number of trained tokens in the whole global batch
    (all micro-batches of the step, all data-parallel ranks), so that summing
    the micro-batches' gradients gives the gradient of the global token mean.
    A data-parallel gradient all-reduce that averages (rather than sums) over
    ``dp`` ranks divides by ``dp`` once more; the trainer multiplies by ``dp``
    in that case. With no trained token at all the loss is 0, not NaN.

    Args:
        per_example_nll: ``[B]`` summed NLLs from :func:`sft_loss`.
        global_num_tokens: the global batch's trained-token count (int or 0-dim tensor).

    Returns:
        0-dim loss, differentiable w.r.t. ``per_example_nll``.
    """
    count = torch.as_tensor(global_num_tokens, device=per_example_nll.device)
    return per_example_nll.sum() / count.clamp(min=1).to(per_example_nll.dtype)
