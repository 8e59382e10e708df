"""Save and load a training run's full state: its named train states, the run's state and RNG.

A checkpoint is a megatron-core distributed checkpoint (``dist_checkpointing``,
``torch_dist`` format: every tensor stored once, as a slice of its full,
unsharded shape) plus two files of ours; it is committed atomically (see
:mod:`aligner.checkpoint.layout`)::

    step_000123/
      meta.json                     # step, the states' names, the writer's parallel layout, format; written last
      config.yaml                   # the run's configuration, when given
      metadata.json, common.pt,     # megatron-core: format, the non-tensor state (schedulers, the run's
      .metadata, __*_*.distcp       #   state, optimizer hyper-parameters), tensor shards

The sharded state holds, for each named train state (``{"policy": state}``;
PPO: ``{"actor": ..., "critic": ...}``), its model, optimizer and scheduler, plus
``run`` and ``rng``:

- ``<name>.model``: ``GPTModel.sharded_state_dict(prefix="<name>.")``; each rank writes its
  slice of every weight.
- ``<name>.optimizer``: megatron's ``sharded_state_dict`` of its optimizer; Adam moments are
  sliced like their weights. The distributed optimizer (GPU) is saved as
  ``fully_reshardable``, a canonical per-weight state.
- ``<name>.scheduler`` and ``run`` (the run's step, data position and whatever the
  recipe registered): common to all ranks, written by rank 0.
- ``rng``: one object per rank (Python, NumPy, torch, CUDA, megatron tracker streams).

So a checkpoint loads into any tensor/pipeline/data-parallel layout: weights and
optimizer state are resliced by megatron-core. Resuming on the layout that wrote it
also restores every rank's RNG streams and is bitwise exact; on another layout the
random streams cannot correspond (dropout masks are drawn per rank), so they keep
the new run's seed, and a warning says so. Frozen models (a DPO reference) are not
saved: a recipe rebuilds them from the run's initial weights.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer import MegatronOptimizer

from aligner.checkpoint.integrity import verify_checkpoint, write_manifest
from aligner.checkpoint.layout import commit, latest_checkpoint, step_dir_name, temporary_dir
from aligner.checkpoint.rng import get_rng_state, set_rng_state
from aligner.config import config_to_yaml

FORMAT_VERSION = 3
META = "meta.json"
CONFIG = "config.yaml"
# megatron's options for the optimizer's sharded state: the distributed optimizer's
# state in a layout-independent form; no prefix for a single chained optimizer.
_OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}

logger = logging.getLogger(__name__)


def _layout() -> dict[str, int]:
    return {
        "world_size": dist.get_world_size(),
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "dp": parallel_state.get_data_parallel_world_size(with_context_parallel=True),
    }


def _uses_distributed_optimizer(optimizer: MegatronOptimizer) -> bool:
    return bool(optimizer.config.use_distributed_optimizer)


# The key of the per-rank state (e.g. an engine's sampling stream) inside each rank's RNG object.
RANK_STATE = "rank_state"


def _rng_object(state: Any) -> ShardedObject:
    """This rank's RNG state as one entry of a ``[world_size]`` array of objects (every rank writes its own)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    return ShardedObject("rng_state", state, (world,), (rank,), replica_id=0)


@torch.no_grad()
def _allocate_distributed_optimizer_state(optimizer: MegatronOptimizer) -> None:
    """Give a distributed optimizer that has not stepped yet its Adam state (zeros, step 0).

    Without Transformer Engine or Apex, megatron-core 0.16's
    ``DistributedOptimizer.state_dict()`` (which its ``sharded_state_dict`` calls,
    also to load) reads every parameter's ``step`` and fails on a fresh optimizer;
    the values written here are overwritten by the load.
    """
    if not _uses_distributed_optimizer(optimizer):
        return
    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = chained.optimizer
        if len(inner.state):
            continue
        for group in inner.param_groups:
            for param in group["params"]:
                inner.state[param] = {
                    "step": torch.tensor(0.0),
                    "exp_avg": torch.zeros_like(param),
                    "exp_avg_sq": torch.zeros_like(param),
                }


def _sharded_state(
    states: Mapping[str, Any],
    run_state: Any,
    *,
    with_optimizer: bool,
    with_rng: bool,
    is_loading: bool,
    rank_state: dict[str, Any] | None = None,
) -> dict[str, Any]:
    sharded: dict[str, Any] = {}
    for name, state in states.items():
        model_state = state.model.sharded_state_dict(prefix=f"{name}.")
        entry: dict[str, Any] = {"model": model_state}
        if with_optimizer:
            _allocate_distributed_optimizer_state(state.optimizer)
            entry["optimizer"] = state.optimizer.sharded_state_dict(
                model_state, is_loading=is_loading, metadata=_OPTIMIZER_METADATA
            )
            entry["scheduler"] = state.scheduler.state_dict()
        sharded[name] = entry
    if run_state is not None:
        sharded["run"] = run_state
    if with_rng:
        sharded["rng"] = _rng_object(None if is_loading else {**get_rng_state(), RANK_STATE: rank_state or {}})
    return sharded


