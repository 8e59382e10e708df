"""Per-token log-probs of a megatron GPTModel without its ``[batch, seq, vocab]`` logits.

A training step calls these two instead of ``logits = model(input_ids, None, None)``
followed by :func:`aligner.algorithms.logprobs.sequence_logprobs`::

    def forward_step(data_iterator, model):  # megatron's forward_step_func
        batch = next(data_iterator)
        hidden = lm_hidden_states(model, batch["input_ids"])  # the stage's output tensor

        def loss_func(hidden):  # last pipeline stage only
            token_logps = lm_token_logprobs(model, hidden, batch["labels"])  # [B, S] float32
            ...

        return hidden, loss_func

- :func:`lm_hidden_states` runs the model up to (not including) its output layer:
  on the last pipeline stage the final RMS-normed hidden states ``[S, B, H]``,
  elsewhere exactly what the stage sends downstream.
- :func:`lm_token_logprobs` turns them into ``log_softmax(h @ W.T / T)[label]`` with
  the fused chunked head (:func:`aligner.ops.linear_token_logprobs`, or
  :func:`aligner.parallel.vocab_parallel.vocab_parallel_linear_token_logprobs` over
  megatron's tensor-parallel group), so that at most one ``[chunk, V / tp]`` block of
  logits exists at a time, in the forward and in the backward.

How the output layer is skipped
-------------------------------
GPTModel's ``forward`` ends in ``_postprocess``, which returns the decoder's hidden
states unchanged when the model's ``post_process`` flag is False: that is how a
pipeline stage without the output layer works, and the flag is a constructor
argument of GPTModel. :func:`lm_hidden_states` clears that flag for one call of the
model's own ``forward`` and restores it in a ``finally`` (:func:`_output_layer_skipped`).
The decoder keeps its own ``post_process`` (it owns the final RMSNorm), so the hidden
states are normed as the output layer would see them. Only the GPTModel instance's
attribute changes, nothing in megatron's code. The alternatives are more fragile:
calling ``_preprocess`` and ``decoder`` ourselves re-implements ``forward`` from
private pieces whose signatures change between megatron releases (``_preprocess``
has returned 6 and 7 values), and would silently miss whatever a later ``forward``
adds; replacing ``output_layer`` by an identity would break the tied weight
(``shared_embedding_or_output_weight``) and the state dict while it is swapped.

The GPTModel is called directly, inside any megatron ``DistributedDataParallel`` /
``Float16Module`` wrapper (unwrapped through ``.module``): DDP's ``forward`` only
calls its module (its hooks sit on the module's parameters and submodules, which
still run), and Float16Module would upcast the last stage's hidden states to
float32, a full ``[S, B, H]`` copy that the head (weight in the model's dtype)
would have to cast back; its input cast does not apply to integer token ids.

Padding and tensor parallelism
------------------------------
Megatron pads the vocabulary (``padded_vocab_size``); the logits path masks the
padding columns (:func:`aligner.models.gpt.mask_padded_vocab`) so that they carry no
probability mass. Here the padding rows of the output weight are sliced off instead
(a view: they get a zero gradient), which gives the same values. Under tensor
parallelism rank ``r`` holds rows ``[r * Vs, (r + 1) * Vs)`` of the padded weight and
keeps its real rows ``[r * Vs, min((r + 1) * Vs, V))``, possibly none (a vocabulary of
100 at tp=2 is padded to 256: rank 1 holds only padding); the vocab-parallel head
takes such uneven shards, an empty one included, with ``vocab_start = r * Vs``.
The gradient of the hidden states is summed over the tensor-parallel group, as
megatron's ``ColumnParallelLinear`` output layer does: an all-reduce in the head,
or, with sequence parallelism, the reduce-scatter in the backward of the
sequence-parallel gather that :func:`lm_hidden_states` does on the last stage
(what ``ColumnParallelLinear`` does with a sequence-parallel input). That branch
is not exercised by the tests: ``build_model``'s local layer spec (torch RMSNorm)
refuses sequence parallelism, which needs Transformer Engine layers.

Not supported: multi-token prediction (``mtp_num_layers``) and value/reward models
(their output layer is a scalar head: call the model itself).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from torch import Tensor

from aligner.ops import IGNORE_INDEX, linear_token_logprobs
from aligner.parallel.vocab_parallel import vocab_parallel_linear_token_logprobs


def _unwrap(model: torch.nn.Module) -> GPTModel:
    """The GPTModel inside wrappers that keep it as ``.module`` (megatron DDP, Float16Module)."""
    inner = model
    while not isinstance(inner, GPTModel) and isinstance(getattr(inner, "module", None), torch.nn.Module):
        inner = inner.module
    if not isinstance(inner, GPTModel):
        raise TypeError(f"expected a megatron GPTModel or a wrapper of one (.module), got {type(model).__name__}")
    return inner


def _check_language_model(gpt: GPTModel) -> None:
    if getattr(gpt, "aligner_num_value_outputs", None) is not None:
        raise ValueError(
            "this is a value/reward model (its output layer is a scalar head): lm_hidden_states / "
            "lm_token_logprobs apply to language models only"
        )
    if gpt.mtp_process:
        raise NotImplementedError("multi-token prediction (mtp_num_layers) is not supported by the fused LM head")


@contextlib.contextmanager
def _output_layer_skipped(gpt: GPTModel) -> Iterator[None]:
    """GPTModel.forward returns the decoder's hidden states while its ``post_process`` is False."""
    saved = gpt.post_process
    gpt.post_process = False
    try:
        yield
    finally:
        gpt.post_process = saved


