"""Save and load a training run's full state: weights, optimizer, scheduler, RNG, data position.

Layout of one checkpoint directory (committed atomically, see
:mod:`aligner.checkpoint.layout`)::

    step_000123/
      meta.json                     # step, parallel layout, format; written last
      config.yaml                   # the run's configuration, when given
      model_optim_tp00_pp00.pt      # per model-parallel rank, written by its first data-parallel
                                    # replica: {"model": GPTModel.state_dict(),
                                    #  "optimizer": megatron optimizer.state_dict(),
                                    #  "scheduler": OptimizerParamScheduler.state_dict()}
      rank_00000.pt                 # per global rank: {"rng": ..., "trainer": trainer_state}
      optim_shard_00000.pt          # distributed optimizer only, per global rank: this rank's shard
                                    # of the optimizer (fp32 main weights, torch AdamW state)

Every file is a plain ``torch.save``; a checkpoint resumes only on the same
tensor/pipeline/data-parallel layout (convert between layouts through
:func:`aligner.models.hf.export_hf` / ``import_hf``). megatron-core's
``dist_checkpointing`` would reshard, but its only save strategy
(``torch_dist``) needs ``psutil``, which is not a dependency, and forks writer
processes that hang the job when one of them fails; this layout keeps the
megatron objects' own state dicts, so it is exact. The distributed optimizer's
shard is saved as its inner torch optimizer's state plus its main weights,
rather than through megatron's ``save_parameter_state``: with torch's AdamW
(no Transformer Engine or Apex) megatron-core 0.16's ``load_parameter_state``
fails on AdamW's per-parameter ``step`` (KeyError).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from aligner.checkpoint.layout import commit, latest_checkpoint, step_dir_name, temporary_dir
from aligner.checkpoint.rng import get_rng_state, set_rng_state
from aligner.config import config_to_yaml

FORMAT_VERSION = 1
META = "meta.json"
CONFIG = "config.yaml"


def _layout() -> dict[str, int]:
    return {
        "world_size": dist.get_world_size(),
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "dp": parallel_state.get_data_parallel_world_size(with_context_parallel=True),
    }


def _model_parallel_suffix() -> str:
    tp = parallel_state.get_tensor_model_parallel_rank()
    pp = parallel_state.get_pipeline_model_parallel_rank()
    return f"tp{tp:02d}_pp{pp:02d}"


def _is_first_replica() -> bool:
    return parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0


def _uses_distributed_optimizer(optimizer: MegatronOptimizer) -> bool:
    return bool(optimizer.config.use_distributed_optimizer)


def _write(obj: Any, path: Path) -> None:
    with open(path, "wb") as file:
        torch.save(obj, file)


def save_checkpoint(
    root: str | Path,
    step: int,
    model: GPTModel,
    optimizer: MegatronOptimizer,
    scheduler: OptimizerParamScheduler,
    trainer_state: dict[str, Any],
    *,
    keep_last: int,
    run_config: Any = None,
) -> Path:
    """Write the run's state after ``step`` optimizer steps as ``<root>/step_<step>``; a collective.

    Args:
        root: the checkpoint root (created if missing).
        step: optimizer steps taken.
        model: this rank's (unwrapped) model shard.
        optimizer: megatron optimizer over ``model``.
        scheduler: its learning-rate scheduler.
        trainer_state: this rank's loop state, e.g. ``{"step": 12, "data": sampler.state_dict()}``;
            anything ``torch.save`` writes. Returned by :func:`load_checkpoint`.
        keep_last: checkpoints to keep (older ones are deleted after the commit).
        run_config: the run's configuration (a dataclass), written as ``config.yaml``.

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

    suffix = _model_parallel_suffix()
    if _is_first_replica():
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
        _write(state, tmp_dir / f"model_optim_{suffix}.pt")
    if _uses_distributed_optimizer(optimizer):
        _write(_optimizer_shard(optimizer), tmp_dir / f"optim_shard_{dist.get_rank():05d}.pt")
    _write({"rng": get_rng_state(), "trainer": trainer_state}, tmp_dir / f"rank_{dist.get_rank():05d}.pt")
    dist.barrier()

    final = tmp_dir.parent / step_dir_name(step)
    if dist.get_rank() == 0:
        if run_config is not None:
            (tmp_dir / CONFIG).write_text(config_to_yaml(run_config))
        meta = {
            "format": FORMAT_VERSION,
            "step": step,
            "distributed_optimizer": _uses_distributed_optimizer(optimizer),
            **_layout(),
        }
        (tmp_dir / META).write_text(json.dumps(meta, indent=2) + "\n")
        final = commit(tmp_dir, step, keep_last)
    dist.barrier()
    return final