def save_checkpoint(
    root: str | Path,
    step: int,
    states: Mapping[str, Any],
    run_state: dict[str, Any],
    *,
    keep_last: int,
    run_config: Any = None,
    rank_state: dict[str, Any] | None = None,
) -> Path:
    """Write the run's state after ``step`` steps as ``<root>/step_<step>``; a collective.

    Args:
        root: the checkpoint root (created if missing).
        step: the run's steps taken.
        states: the trained models by name, each with ``model`` (this rank's
            unwrapped shard), ``optimizer`` and ``scheduler`` (a
            :class:`~aligner.trainers.state.TrainState`).
        run_state: the run's state, the same on every rank (rank 0's is written),
            e.g. ``{"step": 12, "data": sampler.state_dict()}``; returned by :func:`load_checkpoint`.
        keep_last: checkpoints to keep (older ones are deleted after the commit).
        run_config: the run's configuration (a dataclass), written as ``config.yaml``.
        rank_state: this rank's own state (it differs between ranks, e.g. a data-parallel
            replica's random stream), written beside its RNG states; returned by
            :func:`load_checkpoint` as ``run_state["rank_state"]`` at the same layout.

    Returns:
        The committed checkpoint directory (same path on every rank).
    """
    root = Path(root)
    names: list[Any] = [None]
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        tmp_dir = temporary_dir(root, step, str(os.getpid()))
        tmp_dir.mkdir()
        names = [str(tmp_dir)]
    dist.broadcast_object_list(names, src=0)
    tmp_dir = Path(names[0])

    sharded = _sharded_state(
        states, run_state, with_optimizer=True, with_rng=True, is_loading=False, rank_state=rank_state
    )
    try:
        dist_checkpointing.save(sharded, str(tmp_dir))  # a collective; returns when every rank's shards are written
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(error.errno, f"no space left writing the checkpoint of step {step} to {tmp_dir}") from error
        raise

    final = tmp_dir.parent / step_dir_name(step)
    if dist.get_rank() == 0:
        if run_config is not None:
            (tmp_dir / CONFIG).write_text(config_to_yaml(run_config))
        meta: dict[str, Any] = {
            "format": FORMAT_VERSION,
            "step": step,
            "states": {
                name: {
                    "distributed_optimizer": _uses_distributed_optimizer(state.optimizer),
                    "value_outputs": state.model.aligner_num_value_outputs,
                }
                for name, state in states.items()
            },
            **_layout(),
        }
    write_manifest(tmp_dir)  # a collective: the ranks share the hashing
    if dist.get_rank() == 0:
        (tmp_dir / META).write_text(json.dumps(meta, indent=2) + "\n")
        final = commit(tmp_dir, step, keep_last)
    dist.barrier()
    return final


def _read_meta(path: Path) -> dict[str, Any]:
    if not (path / META).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {META})")
    meta = json.loads((path / META).read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: checkpoint format {meta.get('format')}, this code reads {FORMAT_VERSION} "
            "(format 3 holds named train states; older checkpoints cannot be resumed by this version)"
        )
    return meta