def lm_hidden_states(model: torch.nn.Module, input_ids: Tensor) -> Tensor:
    """Run the GPTModel (or a megatron DDP / Float16Module wrapper of it) on ``input_ids`` without its output layer.

    The call is ``model(input_ids, None, None)`` (RoPE positions ``0..S-1``, causal
    attention: right-padded rows, as everywhere in aligner) with the output layer skipped.

    Args:
        model: this rank's GPTModel shard (a language model), possibly wrapped.
        input_ids: ``[B, S]`` token ids (read by the first pipeline stage only; later
            stages take their input from ``set_input_tensor``, as in megatron's schedules).

    Returns:
        This pipeline stage's output tensor: on the last stage the final (RMS-normed)
        hidden states ``[S, B, H]`` in the model's dtype, gathered over the tensor-parallel
        group if sequence parallelism is on; on any other stage exactly what
        ``model(input_ids, None, None)`` returns there (what megatron sends downstream).
        Return it from a ``forward_step_func`` as the output tensor; on the last stage
        hand it to :func:`lm_token_logprobs`.

    Raises:
        TypeError: ``model`` is not a GPTModel or a wrapper of one.
        ValueError: a value/reward model. NotImplementedError: multi-token prediction.
    """
    gpt = _unwrap(model)
    _check_language_model(gpt)
    is_last_stage = gpt.post_process
    with _output_layer_skipped(gpt):
        hidden = gpt(input_ids, None, None)
    if is_last_stage and gpt.config.sequence_parallel:
        # What the output layer's input does under sequence parallelism: all-gather the
        # sequence, and in the backward reduce-scatter (sum) the ranks' vocab-column shares.
        hidden = gather_from_sequence_parallel_region(
            hidden, tensor_parallel_output_grad=True, group=gpt.pg_collection.tp
        )
    return hidden


def _output_weight(gpt: GPTModel) -> Tensor:
    """The output layer's weight on this stage: the embedding's when the two are tied."""
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight


def _check_labels(labels: Tensor, hidden: Tensor, vocab_size: int) -> None:
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [seq, batch, hidden] (lm_hidden_states' output), got {tuple(hidden.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be an int64 or int32 tensor, got {labels.dtype}")
    seq, batch = hidden.shape[:2]
    if labels.shape != (batch, seq):
        raise ValueError(
            f"labels must be [batch, seq] = {(batch, seq)} (hidden is [seq, batch, hidden] = {tuple(hidden.shape)}), "
            f"got {tuple(labels.shape)}"
        )
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab_size))
    if bad.any():
        raise IndexError(
            f"labels hold id(s) {labels[bad].unique().tolist()[:8]} outside [0, vocab_size={vocab_size}) that are not "
            f"{IGNORE_INDEX} (ids >= vocab_size are megatron's vocabulary padding); the tokenizer and the model "
            "config disagree"
        )


