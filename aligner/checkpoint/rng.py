"""Every random-number stream a training process draws from, captured and restored.

A resumed run draws the same dropout masks and shuffles as an uninterrupted
one only if each of these is restored on each rank: Python's ``random``,
NumPy's global generator, torch's CPU generator, torch's CUDA generator (on a
GPU) and megatron-core's tensor-parallel RNG tracker (its named streams are
CUDA generator states on a GPU, CPU generator states under
:mod:`aligner.parallel.megatron_cpu`; the tracker API is the same).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from megatron.core.tensor_parallel import get_cuda_rng_tracker


def get_rng_state() -> dict[str, Any]:
    """This process's RNG states, as a dict ``torch.save`` can write."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "megatron_tracker": {name: s.clone() for name, s in get_cuda_rng_tracker().get_states().items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` captured.

    Raises:
        ValueError: the state was captured on a GPU and this process has none, or
            the other way round.
    """
    if ("cuda" in state) != torch.cuda.is_available():
        where = "with" if "cuda" in state else "without"
        raise ValueError(f"the RNG state was saved {where} a GPU; resume on the same kind of machine")
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states({name: s.clone() for name, s in state["megatron_tracker"].items()})
