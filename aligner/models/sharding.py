"""Move whole weights into a rank's shard of a GPTModel, and gather them back.

The exchange format is a *full state dict*: megatron-core parameter names with
global layer numbers (``decoder.layers.{0..num_layers-1}...``), every tensor in
its tensor-parallel-size-1 layout and the vocabulary unpadded:

- ``self_attention.linear_qkv``: rows grouped per key/value head,
  ``[q (heads_per_group * head_dim), k (head_dim), v (head_dim)]`` per group;
- ``mlp.linear_fc1``: ``[gate; up]`` (``[2 * ffn, hidden]``);
- ``embedding.word_embeddings`` / ``output_layer``: ``[vocab_size, hidden]``
  (a value head's ``output_layer``, ``[num_outputs, hidden]``, is replicated).

Splitting follows megatron's own partitioning: column-parallel weights are cut
along rows (whole query groups stay together), row-parallel ones along columns;
``linear_fc1`` holds ``[gate_r; up_r]`` on rank r; the vocabulary is
zero-padded to the model's padded size before it is cut.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_TIED_OUTPUT = "output_layer.weight"
# How each tensor-parallel weight is split (by name suffix); everything else is replicated.
_COLUMN_PARALLEL = ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias")
_ROW_PARALLEL = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")
_GATE_UP = "mlp.linear_fc1.weight"
_VOCAB_PARALLEL = ("embedding.word_embeddings.weight", "output_layer.weight")


def _split_dim(model: GPTModel, name: str) -> int | None:
    """Dimension ``name`` is split along over tensor-parallel ranks; None when replicated."""
    if name.startswith("output_layer.") and model.aligner_num_value_outputs is not None:
        return None  # a value head (ScalarHead): the same weights on every rank
    if name.endswith(_COLUMN_PARALLEL) or name.endswith(_GATE_UP) or name in _VOCAB_PARALLEL:
        return 0
    if name.endswith(_ROW_PARALLEL):
        return 1
    return None


def _full_name(model: GPTModel, local_name: str) -> str:
    """Local parameter name -> name with the global layer number."""
    match = _LAYER.match(local_name)
    if match is None:
        return local_name
    offset = model.decoder.layers[0].layer_number - 1
    return f"decoder.layers.{int(match.group(1)) + offset}.{local_name[match.end() :]}"


def _is_tied_output(model: GPTModel, name: str) -> bool:
    return name == _TIED_OUTPUT and model.share_embeddings_and_output_weights


def _shard(
    model: GPTModel, full: torch.Tensor, name: str, shard_shape: torch.Size, rank: int, size: int
) -> torch.Tensor:
    dim = _split_dim(model, name)
    if dim is None:
        return full
    if name.endswith(_GATE_UP):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]], dim=0)
    if name in _VOCAB_PARALLEL:
        padded_rows = shard_shape[0] * size
        full = torch.nn.functional.pad(full, (0, 0, 0, padded_rows - full.shape[0]))
    return full.chunk(size, dim=dim)[rank]


def _unshard(model: GPTModel, shards: list[torch.Tensor], name: str, vocab_size: int) -> torch.Tensor:
    if name.endswith(_GATE_UP):
        halves = [shard.chunk(2, dim=0) for shard in shards]
        return torch.cat([gate for gate, _ in halves] + [up for _, up in halves], dim=0)
    full = torch.cat(shards, dim=_split_dim(model, name))
    return full[:vocab_size] if name in _VOCAB_PARALLEL else full


@torch.no_grad()
def load_full_state_dict(model: GPTModel, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy this rank's slice of every parameter from a full state dict.

    Keys for other pipeline stages are ignored. A tied output layer on the last
    stage of a pipeline is loaded from ``embedding.word_embeddings.weight``.

    Raises:
        KeyError: a parameter of this shard has no entry in ``state_dict``.
        ValueError: an entry's shape does not match the model.
    """
    rank = parallel_state.get_tensor_model_parallel_rank()
    size = parallel_state.get_tensor_model_parallel_world_size()
    missing = []
    for local_name, param in model.named_parameters():
        name = _full_name(model, local_name)
        source = "embedding.word_embeddings.weight" if _is_tied_output(model, name) else name
        if source not in state_dict:
            missing.append(source)
            continue
        shard = _shard(model, state_dict[source], name, param.shape, rank, size)
        if shard.shape != param.shape:
            raise ValueError(
                f"{source}: full shape {tuple(state_dict[source].shape)} gives a shard of {tuple(shard.shape)} "
                f"on tensor-parallel rank {rank}/{size}, but the model's parameter is {tuple(param.shape)}"
            )
        param.copy_(shard)
    if missing:
        raise KeyError(f"the state dict has no entry for {missing}")


@torch.no_grad()
def gather_full_state_dict(model: GPTModel) -> dict[str, torch.Tensor]:
    """This pipeline stage's parameters as a full state dict, on the CPU.

    A collective over the tensor-parallel group: every rank of it must call it.
    A tied output layer is left out (the embedding carries it).
    """
    group = parallel_state.get_tensor_model_parallel_group()
    size = parallel_state.get_tensor_model_parallel_world_size()
    vocab_size = model.aligner_config.vocab_size
    full = {}
    for local_name, param in model.named_parameters():
        name = _full_name(model, local_name)
        if _is_tied_output(model, name):
            continue
        if _split_dim(model, name) is None:
            full[name] = param.detach().cpu().clone()
            continue
        shards = [torch.empty_like(param) for _ in range(size)]
        dist.all_gather(shards, param.detach().contiguous(), group=group)
        full[name] = _unshard(model, [shard.cpu() for shard in shards], name, vocab_size)
    return full
