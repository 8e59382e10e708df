"""Token log-probs and entropy when the vocabulary is split across a tensor-parallel group.

Layout (Megatron's): rank ``r`` of ``group`` holds vocabulary columns
``[r * Vs, (r + 1) * Vs)`` of the logits (or of the output-layer weight), so the
global vocabulary is ``V = Vs * world_size``; padding the vocabulary to a
multiple of the group size is the caller's business. The LM-head variant also
takes uneven shards (each rank's first global id and the global size), so that
a padded vocabulary's padding rows can be sliced off, down to a rank with no row
at all. Labels are global token ids and are the same on every rank. No rank ever
holds more than its ``[N, Vs]`` shard.

How ranks combine (one collective per forward, none per backward)
------------------------------------------------------------------
Each rank runs the log-prob kernel once over its shard and packs, per token,
``k`` floats: its log-sum-exp ``lse_r``, its entropy ``H_r`` (only when entropy
is asked for) and the label's scaled logit ``z_label`` if it owns the label,
else 0 (only when log-probs are asked for): ``k = 2`` for log-probs or entropy
alone, ``k = 3`` for both. One ``all_gather_single`` (formerly
``all_gather_into_tensor``) gives every rank all ``W`` rows of statistics, and
every rank combines them locally::

    lse     = logsumexp_r lse_r
    w_r     = exp(lse_r - lse)                  # shard r's share of the mass
    H       = sum_r w_r * (H_r - log w_r)       # entropy of a mixture of disjoint supports
    logprob = z_label - lse                     # z_label summed over ranks: one is non-zero

``H = sum_r w_r (H_r - log w_r)`` is ``lse - E[z]`` rewritten as a weighted sum of
the kernel's per-shard entropies (accurate to a few float32 ulps of ``lse``, like
the log-prob); with one rank, or all the mass on one rank, it returns that
rank's ``H_r`` exactly.

Cost per token, ring algorithms, ``W`` ranks: the all-gather is ``W - 1``
latency steps and sends ``(W - 1) * 4k`` bytes per rank. The alternative, a max
all-reduce then a sum all-reduce of (sum-exp, sum p*z, target), is
``4 (W - 1)`` steps and ``2 (W - 1) / W * 16`` bytes. Megatron's
``vocab_parallel_cross_entropy`` does three all-reduces (max, sum-exp, target)
and keeps an fp32 ``[N, Vs]`` softmax for the backward; NeMo-Aligner's
vocab-parallel entropy all-gathers the full vocabulary. At the group sizes an LM
head is split over (2 to 8, within a node) these messages are latency-bound (16k
tokens, ``W = 8``, ``k = 3``: 1.3 MiB per rank, a few microseconds of NVLink),
so the single collective with the fewest steps wins; the all-gather only sends
fewer bytes than the two all-reduces for ``W <= 2``. It has a second merit:
every rank combines the same numbers in the same order, so the results are
bitwise identical on all ranks whatever reduction algorithm the backend picks,
and a policy and a reference model that share the code get the same numbers.

Backward is local: the kernel backward on the shard with the *global* ``lse``
and ``H`` gives ``g_lp * (onehot - p) - g_ent * p * (log p + H)`` for the shard's
columns, the one-hot term only on the rank that owns the label. It assumes the
upstream gradient is the same on every rank of the group (the loss is computed
redundantly on each tensor-parallel rank, as in Megatron). The LM-head variant,
:func:`vocab_parallel_linear_token_logprobs`, adds the one collective any
column-parallel layer needs: an all-reduce of the hidden states' gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from aligner.ops.linear import (
    check_linear_args,
    check_temperature,
    default_chunk_size,
    linear_backward_chunks,
    row_chunks,
)
from aligner.ops.logprob import IGNORE_INDEX, check_labels_in_vocab, logprobs_backward, logprobs_forward

# Labels as this rank's kernel sees them: a local column in [0, Vs) when the
# rank owns the label, Vs (which matches no column) when another rank does,
# _LOCAL_IGNORE for ignore_index rows. The kernel backward zeroes the
# whole log-prob gradient of an ignore_index row, but for a label it does not
# find among the columns it still applies the -g_lp * p term: exactly a
# non-owning shard's gradient. (The forward range-checks labels, so it is
# called without them and the owned logit is gathered here.)
_LOCAL_IGNORE = -1


def _group_rank_and_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "vocab-parallel ops need torch.distributed to be initialized (aligner.parallel.initialize "
            "or torch.distributed.init_process_group); on one process use aligner.ops instead"
        )
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of `group`")
    return rank, dist.get_world_size(group)


def _check_logits_shard(logits_shard: Tensor) -> None:
    if not logits_shard.is_floating_point():
        raise TypeError(
            f"logits_shard must be a floating-point tensor (float32, bfloat16, float16 or float64), "
            f"got {logits_shard.dtype}"
        )
    if logits_shard.dim() < 1 or logits_shard.shape[-1] < 1:
        raise ValueError(
            f"logits_shard must have a non-empty last (vocabulary) dimension, got {tuple(logits_shard.shape)}"
        )


def _local_labels(
    labels: Tensor,
    rows_shape: torch.Size,
    device: torch.device,
    vocab_start: int,
    shard_vocab: int,
    vocab_size: int,
    vocab_source: str,
    ignore_index: int,
) -> Tensor:
    """Validate global ``labels`` and map them to this rank's kernel labels (see _LOCAL_IGNORE): ``[N]`` int64.

    This rank holds global ids ``[vocab_start, vocab_start + shard_vocab)``; labels must lie in
    ``[0, vocab_size)`` (``vocab_source`` says where that bound comes from) or be ``ignore_index``.
    """
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be an int64 or int32 tensor, got {labels.dtype}")
    if labels.device != device:
        raise ValueError(f"labels must be on the device of the logits/hidden ({device}), got {labels.device}")
    if labels.shape != rows_shape:
        raise ValueError(f"labels must have shape {tuple(rows_shape)} (the logits' rows), got {tuple(labels.shape)}")
    flat = labels.reshape(-1).long()
    check_labels_in_vocab(flat, vocab_size, ignore_index, vocab_source)
    local = flat - vocab_start
    local = torch.where((local < 0) | (local >= shard_vocab), shard_vocab, local)
    return torch.where(flat == ignore_index, _LOCAL_IGNORE, local)


def _equal_shards_source(shard_vocab: int, world: int) -> str:
    return f"the global vocabulary: {shard_vocab} columns per rank x {world} ranks"


def _stats_width(with_logprobs: bool, with_entropy: bool) -> int:
    return 1 + int(with_entropy) + int(with_logprobs)


def _fill_shard_stats(
    stats: Tensor, logits: Tensor, local_labels: Tensor | None, temperature: float, with_entropy: bool
) -> None:
    """Write ``[lse_r, (H_r), (owned z_label)]`` of the ``[rows, Vs]`` shard ``logits`` into ``stats`` ``[rows, k]``."""
    _, entropy, lse = logprobs_forward(logits, None, temperature, _LOCAL_IGNORE, False, with_entropy)
    stats[:, 0] = lse
    if with_entropy:
        stats[:, 1] = entropy
    if local_labels is not None:
        shard_vocab = logits.shape[-1]
        owned = (local_labels >= 0) & (local_labels < shard_vocab)
        picked = logits.gather(-1, local_labels.clamp(0, shard_vocab - 1).unsqueeze(-1)).squeeze(-1)
        # Scaled as the kernel scales (by the reciprocal), so one rank and W ranks agree.
        scaled = picked.to(stats.dtype) * (1.0 / temperature)
        stats[:, -1] = torch.where(owned, scaled, 0.0)


def _fill_empty_shard_stats(stats: Tensor) -> None:
    """The statistics of a shard without columns: ``lse_r = -inf`` (no mass), ``H_r = 0``, no label logit.

    :func:`_combine_across_ranks` gives such a shard weight ``exp(-inf - lse) = 0``: it adds
    nothing to the log-sum-exp, and its entropy term is zeroed like that of any shard without mass.
    """
    stats.zero_()
    stats[:, 0] = float("-inf")


def _combine_across_ranks(
    stats: Tensor, group: dist.ProcessGroup | None, world: int, local_labels: Tensor | None, with_entropy: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """All-gather every rank's ``[N, k]`` statistics and merge them: ``(logprobs, entropy, lse)``, each ``[N]``.

    ``logprobs`` / ``entropy`` are ``[0]``-shaped when not asked for.
    """
    if world == 1 or stats.numel() == 0:
        gathered = stats.unsqueeze(0)
    else:
        gathered = stats.new_empty((world * stats.shape[0], stats.shape[1]))  # ranks concatenated along rows
        dist.all_gather_single(gathered, stats.contiguous(), group=group)
        gathered = gathered.view(world, *stats.shape)
    shard_lse = gathered[..., 0]  # [W, N]
    lse = torch.logsumexp(shard_lse, dim=0)
    entropy = stats.new_empty(0)
    if with_entropy:
        log_share = shard_lse - lse
        terms = torch.exp(log_share) * (gathered[..., 1] - log_share)
        # A shard with no mass (all its logits -inf) has a NaN entropy and weight 0;
        # a NaN anywhere else still propagates.
        entropy = torch.where(shard_lse == float("-inf"), 0.0, terms).sum(dim=0)
    logprobs = stats.new_empty(0)
    if local_labels is not None:
        target = gathered[..., -1].sum(dim=0)
        logprobs = torch.where(local_labels == _LOCAL_IGNORE, 0.0, target - lse)
    return logprobs, entropy, lse


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _VocabParallelLogprobsEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_shard, local_labels, group, world, temperature, with_entropy):
        shard_vocab = logits_shard.shape[-1]
        flat = logits_shard.reshape(-1, shard_vocab)
        with_logprobs = local_labels is not None
        stats = flat.new_empty(
            (flat.shape[0], _stats_width(with_logprobs, with_entropy)), dtype=_stats_dtype(flat.dtype)
        )
        _fill_shard_stats(stats, flat, local_labels, temperature, with_entropy)
        logprobs, entropy, lse = _combine_across_ranks(stats, group, world, local_labels, with_entropy)
        ctx.save_for_backward(logits_shard, local_labels, lse, entropy)
        ctx.temperature, ctx.with_logprobs, ctx.with_entropy = temperature, with_logprobs, with_entropy
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(
            *[out for out, asked in ((logprobs, with_logprobs), (entropy, with_entropy)) if not asked]
        )
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        logits_shard, local_labels, lse, entropy = ctx.saved_tensors
        grad_logprobs = grad_logprobs if ctx.with_logprobs else None
        grad_entropy = grad_entropy if ctx.with_entropy else None
        if grad_logprobs is None and grad_entropy is None:
            return None, None, None, None, None, None
        grad = logprobs_backward(
            grad_logprobs,
            grad_entropy,
            logits_shard.reshape(-1, logits_shard.shape[-1]),
            None if grad_logprobs is None else local_labels,
            lse,
            None if grad_entropy is None else entropy,
            ctx.temperature,
            _LOCAL_IGNORE,
        )
        return grad.view(logits_shard.shape), None, None, None, None, None


def _vocab_parallel(
    logits_shard: Tensor,
    labels: Tensor | None,
    group: dist.ProcessGroup | None,
    temperature: float,
    ignore_index: int,
    with_entropy: bool,
) -> tuple[Tensor, Tensor]:
    _check_logits_shard(logits_shard)
    check_temperature(temperature)
    rank, world = _group_rank_and_size(group)
    rows_shape = logits_shard.shape[:-1]
    local_labels = None
    if labels is not None:
        shard_vocab = logits_shard.shape[-1]
        local_labels = _local_labels(
            labels,
            rows_shape,
            logits_shard.device,
            rank * shard_vocab,
            shard_vocab,
            shard_vocab * world,
            _equal_shards_source(shard_vocab, world),
            ignore_index,
        )
    logprobs, entropy = _VocabParallelLogprobsEntropy.apply(
        logits_shard, local_labels, group, world, float(temperature), with_entropy
    )
    return (
        logprobs.view(rows_shape) if labels is not None else logprobs,
        entropy.view(rows_shape) if with_entropy else entropy,
    )


def vocab_parallel_token_logprobs(
    logits_shard: Tensor,
    labels: Tensor,
    group: dist.ProcessGroup | None = None,
    *,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """``token_logprobs`` of the full-vocabulary logits, given this rank's vocabulary shard.

    Args:
        logits_shard: ``[..., Vs]`` columns ``[rank * Vs, (rank + 1) * Vs)`` of the logits
            (float32, bfloat16, float16 or float64).
        labels: ``[...]`` int64/int32 global token ids in ``[0, Vs * world_size)`` or
            ``ignore_index``; the same on every rank.
        group: the tensor-parallel process group (``None``: the default group).
        temperature: positive divisor applied to the logits.
        ignore_index: label value whose position gets log-prob 0 and zero gradient.

    Returns:
        ``[...]`` float32 (float64 for float64 logits), the same on every rank.
        Differentiable w.r.t. ``logits_shard``; the backward needs no collective.
        One ``all_gather`` of 2 floats per token (see the module docstring).

    Raises:
        RuntimeError: torch.distributed is not initialized.
        TypeError: non-floating logits or non-integer labels.
        ValueError: labels not of shape ``logits_shard.shape[:-1]``, temperature <= 0.
        IndexError: a label outside the global vocabulary that is not ``ignore_index``.
    """
    logprobs, _ = _vocab_parallel(logits_shard, labels, group, temperature, ignore_index, False)
    return logprobs


def vocab_parallel_entropy(
    logits_shard: Tensor, group: dist.ProcessGroup | None = None, *, temperature: float = 1.0
) -> Tensor:
    """``token_entropy`` of the full-vocabulary logits, given this rank's vocabulary shard.

    ``-sum_j p_j log p_j`` over all ``V`` columns with ``p = softmax(logits / T)``;
    ``[...]`` float32 (float64 for float64 logits), the same on every rank,
    differentiable w.r.t. ``logits_shard``. One ``all_gather`` of 2 floats per token.
    Raises as :func:`vocab_parallel_token_logprobs`.
    """
    _, entropy = _vocab_parallel(logits_shard, None, group, temperature, IGNORE_INDEX, True)
    return entropy


def vocab_parallel_token_logprobs_and_entropy(
    logits_shard: Tensor,
    labels: Tensor,
    group: dist.ProcessGroup | None = None,
    *,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[Tensor, Tensor]:
    """``(vocab_parallel_token_logprobs(...), vocab_parallel_entropy(...))`` from one kernel pass and one collective.

    One ``all_gather`` of 3 floats per token. Entropy is computed for every row,
    ``ignore_index`` rows included. Raises as :func:`vocab_parallel_token_logprobs`.
    """
    return _vocab_parallel(logits_shard, labels, group, temperature, ignore_index, True)


class _VocabParallelLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden, weight_shard, local_labels, group, world, temperature, chunk_size, with_entropy, reduce_grad
    ):
        stats = hidden.new_empty((hidden.shape[0], _stats_width(True, with_entropy)), dtype=_stats_dtype(hidden.dtype))
        if weight_shard.shape[0] == 0:  # only padding rows here: no logits, no mass
            _fill_empty_shard_stats(stats)
        else:
            for rows in row_chunks(hidden.shape[0], chunk_size):
                logits = F.linear(hidden[rows], weight_shard)  # [chunk, Vs]
                _fill_shard_stats(stats[rows], logits, local_labels[rows], temperature, with_entropy)
                del logits  # before the next chunk's logits exist
        logprobs, entropy, lse = _combine_across_ranks(stats, group, world, local_labels, with_entropy)
        ctx.save_for_backward(hidden, weight_shard, local_labels, lse, entropy)
        ctx.group, ctx.world = group, world
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        ctx.with_entropy, ctx.reduce_grad = with_entropy, reduce_grad
        ctx.set_materialize_grads(False)
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight_shard, local_labels, lse, entropy = ctx.saved_tensors
        if not ctx.with_entropy:
            grad_entropy = None
        if grad_logprobs is None and grad_entropy is None:
            return (None,) * 9

        def grad_of_logits(rows: slice, logits: Tensor) -> Tensor:
            return logprobs_backward(
                None if grad_logprobs is None else grad_logprobs[rows],
                None if grad_entropy is None else grad_entropy[rows],
                logits,
                None if grad_logprobs is None else local_labels[rows],
                lse[rows],
                None if grad_entropy is None else entropy[rows],
                ctx.temperature,
                _LOCAL_IGNORE,
            )

        grad_hidden, grad_weight = linear_backward_chunks(
            hidden, weight_shard, ctx.chunk_size, grad_of_logits, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        )
        if grad_hidden is not None and ctx.reduce_grad and ctx.world > 1:
            # Each rank's grad_hidden covers its own vocabulary columns only.
            dist.all_reduce(grad_hidden, group=ctx.group)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def vocab_parallel_linear_token_logprobs(
    hidden: Tensor,
    weight_shard: Tensor,
    labels: Tensor,
    group: dist.ProcessGroup | None = None,
    *,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None,
    return_entropy: bool = False,
    all_reduce_grad_hidden: bool = True,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Full-vocabulary log-probs (and entropy) of ``hidden @ weight.T`` from this rank's output-layer shard.

    ``weight_shard`` is the ``[Vs, H]`` weight of Megatron's ``ColumnParallelLinear``
    output layer on this rank (vocabulary rows ``[rank * Vs, (rank + 1) * Vs)``).
    Rows are processed in chunks as in :func:`aligner.ops.linear_token_logprobs`,
    so no rank holds more than one ``[chunk, Vs]`` block of logits; the ranks
    combine with one ``all_gather`` of 2 (3 with entropy) floats per token.

    Uneven shards: with ``vocab_start`` and ``vocab_size``, this rank holds global ids
    ``[vocab_start, vocab_start + Vs)`` and the ranks' ranges together cover ``[0, vocab_size)``
    once (the caller's contract; it is not checked across ranks). That is how Megatron's padded
    vocabulary is dropped without masking: each rank passes the real rows of its padded shard
    (``weight[: max(0, min(Vs_padded, vocab_size - rank * Vs_padded))]``, a view, so padding rows
    get a zero gradient) with ``vocab_start = rank * Vs_padded``. A rank may then hold no rows
    at all (``[0, H]``): it contributes no probability mass (log-sum-exp ``-inf``), still joins
    the collectives, and gets a zero gradient for ``hidden``'s share and an empty one for its weight.

    Args:
        hidden: ``[..., H]`` hidden states, the same on every rank (gather a
            sequence-parallel input first).
        weight_shard: ``[Vs, H]``, dtype of ``hidden``; ``Vs`` may be 0 when ``vocab_size`` is given.
        labels: ``[...]`` global token ids or ``ignore_index``, the same on every rank.
        group: the tensor-parallel process group (``None``: the default group).
        temperature, ignore_index, chunk_size, return_entropy: as in ``linear_token_logprobs``.
        all_reduce_grad_hidden: sum ``hidden``'s gradient over the group in the backward
            (each rank only sees its columns), so that ``hidden.grad`` is the full gradient
            on every rank. Set ``False`` when ``hidden`` comes out of a region whose
            backward already reduces it (Megatron's ``copy_to_tensor_model_parallel_region``
            or sequence-parallel gather).
        vocab_start: the global id of ``weight_shard``'s row 0; ``None``: ``rank * Vs`` (equal shards).
        vocab_size: the global vocabulary size labels are checked against; ``None``:
            ``Vs * world_size`` (equal shards).

    Returns:
        ``[...]`` float32 log-probs (float64 for float64 inputs), or ``(logprobs, entropy)``;
        the same on every rank. Differentiable w.r.t. ``hidden`` and ``weight_shard``.

    Raises:
        RuntimeError: torch.distributed is not initialized.
        TypeError / ValueError / IndexError: as :func:`aligner.ops.linear_token_logprobs`,
            with the label range checked against the global vocabulary (``vocab_size``, else
            ``Vs * world_size``); ValueError for a ``vocab_start`` / ``vocab_size`` that does not
            contain this rank's rows, or an empty ``weight_shard`` without ``vocab_size``.
    """
    check_linear_args(hidden, weight_shard, labels, chunk_size, allow_empty_vocab=vocab_size is not None)
    check_temperature(temperature)
    rank, world = _group_rank_and_size(group)
    shard_vocab = weight_shard.shape[0]
    if vocab_start is None:
        vocab_start = rank * shard_vocab
    if vocab_size is None:
        vocab_size = shard_vocab * world
        vocab_source = _equal_shards_source(shard_vocab, world)
    else:
        vocab_source = "vocab_size"
    if not (isinstance(vocab_start, int) and isinstance(vocab_size, int)):
        raise TypeError(f"vocab_start and vocab_size must be ints, got {vocab_start!r} and {vocab_size!r}")
    if vocab_start < 0 or vocab_size < 1 or (shard_vocab > 0 and vocab_start + shard_vocab > vocab_size):
        raise ValueError(
            f"this rank's rows [vocab_start, vocab_start + weight_shard.shape[0]) = [{vocab_start}, "
            f"{vocab_start + shard_vocab}) must lie in [0, vocab_size) = [0, {vocab_size})"
        )
    local_labels = _local_labels(
        labels, hidden.shape[:-1], hidden.device, vocab_start, shard_vocab, vocab_size, vocab_source, ignore_index
    )
    chunk = chunk_size if chunk_size is not None else default_chunk_size(shard_vocab)
    logprobs, entropy = _VocabParallelLinearLogprobs.apply(
        hidden.reshape(-1, hidden.shape[-1]),
        weight_shard,
        local_labels,
        group,
        world,
        float(temperature),
        chunk,
        return_entropy,
        all_reduce_grad_hidden,
    )
    logprobs = logprobs.view(labels.shape)
    return (logprobs, entropy.view(labels.shape)) if return_entropy else logprobs