@torch.no_grad()  # the distributed optimizer copies into views of the (grad-requiring) fp32 weights
def load_checkpoint(path: str | Path, states: Mapping[str, Any]) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote in ``path`` into this run's layout; a collective.

    Loads each named state's weights and optimizer state (resliced for this
    rank's tensor/pipeline/data-parallel position) and its scheduler, and, when
    this run has the layout that wrote the checkpoint, every rank's RNG states.

    Returns:
        The ``run_state`` that was saved, with this rank's ``rank_state`` under ``"rank_state"``
        (``{}`` when the layout differs: ranks do not map to ranks then).

    Raises:
        FileNotFoundError: ``path`` is not a complete checkpoint.
        ValueError: it was written in another format, or holds other states than ``states``.
        megatron.core.dist_checkpointing.core.CheckpointingException: a model or
            optimizer does not match the checkpoint (other shapes or parameters).
    """
    path = Path(path)
    meta = _read_meta(path)
    verify_checkpoint(path)
    if sorted(meta["states"]) != sorted(states):
        raise ValueError(f"{path} holds the train states {sorted(meta['states'])}, this run has {sorted(states)}")
    saved_layout = {key: meta[key] for key in ("world_size", "tp", "pp", "dp")}
    same_layout = saved_layout == _layout()
    if not same_layout and dist.get_rank() == 0:
        logger.warning(
            "%s was written with %s, this run has %s: weights and optimizer state are resliced; the random "
            "streams (dropout) start from this run's seed, so the run is not bitwise the one that was saved",
            path,
            saved_layout,
            _layout(),
        )
    template = _sharded_state(states, {}, with_optimizer=True, with_rng=same_layout, is_loading=True)
    loaded = dist_checkpointing.load(template, str(path))
    for name, state in states.items():
        state.model.load_state_dict(_without_prefix(loaded[name]["model"], name))
        _load_optimizer(state.optimizer, loaded[name]["optimizer"])
        state.scheduler.load_state_dict(loaded[name]["scheduler"])
    run_state = dict(loaded["run"])
    run_state[RANK_STATE] = {}
    if same_layout:
        set_rng_state(loaded["rng"])
        run_state[RANK_STATE] = loaded["rng"].get(RANK_STATE, {})
    return run_state


def _without_prefix(model_state: dict[str, Any], name: str) -> dict[str, Any]:
    """A loaded ``<name>.``-prefixed model state dict with the keys ``load_state_dict`` expects."""
    prefix = f"{name}."
    return {key[len(prefix) :] if key.startswith(prefix) else key: value for key, value in model_state.items()}


def _load_optimizer(optimizer: MegatronOptimizer, state: Any) -> None:
    """``optimizer.load_state_dict(state)``, working around megatron-core 0.16 for the distributed optimizer.

    Without Transformer Engine or Apex its inner optimizer is torch's AdamW,
    whose per-parameter state has a ``step`` that the checkpoint stores per
    parameter group instead, and ``load_parameter_state_from_fully_reshardable``
    then fails on it (KeyError). So the loader is called in two parts: the
    optimizer's own state (hyper-parameters, step), then the parameter state,
    with ``step`` set aside while the tensors are copied in. megatron also hands
    every parameter the same ``step`` tensor, which AdamW increments in place
    once per parameter; each gets its own copy back.
    """
    if not _uses_distributed_optimizer(optimizer):
        optimizer.load_state_dict(state)
        return
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    per_optimizer = [state] if len(chained) == 1 else [state[key] for key in sorted(state)]
    param_states = []
    for entry in per_optimizer:
        if entry.pop("param_state_sharding_type") != _OPTIMIZER_METADATA["distrib_optim_sharding_type"]:
            raise ValueError("the checkpoint's distributed optimizer state is not in the fully_reshardable format")
        param_states.append(entry.pop("param_state"))
    optimizer.load_state_dict(state)  # without "param_state": allocates the state, sets the step
    for distributed, param_state in zip(chained, param_states, strict=True):
        inner = distributed.optimizer.state
        steps = {param: entry.pop("step") for param, entry in inner.items() if "step" in entry}
        try:
            distributed.load_parameter_state_from_fully_reshardable(param_state)
        finally:
            for param, step in steps.items():
                inner[param]["step"] = step.clone()


@torch.no_grad()
def load_model_weights(path: str | Path, model: GPTModel, state_name: str | None = None) -> Path:
    """Load only the weights of one train state of a checkpoint into this rank's ``model`` shard (any layout).

    A collective.

    Args:
        path: a checkpoint directory (``.../step_000123``) or a checkpoint root,
            whose ``latest`` is used.
        model: this rank's shard of a model of the state's architecture.
        state_name: the train state to read (``policy``, ``critic``, ...); None:
            the checkpoint's only state.

    Returns:
        The checkpoint directory read.

    Raises:
        FileNotFoundError: no complete checkpoint at ``path``.
        ValueError: ``state_name`` is not in the checkpoint, or None while it holds several.
    """
    path = Path(path)
    if not (path / META).is_file():
        latest = latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"{path} is neither a checkpoint (no {META}) nor a root with a 'latest'")
        path = latest
    names = sorted(_read_meta(path)["states"])
    verify_checkpoint(path)
    if state_name is None:
        if len(names) != 1:
            raise ValueError(f"{path} holds the train states {names}: name the one to load")
        state_name = names[0]
    if state_name not in names:
        raise ValueError(f"{path} has no train state {state_name!r} (it holds {names})")
    holder = _ModelOnly(model)
    template = _sharded_state({state_name: holder}, None, with_optimizer=False, with_rng=False, is_loading=True)
    loaded = dist_checkpointing.load(template, str(path))
    model.load_state_dict(_without_prefix(loaded[state_name]["model"], state_name))
    return path


class _ModelOnly:
    """A train state without optimizer, for reading weights alone."""

    def __init__(self, model: GPTModel) -> None:
        self.model = model
