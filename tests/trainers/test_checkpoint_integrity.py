"""Checkpoints that cannot go silently wrong: checksums verified on load, fallback, explicit resume, the folder's lock.

A byte flipped in a saved shard makes resume skip that checkpoint (naming path and
file) and continue from the one before; ``checkpoint.resume_from`` a damaged
checkpoint is an error naming the file; a second run on a folder in use is refused.
"""

import json
import os
import socket

import pytest
from distributed import run_distributed
from lm_task import OfflineLoop, TokenSteps, lm_forward_step, make_model

STEPS, GLOBAL_BATCH, MICRO_BATCH = 4, 4, 2


def loop_worker(seed: int, checkpoint_dir: str, max_steps: int, resume_from: str | None = None):
    """Train to ``max_steps`` (resuming as configured); the resumed step and what the log said."""
    import logging

    from aligner.config import CheckpointConfig, OptimConfig, TrainerConfig
    from aligner.parallel import initialize

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logging.getLogger("aligner").addHandler(Keep())
    logging.getLogger("aligner").setLevel(logging.INFO)
    initialize(seed=seed)
    data = TokenSteps(8, GLOBAL_BATCH, MICRO_BATCH, seed=seed)
    try:
        loop = OfflineLoop(
            make_model(seed),
            lm_forward_step,
            data,
            trainer=TrainerConfig(global_batch_size=GLOBAL_BATCH, micro_batch_size=MICRO_BATCH, max_steps=max_steps),
            optim=OptimConfig(lr=1e-2),
            checkpoint=CheckpointConfig(dir=checkpoint_dir, save_every=2, keep_last=5, resume_from=resume_from),
        )
    except ValueError as error:
        return {"error": f"{type(error).__name__}: {error}", "log": records}
    start = loop.step
    loop.fit()
    return {"start": start, "steps": [h["step"] for h in loop.summary.history], "log": records}


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_a_damaged_checkpoint_is_named_and_skipped(tmp_path, fresh_seed):
    root = tmp_path / "ckpt"
    (first,) = run_distributed(loop_worker, 1, args=(fresh_seed, str(root), STEPS))
    assert first["steps"] == [1, 2, 3, 4] and not (root / "LOCK").exists()
    manifest = json.loads((root / "step_000004" / "manifest.json").read_text())["files"]
    assert any(name.endswith(".distcp") for name in manifest) and "config.yaml" in manifest
    shard = sorted((root / "step_000004").glob("*.distcp"))[0]
    flip_a_byte(shard)

    # An explicit resume_from of the damaged checkpoint is an error naming it and the file.
    (explicit,) = run_distributed(loop_worker, 1, args=(fresh_seed, str(root), 6, str(root / "step_000004")))
    assert explicit["error"].startswith("CorruptCheckpointError") and shard.name in explicit["error"], explicit

    # A plain resume reports it and goes on from step 2.
    (resumed,) = run_distributed(loop_worker, 1, args=(fresh_seed, str(root), 6))
    assert resumed["start"] == 2 and resumed["steps"] == [3, 4, 5, 6], resumed
    warning = next(line for line in resumed["log"] if "damaged checkpoint" in line)
    assert "step_000004" in warning and shard.name in warning and "step_000002" in warning
    assert any(line.startswith("resumed from step 2 of 6") for line in resumed["log"])

    # A truncated file is named as such (resume_from an intact root works too).
    shard6 = sorted((root / "step_000006").glob("*.distcp"))[0]
    shard6.write_bytes(shard6.read_bytes()[:100])
    (truncated,) = run_distributed(loop_worker, 1, args=(fresh_seed, str(root), 6, str(root / "step_000006")))
    assert "truncated" in truncated["error"] and shard6.name in truncated["error"]


@pytest.mark.slow
def test_a_second_writer_is_refused_and_a_stale_lock_taken_over(tmp_path, fresh_seed):
    root = tmp_path / "ckpt"
    root.mkdir()
    # A live owner: this test process.
    (root / "LOCK").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": "now"}))
    (refused,) = run_distributed(loop_worker, 1, args=(fresh_seed, str(root), 2))
    assert "in use by a run on host" in refused["error"] and f"pid {os.getpid()}" in refused["error"]
    # An owner that is gone (a pid no process has).
    (root / "LOCK").write_text(json.dumps({"host": socket.gethostname(), "pid": 2**22 + 7, "since": "then"}))
    (taken,) = run_distributed(loop_worker, 1, args=(fresh_seed, str(root), 2))
    assert taken["steps"] == [1, 2] and any("taking over" in line for line in taken["log"])
    assert not (root / "LOCK").exists()


def test_an_unwritable_or_full_folder_is_an_error_before_step_1(tmp_path):
    from aligner.checkpoint.folder import check_writable
    from aligner.config import ConfigError

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="is not writable"):
        check_writable(blocker / "ckpt", 0)
    with pytest.raises(ConfigError, match="GiB free, but one checkpoint of this run takes about"):
        check_writable(tmp_path / "ckpt", 2**62)
    check_writable(tmp_path / "ckpt", 1)


def test_divergence_guard_names_the_step():
    from aligner.trainers.run import DivergenceGuard

    guard = DivergenceGuard(patience=3, uniform_loss=None)
    for step in (1, 2):
        guard.check(step, {"loss": 1.0, "grad_norm": 0.0})
    guard.check(3, {"loss": 1.0, "grad_norm": 1e-9})  # the streak is broken
    guard.check(4, {"loss": 1.0, "grad_norm": 0.0})
    guard.check(5, {"loss": 1.0, "grad_norm": 0.0})
    with pytest.raises(FloatingPointError, match=r"^step 6: the gradient norm has been exactly 0 for 3 steps"):
        guard.check(6, {"loss": 1.0, "grad_norm": 0.0})

    uniform = DivergenceGuard(patience=2, uniform_loss=4.1588830833596715)  # ln 64
    uniform.check(1, {"loss": 4.17, "grad_norm": 1.0})  # a random initialization: near, not at
    uniform.check(2, {"loss": 4.1588831, "grad_norm": 1.0})
    with pytest.raises(FloatingPointError, match=r"^step 3: the loss has sat at 4.15888 = ln\(vocab_size\)"):
        uniform.check(3, {"loss": 4.1588830, "grad_norm": 1.0})

    off = DivergenceGuard(patience=0, uniform_loss=1.0)
    for step in range(1, 20):
        off.check(step, {"loss": 1.0, "grad_norm": 0.0})
