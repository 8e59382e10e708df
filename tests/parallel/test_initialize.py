"""Process groups and seeds from initialize(); destroy() leaves a clean slate for the next initialize()."""

import os
import subprocess
import sys

import pytest
import torch
from distributed import run_distributed

from aligner.parallel import initialize


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ({"tp": 0}, "tp must be >= 1"),
        ({"tp": 3}, "not divisible by tp\\*pp\\*cp"),
        ({"tp": 2, "pp": 2}, "not divisible by tp\\*pp\\*cp"),
    ],
)
def test_rejects_sizes_that_do_not_fit_the_world(sizes, message, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=message):
        initialize(**sizes)


def worker():
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from aligner.parallel import destroy, gather_over_data_parallel, megatron_cpu

    initialize(pp=2, seed=42)
    default_draw = torch.rand(3)
    with get_cuda_rng_tracker().fork():
        model_parallel_draw = torch.rand(3)
    seen = {
        "ranks": (
            parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_pipeline_model_parallel_rank(),
            parallel_state.get_data_parallel_world_size(),
        ),
        "shim": megatron_cpu.is_enabled(),
        "default_draw": default_draw,
        "after_fork_draw": torch.rand(3),
        "model_parallel_draw": model_parallel_draw,
        # each pipeline stage is a data-parallel group of one: its own object only
        "gathered": gather_over_data_parallel({"stage": parallel_state.get_pipeline_model_parallel_rank()}),
    }
    destroy()
    seen["clean"] = not torch.distributed.is_initialized() and not megatron_cpu.is_enabled()
    return seen


@pytest.mark.slow
def test_groups_and_seeds_per_rank():
    results = run_distributed(worker, 2)
    assert [r["ranks"] for r in results] == [(0, 0, 1), (0, 1, 1)]
    assert all(r["shim"] and r["clean"] for r in results)  # workers see no GPU
    assert [r["gathered"] for r in results] == [[{"stage": 0}], [{"stage": 1}]]
    for stage, seen in enumerate(results):
        # Pipeline stages build different layers, so each draws from seed + 100 * stage.
        torch.manual_seed(42 + 100 * stage)
        assert torch.equal(seen["default_draw"], torch.rand(3))
        # Forking megatron's model-parallel stream leaves the default stream where it was.
        assert torch.equal(seen["after_fork_draw"], torch.rand(3))
        assert not torch.equal(seen["model_parallel_draw"], seen["after_fork_draw"])


PLAIN_SCRIPT = """
import torch
from aligner.models.config import ModelConfig
from aligner.models.gpt import build_model
from aligner.parallel import destroy, gather_over_data_parallel, initialize

initialize()
assert gather_over_data_parallel({"rank": 0}) == [{"rank": 0}]
model = build_model(ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, vocab_size=50))
model(torch.randint(0, 50, (2, 5)), None, None).sum().backward()
destroy()
print("ok")
"""


@pytest.mark.slow
def test_plain_python_is_a_world_of_one():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    done = subprocess.run([sys.executable, "-c", PLAIN_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
