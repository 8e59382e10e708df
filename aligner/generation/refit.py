"""The producer side of a refit: a model's weights as Hugging Face-named tensors in bounded buckets.

    for bucket in hf_weight_buckets(actor, bucket_bytes=256 << 20):
        ...                                   # send / hand over; the engine loads bucket by bucket
    engine.refit_from_hf_buckets(hf_weight_buckets(actor), version=step)

The names and layouts are those :func:`aligner.models.hf.export_hf` writes
(:func:`aligner.models.hf.megatron_to_hf`), so any engine that loads a Hugging
Face checkpoint can be refit from them (as NeMo-RL and veRL stream weights to
vLLM). A bucket bounds what is in flight at once (one transfer, on a GPU one
IPC handle or broadcast); the producer here gathers the whole model to the CPU
first, as the export does.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
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


@torch.no_grad()
def hf_weight_buckets(model: torch.nn.Module, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> Iterator[HFWeightBucket]:
    """The weights of a language model shard as Hugging Face-named full tensors, in buckets.

    A collective over the tensor-parallel group (the shards are gathered with
    :func:`aligner.models.sharding.gather_full_state_dict`): every rank of it
    iterates, and every rank gets the same buckets. The gathered copy lives on
    the CPU while the buckets are consumed.

    Args:
        model: a language model from :func:`aligner.models.gpt.build_model` (or a wrapper
            holding it as ``.module``), this rank's shard; pipeline size 1.
        bucket_bytes: the most bytes in one bucket.

    Raises:
        ValueError: a value model, or ``bucket_bytes < 1``.
    """
    from aligner.models.hf import megatron_to_hf
    from aligner.models.sharding import gather_full_state_dict

    model = unwrap_model(model)
    if model.aligner_num_value_outputs is not None:
        raise ValueError("hf_weight_buckets needs a language model; this one has a value head")
    full = gather_full_state_dict(model)
    hf = megatron_to_hf(full, model.aligner_config)
    del full
    yield from bucket_named_tensors(hf.items(), bucket_bytes)
