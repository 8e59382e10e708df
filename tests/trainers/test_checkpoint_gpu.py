"""Checkpoints of the GPU configuration: megatron's distributed optimizer (fp32 and bf16 weights).

The CPU tests cover the plain optimizer; on a GPU the trainer uses the
distributed optimizer, whose state megatron saves in its ``fully_reshardable``
form (gathered to full tensors, resliced on load). One process on one GPU:
a run interrupted after its step-2 checkpoint resumes with bitwise the same
weights, fp32 main weights and Adam moments, and its remaining steps match an
uninterrupted run. Skipped without a GPU; run with ``pytest tests/cuda
tests/trainers/test_checkpoint_gpu.py`` on a GPU machine.
"""

import contextlib

import pytest
import torch
from distributed import run_distributed
from lm_task import Interrupted, OfflineLoop, TokenSteps, lm_forward_step, make_model, optimizer_shards

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

STEPS, SAVED_AT, GLOBAL_BATCH, MICRO_BATCH = 4, 2, 8, 2
# Same inputs and kernels, but the embedding backward accumulates with atomics,
# so reruns agree to rounding, not bitwise.
LOSS_RTOL = {"float32": 1e-5, "bfloat16": 1e-2}


def worker(dtype: str, seed: int, checkpoint_dir: str | None, fail_at: int | None):
    from aligner.config import CheckpointConfig, OptimConfig, TrainerConfig
    from aligner.models.sharding import gather_full_state_dict
    from aligner.parallel import initialize

    initialize(seed=seed)
    trainer = OfflineLoop(
        make_model(seed, params_dtype=dtype),
        lm_forward_step,
        TokenSteps(STEPS, GLOBAL_BATCH, MICRO_BATCH, seed=seed, fail_at=fail_at),
        trainer=TrainerConfig(
            global_batch_size=GLOBAL_BATCH, micro_batch_size=MICRO_BATCH, max_steps=STEPS, bf16=dtype == "bfloat16"
        ),
        optim=OptimConfig(lr=1e-2, warmup_steps=1, weight_decay=0.1, clip_grad=0.5),
        checkpoint=CheckpointConfig(dir=checkpoint_dir, save_every=SAVED_AT),
    )
    uses_distributed_optimizer = bool(trainer.optimizer.config.use_distributed_optimizer)
    at_start = {"step": trainer.step, "weights": gather_full_state_dict(trainer.model)}
    if trainer.step:
        at_start["optimizer"] = optimizer_shards(trainer.optimizer)
    with contextlib.suppress(Interrupted):
        trainer.fit()
    return {
        "distributed_optimizer": uses_distributed_optimizer,
        "start": at_start,
        "end": {
            "weights": gather_full_state_dict(trainer.model),
            "optimizer": optimizer_shards(trainer.optimizer),
        },
        "history": trainer.summary.history,
    }


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_distributed_optimizer_resume(dtype, tmp_path, fresh_seed):
    (straight,) = run_distributed(worker, 1, args=(dtype, fresh_seed, None, None), gpus=True)
    (first,) = run_distributed(worker, 1, args=(dtype, fresh_seed, str(tmp_path), SAVED_AT), gpus=True)
    (second,) = run_distributed(worker, 1, args=(dtype, fresh_seed, str(tmp_path), None), gpus=True)

    assert first["distributed_optimizer"] and second["distributed_optimizer"]
    assert second["start"]["step"] == SAVED_AT
    for name, tensor in first["end"]["weights"].items():
        assert torch.equal(second["start"]["weights"][name], tensor), name
    saved, loaded = first["end"]["optimizer"], second["start"]["optimizer"]
    assert len(saved) == len(loaded) > 0
    assert all(torch.equal(a, b) for a, b in zip(saved, loaded, strict=True))

    got, want = second["history"], straight["history"][SAVED_AT:]
    assert [h["step"] for h in got] == [3, 4]
    assert [h["loss"] for h in got] == pytest.approx([h["loss"] for h in want], rel=LOSS_RTOL[dtype])
