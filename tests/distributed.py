"""Run a function on N local processes, as torchrun would, and collect what each returns.

    results = run_distributed(worker, world_size=2, args=(path,))

``worker`` must be a module-level function (it is pickled by reference into
freshly spawned interpreters). Each process gets ``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR`` and a free ``MASTER_PORT`` in its environment,
one CPU thread per process and no visible GPU (unless ``gpus=True``), and
returns a value that ``torch.save`` can write.
An exception on any rank is re-raised here with that rank's traceback; a
process that neither returns nor fails within ``timeout_s`` is killed and the
call fails, naming the ranks that hung.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _child(fn: Callable, rank: int, world_size: int, port: int, args: tuple, results: mp.Queue) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    try:
        buffer = io.BytesIO()
        torch.save(fn(*args), buffer)
        results.put((rank, True, buffer.getvalue()))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def run_distributed(
    fn: Callable, world_size: int, args: tuple = (), timeout_s: float = 600.0, gpus: bool = False
) -> list[Any]:
    """``[fn(*args) on rank 0, ..., on rank world_size - 1]``, each in its own spawned process.

    ``timeout_s`` catches a hang, not a slow run: the longest cases (the online learning runs, ~150 s
    alone) run beside another test worker's processes under ``make test`` (``pytest -n 2``).
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_child, args=(fn, rank, world_size, port, args, results)) for rank in range(world_size)]
    # The workers test the CPU path (gloo, megatron_cpu) on any machine: hide GPUs
    # from them. Spawned children copy the environment when they start.
    # (gpus=True: the GPU code path, for tests/cuda-style checks on a GPU machine.)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        for proc in procs:
            proc.start()
    finally:
        if visible is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible
    outputs: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(outputs) < world_size:
            try:
                rank, ok, payload = results.get(timeout=max(0.1, min(1.0, deadline - time.monotonic())))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in outputs and p.exitcode is not None]
                if dead:
                    raise RuntimeError(
                        f"rank(s) {dead} exited (codes {[procs[r].exitcode for r in dead]}) without a result"
                    ) from None
                if time.monotonic() > deadline:
                    hung = sorted(set(range(world_size)) - set(outputs))
                    raise TimeoutError(f"rank(s) {hung} did not finish within {timeout_s:.0f} s") from None
                continue
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{payload}")
            outputs[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return [outputs[rank] for rank in range(world_size)]