@torch.no_grad()  # the distributed optimizer copies into views of the (grad-requiring) fp32 weights
def load_checkpoint(
    path: str | Path,
    model: GPTModel,
    optimizer: MegatronOptimizer,
    scheduler: OptimizerParamScheduler,
) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote in ``path``; a collective.

    Loads the weights, the optimizer (and, for the distributed optimizer, this
    rank's shard of it), the scheduler and this rank's RNG states.

    Returns:
        This rank's ``trainer_state``.

    Raises:
        FileNotFoundError: ``path`` is not a complete checkpoint.
        ValueError: it was written with another format, parallel layout or
            optimizer kind.
    """
    path = Path(path)
    if not (path / META).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {META})")
    meta = json.loads((path / META).read_text())
    if meta["format"] != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {meta['format']}, this code reads {FORMAT_VERSION}")
    saved_layout = {key: meta[key] for key in ("world_size", "tp", "pp", "dp")}
    if saved_layout != _layout():
        raise ValueError(
            f"{path} was written with {saved_layout}, this run has {_layout()}; resume with the same layout, "
            "or export it with aligner.models.hf.export_hf and import that into the new layout"
        )
    if meta["distributed_optimizer"] != _uses_distributed_optimizer(optimizer):
        raise ValueError(
            f"{path} was written {'with' if meta['distributed_optimizer'] else 'without'} megatron's distributed "
            "optimizer; this run differs (it is used exactly when a GPU is present)"
        )

    suffix = _model_parallel_suffix()
    state = torch.load(path / f"model_optim_{suffix}.pt", map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if _uses_distributed_optimizer(optimizer):
        shard = torch.load(path / f"optim_shard_{dist.get_rank():05d}.pt", map_location="cpu", weights_only=False)
        _load_optimizer_shard(optimizer, shard)
    scheduler.load_state_dict(state["scheduler"])
    rank_state = torch.load(path / f"rank_{dist.get_rank():05d}.pt", map_location="cpu", weights_only=False)
    set_rng_state(rank_state["rng"])
    return rank_state["trainer"]


@torch.no_grad()
def load_model_weights(path: str | Path, model: GPTModel) -> Path:
    """Load only the weights of a checkpoint into this rank's ``model`` shard (e.g. to start a new run from it).

    Args:
        path: a checkpoint directory (``.../step_000123``) or a checkpoint root,
            whose ``latest`` is used.
        model: a shard with the checkpoint's tensor/pipeline layout.

    Returns:
        The checkpoint directory read.

    Raises:
        FileNotFoundError: no complete checkpoint at ``path``, or none for this
            rank's tensor/pipeline position (another layout).
    """
    path = Path(path)
    if not (path / META).is_file():
        latest = latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"{path} is neither a checkpoint (no {META}) nor a root with a 'latest'")
        path = latest
    shard = path / f"model_optim_{_model_parallel_suffix()}.pt"
    if not shard.is_file():
        raise FileNotFoundError(f"{shard} does not exist: {path} was written with another tensor/pipeline layout")
    model.load_state_dict(torch.load(shard, map_location="cpu", weights_only=False)["model"])
    return path


def _optimizer_shard(optimizer: MegatronOptimizer) -> list[dict[str, Any]]:
    """Per chained distributed optimizer: its torch optimizer's state and its (fp32 main) parameters."""
    return [
        {
            "inner": chained.optimizer.state_dict(),
            "main_params": [p.detach().cpu() for group in chained.optimizer.param_groups for p in group["params"]],
        }
        for chained in optimizer.chained_optimizers
    ]


def _load_optimizer_shard(optimizer: MegatronOptimizer, shard: list[dict[str, Any]]) -> None:
    if len(shard) != len(optimizer.chained_optimizers):
        raise ValueError(
            f"the checkpoint has {len(shard)} optimizer shards, this run {len(optimizer.chained_optimizers)}"
        )
    for chained, state in zip(optimizer.chained_optimizers, shard, strict=True):
        chained.optimizer.load_state_dict(state["inner"])
        params = [p for group in chained.optimizer.param_groups for p in group["params"]]
        for param, saved in zip(params, state["main_params"], strict=True):
            param.copy_(saved)
