"""Sequence log-probs of a policy's logits, and reward-model scores at the last token.

Batches follow the batch contract: ``labels[:, t]`` is the token that position
``t`` predicts when that token is trained, else ``-100``, so the token log-probs
are already shifted and 0 wherever nothing is trained.

Megatron pads the vocabulary (to a multiple of 128 times the tensor-parallel
size); the padding columns are pushed to the dtype's lowest value before the
softmax so they carry no probability mass.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from aligner.ops import IGNORE_INDEX, token_logprobs
from aligner.parallel.vocab_parallel import vocab_parallel_token_logprobs


def _mask_padding(logits: Tensor, vocab_size: int, vocab_start: int) -> Tensor:
    if vocab_start + logits.shape[-1] <= vocab_size:
        return logits
    # Imported here: megatron-core (pulled in by aligner.models.gpt) takes seconds to import,
    # and only a padded vocabulary needs it.
    from aligner.models.gpt import mask_padded_vocab

    return mask_padded_vocab(logits, vocab_size, vocab_start)


def sequence_logprobs(
    logits: Tensor,
    labels: Tensor,
    *,
    vocab_size: int | None = None,
    tp_group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token log-probs of ``labels`` and their sum and count per sequence.

    ``token_logps[b, t] = log_softmax(logits[b, t] / T)[labels[b, t]]`` over the
    real vocabulary (columns ``>= vocab_size`` masked out), 0 where
    ``labels == -100``. When ``tp_group`` has more than one rank, ``logits`` is
    this rank's vocabulary shard (columns ``[rank * Vs, (rank + 1) * Vs)``) and
    the result, the same on every rank of the group, comes from
    :func:`aligner.parallel.vocab_parallel.vocab_parallel_token_logprobs`.

    Args:
        logits: ``[B, S, Vs]`` float logits (the full padded vocabulary, or a
            tensor-parallel shard of it).
        labels: ``[B, S]`` int64 global token ids in ``[0, vocab_size)`` or ``-100``.
        vocab_size: the real vocabulary size; ``None``: every column is real.
        tp_group: the tensor-parallel group the vocabulary is split over;
            ``None`` or a group of one rank: ``logits`` hold the whole vocabulary.
        temperature: positive divisor applied to the logits.

    Returns:
        ``(token_logps [B, S], sums [B], counts [B])``: float32 (float64 for
        float64 logits) token log-probs differentiable w.r.t. ``logits``, their
        sum over each row, and the int64 number of trained tokens per row.

    Raises:
        ValueError: ``logits`` not 3-D, ``labels`` not ``logits.shape[:-1]``,
            ``vocab_size`` not in ``[1, padded vocabulary]``, ``temperature <= 0``.
        IndexError: a label at or beyond ``vocab_size`` (a padding id) that is not ``-100``.
        TypeError: non-floating logits or non-integer labels.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be [batch, seq, vocab], got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels must have shape {tuple(logits.shape[:-1])} (the logits' batch and seq), got {tuple(labels.shape)}"
        )
    tp_size = 1 if tp_group is None else dist.get_world_size(tp_group)
    tp_rank = 0 if tp_group is None else dist.get_rank(tp_group)
    shard_vocab = logits.shape[-1]
    padded_vocab = shard_vocab * tp_size
    if vocab_size is not None:
        if not 1 <= vocab_size <= padded_vocab:
            raise ValueError(
                f"vocab_size must be in [1, {padded_vocab}] (the padded vocabulary: {shard_vocab} columns x "
                f"{tp_size} tensor-parallel ranks), got {vocab_size}"
            )
        out_of_vocab = (labels >= vocab_size) & (labels != IGNORE_INDEX)
        if out_of_vocab.any():
            raise IndexError(
                f"labels hold padding-vocabulary id(s) {labels[out_of_vocab].unique().tolist()[:8]} "
                f">= vocab_size {vocab_size}; the tokenizer and the model config disagree"
            )
        logits = _mask_padding(logits, vocab_size, tp_rank * shard_vocab)
    if tp_size > 1:
        token_logps = vocab_parallel_token_logprobs(
            logits, labels, group=tp_group, temperature=temperature, ignore_index=IGNORE_INDEX
        )
    else:
        token_logps = token_logprobs(logits, labels, temperature=temperature, ignore_index=IGNORE_INDEX)
    return token_logps, *sum_per_sequence(token_logps, labels)


def sum_per_sequence(token_logps: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's summed token log-probs and its number of trained tokens.

    Args:
        token_logps: ``[B, S]`` per-token log-probs, 0 where ``labels == -100``.
        labels: ``[B, S]`` token ids or ``-100``.

    Returns:
        ``(sums [B], counts [B])``: ``token_logps.sum(-1)`` and the int64 count of ``labels != -100``.
    """
    return token_logps.sum(dim=-1), (labels != IGNORE_INDEX).sum(dim=-1)


def last_token_values(values: Tensor, lengths: Tensor) -> Tensor:
    """The per-token outputs of a reward model read at each sequence's last real token.

    ``out[b] = values[b, lengths[b] - 1]`` (batches are right-padded).

    Args:
        values: ``[B, S, K]`` per-token scalars (``K`` reward heads / attributes).
        lengths: ``[B]`` int64 number of real tokens per row, in ``[1, S]``.

    Returns:
        ``[B, K]``, differentiable w.r.t. ``values``.

    Raises:
        ValueError: ``values`` not 3-D, ``lengths`` not ``[B]`` integers, or a
            length outside ``[1, S]``.
    """
    if values.dim() != 3:
        raise ValueError(f"values must be [batch, seq, outputs], got shape {tuple(values.shape)}")
    batch, seq, _ = values.shape
    if lengths.shape != (batch,) or lengths.is_floating_point() or lengths.dtype == torch.bool:
        raise ValueError(
            f"lengths must be an integer tensor of shape ({batch},), got {lengths.dtype} {tuple(lengths.shape)}"
        )
    if ((lengths < 1) | (lengths > seq)).any():
        raise ValueError(f"lengths must lie in [1, {seq}] (the sequence length), got {lengths.tolist()}")
    rows = torch.arange(batch, device=values.device)
    return values[rows, lengths.to(values.device).long() - 1]