def _head(
    gpt: GPTModel, hidden: Tensor, weight: Tensor, labels: Tensor, vocab_size: int, temperature: float, entropy: bool
):
    """The fused head over ``hidden [..., H]`` and this rank's (padded) output weight, for ``labels [...]``."""
    tp_group = gpt.pg_collection.tp
    tp = dist.get_world_size(tp_group) if tp_group is not None else 1
    if tp == 1:
        return linear_token_logprobs(
            hidden,
            weight[:vocab_size],
            labels,
            temperature=temperature,
            ignore_index=IGNORE_INDEX,
            return_entropy=entropy,
        )
    shard_rows = weight.shape[0]
    vocab_start = dist.get_rank(tp_group) * shard_rows
    real_rows = max(0, min(shard_rows, vocab_size - vocab_start))
    return vocab_parallel_linear_token_logprobs(
        hidden,
        weight[:real_rows],
        labels,
        tp_group,
        temperature=temperature,
        ignore_index=IGNORE_INDEX,
        return_entropy=entropy,
        # Under sequence parallelism the gather in lm_hidden_states reduce-scatters the gradient.
        all_reduce_grad_hidden=not gpt.config.sequence_parallel,
        vocab_start=vocab_start,
        vocab_size=vocab_size,
    )


def lm_token_logprobs(
    model: torch.nn.Module,
    hidden: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    labelled_only: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """``log_softmax(hidden @ W.T / T)[labels]`` per token over the real vocabulary, without the logits.

    ``W`` is the output weight (``output_layer.weight``, or the embedding's when embeddings
    are tied) of this rank, a vocabulary shard under tensor parallelism; its padding rows
    (ids ``>= model.aligner_config.vocab_size``) carry no probability mass, as in the logits
    path with ``mask_padded_vocab``. Computed by the chunked fused head (see the module
    docstring); differentiable w.r.t. ``hidden`` and ``W``, and ``hidden``'s gradient is the
    full one on every tensor-parallel rank (as megatron's output layer makes it). Without
    ``return_entropy`` only the positions with a label go through the head (prompt and
    padding rows cost nothing); with it, every position does (entropy is defined everywhere),
    unless ``labelled_only`` asks for the entropy of the labelled positions alone.

    Args:
        model: the GPTModel (or a wrapper of it) on its last pipeline stage.
        hidden: ``[S, B, H]`` from :func:`lm_hidden_states` on this stage.
        labels: ``[B, S]`` int64/int32 token ids in ``[0, vocab_size)`` or -100 (the batch
            contract: already shifted, -100 where nothing is trained).
        temperature: positive divisor applied to the logits.
        return_entropy: also return the entropy of every position (-100 ones included).
        labelled_only: with ``return_entropy``, the entropy of the labelled positions only (0 where
            ``labels == -100``), at the cost of the log-probs alone (e.g. a policy's entropy over
            its response tokens, where a rollout is often half prompt).

    Returns:
        ``[B, S]`` float32 log-probs (float64 for a float64 model), 0 where ``labels == -100``;
        or ``(logprobs, entropy)``. The same on every tensor-parallel rank.

    Raises:
        ValueError: not the last pipeline stage, a value/reward model, ``hidden`` not 3-D or
            ``labels`` not ``[B, S]``, ``temperature <= 0``. TypeError: bad dtypes.
        IndexError: a label outside ``[0, vocab_size)`` (a padding id included) that is not -100.
    """
    gpt = _unwrap(model)
    _check_language_model(gpt)
    if not gpt.post_process:
        raise ValueError("lm_token_logprobs runs on the last pipeline stage (the one with the output layer)")
    config = getattr(gpt, "aligner_config", None)
    vocab_size = config.vocab_size if config is not None else gpt.vocab_size
    _check_labels(labels, hidden, vocab_size)
    weight = _output_weight(gpt)
    labels_sb = labels.t()  # [S, B], the rows of hidden; transposing ids is cheaper than the hidden states
    if not return_entropy or labelled_only:
        # Only trained positions need the head: prompt and padding rows (label -100) are left out of
        # the [rows, V] products, forward and backward (a DPO or SFT batch is often half prompt).
        flat_labels = labels_sb.reshape(-1)
        rows = (flat_labels != IGNORE_INDEX).nonzero().squeeze(1)
        if 0 < rows.numel() < flat_labels.numel():
            hidden_rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
            labels_rows = flat_labels.index_select(0, rows)
            out = _head(gpt, hidden_rows, weight, labels_rows, vocab_size, temperature, return_entropy)
            scattered = [
                part.new_zeros(flat_labels.shape).index_copy(0, rows, part).view(labels_sb.shape).t().contiguous()
                for part in (out if return_entropy else (out,))
            ]
            return tuple(scattered) if return_entropy else scattered[0]
    out = _head(gpt, hidden, weight, labels_sb, vocab_size, temperature, return_entropy)
    if return_entropy:
        logprobs, entropy = out
        if labelled_only:
            entropy = torch.where(labels_sb == IGNORE_INDEX, 0.0, entropy)
        return logprobs.t().contiguous(), entropy.t().contiguous()
    return out.t().contiguous()
