"""Moving what idles off the GPU between the phases of an online step, so that several roles fit on one GPU.

    with gpu_resident(reference, enabled=offload_frozen):        # on the GPU only for its pass
        ref_logprobs = ...
    with optimizer_off_gpu(state, enabled=offload_optimizer):    # off the GPU while the engine generates
        rollouts = engine.generate(...)

A frozen model (the reference, a reward model) needs its weights only for its
forward passes: ``2 * N`` bytes for ``N`` bf16 parameters of this rank's shard
(an 8B model at TP 4: ~4 GiB per GPU). A trained model's optimizer needs its state
only in the optimizer step: with bf16 training, megatron's fp32 main weights and
Adam's two moments are ``12 * N`` bytes (sharded over the data-parallel ranks with
the distributed optimizer), and the DDP gradient buffer ``4 * N`` more; none of it is
read while the engine generates (an 8B actor at TP 4, DP 2: ~12 GiB of optimizer
state and ~8 GiB of gradients per GPU that the KV cache can use instead).
NeMo-Aligner offloads the same two things. Gradient buffers are freed and re-created
with megatron-core's ``offload_grad_buffers`` / ``restore_grad_buffers``; optimizer
state moves as megatron-core's ``offload_to_cpu`` moves it (but never the model's own
parameters, which the engine reads); frozen modules move with ``Module.to``.

Every function is a no-op for a model that is not on a CUDA device (the CPU runs and
tests), and each returns or logs the bytes it moved.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch

from aligner.trainers.state import TrainState


def cuda_bytes(module: torch.nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers that live on a CUDA device."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors if t.is_cuda)


def _inner_optimizers(state: TrainState) -> list[torch.optim.Optimizer]:
    chained = getattr(state.optimizer, "chained_optimizers", [state.optimizer])
    return [inner.optimizer for inner in chained if getattr(inner, "optimizer", None) is not None]


def _on_cuda(module: torch.nn.Module) -> bool:
    return any(p.is_cuda for p in module.parameters())


@contextmanager
def gpu_resident(modules: torch.nn.Module | Iterable[torch.nn.Module], *, enabled: bool) -> Iterator[int]:
    """Hold frozen ``modules`` on the GPU inside the block and on the CPU outside it; yields the bytes moved.

    Call :func:`offload_frozen` once after building them; each block then brings them back
    for its passes and moves them off again at its end (also when the block raises).
    """
    modules = [modules] if isinstance(modules, torch.nn.Module) else list(modules)
    moved = 0
    if enabled and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
        for module in modules:
            if not _on_cuda(module) and any(True for _ in module.parameters()):
                module.to(device)
                moved += cuda_bytes(module)
    try:
        yield moved
    finally:
        if moved:
            offload_frozen(modules)


def offload_frozen(modules: Iterable[torch.nn.Module]) -> int:
    """Move frozen modules that are on the GPU to the CPU; returns the bytes freed on the GPU."""
    freed = 0
    for module in modules:
        if _on_cuda(module):
            freed += cuda_bytes(module)
            module.to("cpu")
    if freed:
        torch.cuda.empty_cache()
    return freed


@contextmanager
def optimizer_off_gpu(states: TrainState | Iterable[TrainState], *, enabled: bool) -> Iterator[int]:
    """Move the optimizer state and the gradient buffers of ``states`` off the GPU inside the block; yields bytes.

    The block must not step the optimizers nor run backward passes (it is for generation
    and scoring); at its end the state comes back and the gradient buffers are re-created
    (zeroed: they hold nothing between steps). The optimizer's own parameters move too
    when they are separate fp32 main weights (bf16 training, the distributed optimizer), as
    megatron-core's ``offload_to_cpu`` does; never when they are the model's parameters
    (fp32 training without the distributed optimizer), which the engine reads.
    """
    states = [states] if isinstance(states, TrainState) else list(states)
    states = [state for state in states if enabled and _on_cuda(state.model)]
    moved: list[tuple[TrainState, list[tuple[object, object]]]] = []
    freed = 0
    try:
        for state in states:
            freed += _grad_buffer_bytes(state)
            state.ddp_model.offload_grad_buffers()
            slots = optimizer_slots(state, "cuda")
            for holder, key in slots:
                tensor = _get(holder, key)
                freed += tensor.numel() * tensor.element_size()
                _set(holder, key, tensor.to("cpu", non_blocking=True))
            moved.append((state, slots))
        if moved:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        yield freed
    finally:
        device = torch.device("cuda", torch.cuda.current_device()) if moved else None
        for state, slots in moved:
            for holder, key in slots:
                _set(holder, key, _get(holder, key).to(device, non_blocking=True))
            state.ddp_model.restore_grad_buffers()


def optimizer_slots(state: TrainState, device_type: str) -> list[tuple[object, object]]:
    """Where the optimizers keep tensors on ``device_type`` that the engine never reads: (holder, key) pairs.

    Every tensor of the optimizer state (Adam's moments) is one, and every main parameter
    (its ``.data``) unless it is one of the model's own parameters.
    """
    model_params = {id(p) for p in state.model.parameters()}
    slots: list[tuple[object, object]] = []
    for optimizer in _inner_optimizers(state):
        for group in optimizer.param_groups:
            own = [p for p in group["params"] if p.device.type == device_type and id(p) not in model_params]
            slots += [(p, "data") for p in own]
        for values in optimizer.state.values():
            slots += [
                (values, key)
                for key, value in values.items()
                if torch.is_tensor(value) and value.device.type == device_type and value.dim() > 0
            ]
    return slots


def _get(holder, key):
    return holder.data if key == "data" and torch.is_tensor(holder) else holder[key]


def _set(holder, key, value) -> None:
    if key == "data" and torch.is_tensor(holder):
        holder.data = value
    else:
        holder[key] = value


def _grad_buffer_bytes(state: TrainState) -> int:
    buffers = getattr(state.ddp_model, "buffers", [])  # megatron DDP's param-and-grad buffers (not Module.buffers)
    if callable(buffers):
        return 0
    return sum(b.grad_data.numel() * b.grad_data.element_size() for b in buffers if b.grad_data is not None)
