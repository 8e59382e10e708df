"""Refit between a trainer and an engine: the trainer's weights as Hugging Face-named tensors in bounded buckets.

    for bucket in hf_weight_buckets(actor, bucket_bytes=256 << 20):
        ...                                   # send / hand over; the engine loads bucket by bucket
    engine.refit_from_hf_buckets(hf_weight_buckets(actor), version=step)

The names and layouts are those :func:`aligner.models.hf.export_hf` writes
(:func:`aligner.models.hf.megatron_to_hf`), so any engine that loads a Hugging
Face checkpoint can be refit from them (as NeMo-RL and veRL stream weights to
vLLM). A bucket bounds what is in flight at once (one transfer, on a GPU one
IPC handle or broadcast); the producer here gathers a pipeline stage's weights
to the CPU first, as the export does.

A pipeline-parallel trainer holds a stage's layers per rank, and an engine
generates with every layer: :func:`build_engine_model` gives each rank a
full-depth copy (its tensor-parallel shard) to refit from the stages::

    engine_model = build_engine_model(policy)  # the policy itself when pp == 1
    engine = TorchEngine(engine_model, eos_token_id=..., pad_token_id=...)
    engine.refit(policy, version=step)         # free when pp == 1, else the stages' buckets
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from aligner.generation.base import HFWeightBucket

DEFAULT_BUCKET_BYTES = 256 << 20  # 256 MiB: NeMo-RL's and veRL's buckets are of this order


def bucket_named_tensors(named: Iterable[tuple[str, Tensor]], bucket_bytes: int) -> Iterator[HFWeightBucket]:
    """Group ``(name, tensor)`` pairs, in order, into buckets of at most ``bucket_bytes`` bytes.

    A tensor larger than ``bucket_bytes`` travels alone in its own bucket.

    Raises:
        ValueError: ``bucket_bytes < 1``.
    """
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    bucket: list[tuple[str, Tensor]] = []
    size = 0
    for name, tensor in named:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside wrappers that keep it as ``.module`` (megatron DDP, Float16Module)."""
    while not hasattr(model, "aligner_config") and hasattr(model, "module"):
        model = model.module
    return model


def _check_language_model(model: torch.nn.Module, caller: str) -> None:
    if model.aligner_num_value_outputs is not None:
        raise ValueError(f"{caller} needs a language model; this one has a value head")


@contextlib.contextmanager
def _one_pipeline_stage() -> Iterator[None]:
    """megatron's parallel state answering pipeline size 1, rank 0 inside the block; restored on exit."""
    from megatron.core import parallel_state

    # megatron's own overrides, None when unset (its getters then ask the process groups): restore exactly them.
    saved_size = parallel_state._MPU_PIPELINE_MODEL_PARALLEL_WORLD_SIZE
    saved_rank = parallel_state._MPU_PIPELINE_MODEL_PARALLEL_RANK
    parallel_state.set_pipeline_model_parallel_world_size(1)
    parallel_state.set_pipeline_model_parallel_rank(0)
    try:
        yield
    finally:
        parallel_state.set_pipeline_model_parallel_world_size(saved_size)
        parallel_state.set_pipeline_model_parallel_rank(saved_rank)


