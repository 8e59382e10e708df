"""Run megatron-core's GPTModel on a machine without a GPU.

megatron-core assumes CUDA in a handful of places that have nothing to do with
the math: it allocates buffers with ``device=torch.cuda.current_device()`` or
``device="cuda"``, moves small tensors with ``.cuda()``, calls
``torch.cuda.synchronize()``, and keeps its tensor-parallel RNG streams as CUDA
generator states. With those answered on the CPU, the model's own code
(tensor-parallel layers over gloo, the pipeline schedules) runs unchanged.

This is the only place aligner patches megatron-core or torch. The patches are
applied by :func:`enable` (called by :func:`aligner.parallel.initialize`),
only when ``torch.cuda.is_available()`` is False, never on a GPU machine; they
are idempotent and :func:`disable` undoes them. What is patched:

- ``torch.cuda.current_device()`` answers ``"cpu"``;
- ``torch.cuda.synchronize()`` is a no-op;
- a :class:`torch.overrides.TorchFunctionMode` maps every ``"cuda"`` device
  argument of a torch function (``torch.ones(..., device="cuda")``,
  ``x.to("cuda")``) to the CPU and makes ``Tensor.cuda()`` return the tensor
  itself;
- ``CudaRNGStatesTracker.add`` / ``fork`` keep CPU generator states, so the
  tensor-parallel RNG streams (dropout, GPU-side init) work as on a GPU: one
  named stream per purpose, seeded by ``model_parallel_cuda_manual_seed``.

The mode is pushed on the calling thread's torch-function stack; autograd
carries it into backward. Threads started later by other code do not see it.
It routes every torch function through Python: :func:`suspended` lifts it
around hot code that names no ``cuda`` device (the generation engine's loop).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_state: dict[str, Any] = {}  # originals while enabled; empty when disabled


def _is_cuda_device(value: Any) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    return isinstance(value, str) and (value == "cuda" or value.startswith("cuda:"))


def _to_cpu(value: Any) -> Any:
    return "cpu" if _is_cuda_device(value) else value


class _CudaToCpuMode(TorchFunctionMode):
    """Map ``cuda`` device arguments of torch functions to ``cpu``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs:
            kwargs["device"] = _to_cpu(kwargs["device"])
        args = tuple(_to_cpu(a) for a in args)
        return func(*args, **kwargs)


def _rng_add(self, name: str, seed: int) -> None:
    """CPU twin of ``CudaRNGStatesTracker.add``: a named CPU generator state seeded by ``seed``."""
    self._is_initialized = True
    if seed in self.seeds_:
        raise Exception(f"seed {seed} already exists")
    self.seeds_.add(seed)
    if name in self.states_:
        raise Exception(f"cuda rng state {name} already exists")
    self.states_[name] = torch.Generator().manual_seed(seed).get_state()


@contextlib.contextmanager
def _rng_fork(self, name: str | None = None) -> Iterator[None]:
    """CPU twin of ``CudaRNGStatesTracker.fork``: run the body on the named stream
    (default: megatron's model-parallel stream)."""
    if name is None:
        from megatron.core.tensor_parallel.random import _MODEL_PARALLEL_RNG_TRACKER_NAME as name
    if name not in self.states_:
        raise Exception(f"cuda rng state {name} is not added")
    outer_state = torch.get_rng_state()
    torch.set_rng_state(self.states_[name])
    try:
        yield
    finally:
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(outer_state)


def is_enabled() -> bool:
    """Whether the CPU compatibility patches are in place."""
    return bool(_state)


def enable() -> bool:
    """Apply the CPU compatibility patches if no GPU is present.

    Returns True when the patches are active after the call (already enabled, or
    enabled now), False on a machine with a GPU, where nothing is touched.
    Calling it again does nothing.
    """
    if torch.cuda.is_available():
        return False
    if _state:
        return True
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    _state["current_device"] = torch.cuda.current_device
    _state["synchronize"] = torch.cuda.synchronize
    _state["rng_add"] = CudaRNGStatesTracker.add
    _state["rng_fork"] = CudaRNGStatesTracker.fork
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda device=None: None
    CudaRNGStatesTracker.add = _rng_add
    CudaRNGStatesTracker.fork = _rng_fork
    mode = _CudaToCpuMode()
    mode.__enter__()
    _state["mode"] = mode
    return True


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """Run the body without the ``cuda`` -> ``cpu`` torch-function mode; the other patches stay.

    For code that names no ``cuda`` device (``torch.cuda.current_device()`` still
    answers ``"cpu"`` inside) and calls many small torch functions, each of which
    the mode would route through Python. A no-op when the shim is not enabled, or
    when a torch-function mode was pushed after the shim's: that one is innermost,
    so the shim's stays (correct, only slower).
    """
    mode = _state.get("mode")
    depth = torch._C._len_torch_function_stack()
    if mode is None or depth == 0 or torch._C._get_function_stack_at(depth - 1) is not mode:
        yield
        return
    mode.__exit__(None, None, None)
    try:
        yield
    finally:
        mode.__enter__()


def disable() -> None:
    """Undo :func:`enable`; a no-op when the patches are not in place."""
    if not _state:
        return
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    _state["mode"].__exit__(None, None, None)
    torch.cuda.current_device = _state["current_device"]
    torch.cuda.synchronize = _state["synchronize"]
    CudaRNGStatesTracker.add = _state["rng_add"]
    CudaRNGStatesTracker.fork = _state["rng_fork"]
    _state.clear()
