"""Process groups and seeds for a torchrun job, through megatron-core's ``parallel_state``.

One call per process, after torchrun has set ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``::

    initialize(tp=2, pp=2)   # world = data x context x pipeline x tensor
    ...
    destroy()

A plain ``python script.py`` (no torchrun variables) is a world of one.
"""

from __future__ import annotations

import datetime
import os
import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from aligner.parallel import megatron_cpu

# Megatron-LM offsets the seed of each pipeline stage so that stages that build
# different layers do not draw the same initial weights.
_PIPELINE_SEED_STRIDE = 100


def initialize(
    tp: int = 1,
    pp: int = 1,
    cp: int = 1,
    seed: int = 1234,
    backend: str | None = None,
    timeout_minutes: int = 30,
) -> None:
    """Create the default process group and megatron-core's model-parallel groups, then seed.

    Args:
        tp: tensor-parallel size.
        pp: pipeline-parallel size.
        cp: context-parallel size. The data-parallel size is
            ``world_size // (tp * pp * cp)``.
        seed: base seed. Python, NumPy and torch get ``seed + 100 * pp_rank``;
            megatron's tensor-parallel RNG streams are seeded from the same value
            by ``model_parallel_cuda_manual_seed`` (which adds the TP rank).
        backend: ``"nccl"`` or ``"gloo"``; default NCCL when a GPU is present,
            gloo otherwise. On a machine without a GPU,
            :func:`aligner.parallel.megatron_cpu.enable` is called first so that
            megatron-core runs on the CPU.
        timeout_minutes: collective timeout for every group.

    Raises:
        ValueError: if a size is < 1 or ``tp * pp * cp`` does not divide the world
            size, or if an existing default process group has another world size.
    """
    for name, size in (("tp", tp), ("pp", pp), ("cp", cp)):
        if size < 1:
            raise ValueError(f"{name} must be >= 1, got {size}")
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    model_parallel = tp * pp * cp
    if world_size % model_parallel:
        raise ValueError(
            f"world size {world_size} is not divisible by tp*pp*cp = {tp}*{pp}*{cp} = {model_parallel}; "
            "launch a multiple of that many processes (torchrun --nproc-per-node ...)"
        )
    on_gpu = torch.cuda.is_available()
    if backend is None:
        backend = "nccl" if on_gpu else "gloo"
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        megatron_cpu.enable()

    timeout = datetime.timedelta(minutes=timeout_minutes)
    if dist.is_initialized():
        if dist.get_world_size() != world_size:
            raise ValueError(
                f"a process group of size {dist.get_world_size()} exists but WORLD_SIZE is {world_size}; "
                "call destroy() first"
            )
    elif "MASTER_ADDR" in os.environ:
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
    elif world_size == 1:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    else:
        raise ValueError(f"WORLD_SIZE={world_size} but MASTER_ADDR is not set; launch with torchrun")

    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        distributed_timeout_minutes=timeout_minutes,
    )
    stage_seed = seed + _PIPELINE_SEED_STRIDE * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    model_parallel_cuda_manual_seed(stage_seed)


def gather_over_data_parallel(obj: Any) -> list[Any]:
    """Every data-parallel rank's ``obj`` (picklable; tensors best on the CPU), in rank order; a collective.

    ``[obj]`` without a data-parallel group of more than one rank (no communication).
    """
    from megatron.core import parallel_state

    size = parallel_state.get_data_parallel_world_size()
    if size == 1:
        return [obj]
    shares: list[Any] = [None] * size
    dist.all_gather_object(shares, obj, group=parallel_state.get_data_parallel_group())
    return shares


def destroy() -> None:
    """Tear down megatron-core's groups and the default process group; undo the CPU shim.

    Safe to call when nothing is initialized. It ends the job's distributed
    life: torch does not reliably re-create gloo groups in a process whose
    groups were destroyed, so initialize once per process.
    """
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    megatron_cpu.disable()