def build_engine_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model a generation engine runs on this rank for the trainer's ``model``.

    Pipeline size 1: ``model`` itself (the engine shares its weights; a refit is free).
    Pipeline size above 1: a new full-depth (pipeline size 1) language model of the
    same ``aligner_config``, this rank's tensor-parallel shard, on every rank of the
    pipeline. Its weights are not initialized (no random draws, so the trainer's
    random streams are untouched): refit it from ``model`` before generating. It
    needs no gradients (``requires_grad`` is False) and belongs to no wrapper,
    optimizer or gradient buffer of the trainer. It costs a whole model's shard of
    memory per rank besides the trainer's stage.

    The copy is built by :func:`aligner.models.gpt.build_model` while megatron's
    pipeline size and rank are overridden to 1 and 0 (restored afterwards, also on
    an error): every stage then builds every layer, numbered from 0, with the
    embedding and the output layer, and shares no tied embedding over the
    pipeline's embedding group.

    Args:
        model: this rank's trainer model from :func:`aligner.models.gpt.build_model`
            (or a wrapper holding it as ``.module``).

    Raises:
        ValueError: a value model.
    """
    from megatron.core import parallel_state

    from aligner.models.gpt import build_model

    inner = unwrap_model(model)
    _check_language_model(inner, "build_engine_model")
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return model
    with _one_pipeline_stage():
        engine_model = build_model(inner.aligner_config, init_weights=False)
    engine_model.requires_grad_(False)
    return engine_model


def _stage_hf_tensors(model: torch.nn.Module) -> dict[str, Tensor]:
    """This pipeline stage's weights, Hugging Face-named full tensors on the CPU (tensor-parallel collective)."""
    from aligner.models.hf import megatron_to_hf
    from aligner.models.sharding import gather_full_state_dict

    return megatron_to_hf(gather_full_state_dict(model), model.aligner_config)


def _stage_buckets_over_pipeline(model: torch.nn.Module, bucket_bytes: int) -> Iterator[HFWeightBucket]:
    """Every stage's buckets on every rank of the pipeline group, stage by stage.

    In stage ``s``'s turn its ranks gather their weights (global layer numbers) and
    broadcast them over their pipeline group, first each bucket's names, shapes and
    dtypes, then the bucket's tensors; the other stages receive them. A rank holds its
    own stage's weights during its turn and one received bucket at a time otherwise.
    """
    from megatron.core import parallel_state

    group = parallel_state.get_pipeline_model_parallel_group()
    my_stage = parallel_state.get_pipeline_model_parallel_rank()
    device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
    for stage in range(parallel_state.get_pipeline_model_parallel_world_size()):
        source = dist.get_global_rank(group, stage)
        buckets = []
        if stage == my_stage:
            buckets = list(bucket_named_tensors(_stage_hf_tensors(model).items(), bucket_bytes))
        layout = [[[(name, tensor.shape, tensor.dtype) for name, tensor in bucket] for bucket in buckets]]
        dist.broadcast_object_list(layout, src=source, group=group)
        for index, bucket_layout in enumerate(layout[0]):
            if stage == my_stage:
                bucket = buckets[index]
                for _, tensor in bucket:
                    dist.broadcast(tensor.to(device), src=source, group=group)
                buckets[index] = None  # drop the stage's tensors as they go
            else:
                bucket = []
                for name, shape, dtype in bucket_layout:
                    tensor = torch.empty(shape, dtype=dtype, device=device)
                    dist.broadcast(tensor, src=source, group=group)
                    bucket.append((name, tensor.cpu()))
            yield bucket


@torch.no_grad()
def hf_weight_buckets(model: torch.nn.Module, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> Iterator[HFWeightBucket]:
    """The weights of a language model as Hugging Face-named full tensors, in buckets.

    A collective over the tensor- and pipeline-parallel groups: every rank of them
    iterates to the end, and every rank gets the same buckets holding every weight
    of the model, whatever its pipeline stage. Each stage's tensor-parallel shards
    are gathered with :func:`aligner.models.sharding.gather_full_state_dict`
    (global layer numbers, as :func:`aligner.models.hf.export_hf` writes per stage);
    with pipeline parallelism the stages then take turns broadcasting their buckets
    over the pipeline group. The tensors come on the CPU.

    Args:
        model: a language model from :func:`aligner.models.gpt.build_model` (or a wrapper
            holding it as ``.module``), this rank's shard.
        bucket_bytes: the most bytes in one bucket.

    Raises:
        ValueError: a value model, or ``bucket_bytes < 1``.
    """
    from megatron.core import parallel_state

    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    model = unwrap_model(model)
    _check_language_model(model, "hf_weight_buckets")
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        yield from bucket_named_tensors(_stage_hf_tensors(model).items(), bucket_bytes)
    else:
        yield from _stage_buckets_over_pipeline(model, bucket_bytes)
