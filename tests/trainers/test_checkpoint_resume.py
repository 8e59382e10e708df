"""Checkpoints: an interrupted and resumed run is bitwise the uninterrupted one; saves are atomic.

Every run is a fresh process (megatron initializes once per process), as a real
restart would be. Dropout is on, so the restored RNG streams matter.
"""

import contextlib
import os
from pathlib import Path

import pytest
import torch
from distributed import run_distributed
from lm_task import Interrupted, OfflineLoop, TokenSteps, lm_forward_step, make_model

STEPS, GLOBAL_BATCH, MICRO_BATCH = 6, 4, 2
CRASH_EXIT_CODE = 17


def _trainer(
    seed: int, checkpoint_dir: str | None, data: TokenSteps, save_every: int, keep_last: int = 3, export_hf=False
):
    from aligner.config import CheckpointConfig, OptimConfig, TrainerConfig

    return OfflineLoop(
        make_model(seed, hidden_dropout=0.1, attention_dropout=0.1),
        lm_forward_step,
        data,
        trainer=TrainerConfig(
            global_batch_size=GLOBAL_BATCH, micro_batch_size=MICRO_BATCH, max_steps=STEPS, val_every=2, val_batches=1
        ),
        optim=OptimConfig(lr=1e-2, warmup_steps=2, min_lr=1e-3, weight_decay=0.1),
        checkpoint=CheckpointConfig(
            dir=checkpoint_dir, save_every=save_every, keep_last=keep_last, export_hf_at_end=export_hf
        ),
        val_data=TokenSteps(2, GLOBAL_BATCH, MICRO_BATCH, seed=data.seed + 1),
    )


def run_worker(seed: int, checkpoint_dir: str | None, fail_at: int | None):
    """Train (resuming from ``checkpoint_dir`` when it has a checkpoint); stop early at ``fail_at``."""
    from aligner.models.sharding import gather_full_state_dict
    from aligner.parallel import initialize

    initialize(seed=seed)
    data = TokenSteps(STEPS, GLOBAL_BATCH, MICRO_BATCH, seed=seed, fail_at=fail_at)
    trainer = _trainer(seed, checkpoint_dir, data, save_every=3)
    start = trainer.step
    with contextlib.suppress(Interrupted):
        trainer.fit()
    return {
        "start": start,
        "history": trainer.summary.history,
        "val_history": trainer.summary.val_history,
        "weights": gather_full_state_dict(trainer.model),
    }


@pytest.mark.slow
def test_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path, fresh_seed):
    (straight,) = run_distributed(run_worker, 1, args=(fresh_seed, None, None))
    checkpoint_dir = str(tmp_path / "ckpt")
    (first,) = run_distributed(run_worker, 1, args=(fresh_seed, checkpoint_dir, 3))
    (second,) = run_distributed(run_worker, 1, args=(fresh_seed, checkpoint_dir, None))

    assert (first["start"], len(first["history"])) == (0, 3)
    assert second["start"] == 3
    assert [h["step"] for h in second["history"]] == [4, 5, 6]
    resumed = first["history"] + second["history"]
    for key in ("loss", "grad_norm", "lr", "accuracy"):
        assert [h[key] for h in resumed] == [h[key] for h in straight["history"]], key
    # Validation (steps 2, 4, 6) sees the same batch every time, interrupted or not.
    assert first["val_history"] + second["val_history"] == straight["val_history"]
    assert [h["step"] for h in straight["val_history"]] == [2, 4, 6]
    assert second["weights"].keys() == straight["weights"].keys()
    for name, want in straight["weights"].items():
        assert torch.equal(second["weights"][name], want), name
    # After 3 steps the weights still differ from the end's: the comparison above is not vacuous.
    name = "decoder.final_layernorm.weight"
    assert not torch.equal(first["weights"][name], straight["weights"][name])


def crash_worker(seed: int, checkpoint_dir: str):
    """Save at steps 2 and 4; die (no cleanup, like a kill) after step 4's shards are written, before its commit."""
    import types

    import aligner.checkpoint.state as state
    from aligner.parallel import initialize

    initialize(seed=seed)
    real = state.dist_checkpointing

    def save_then_die(sharded_state, directory: str) -> None:
        real.save(sharded_state, directory)
        if Path(directory).name.startswith("step_000004"):
            os._exit(CRASH_EXIT_CODE)

    state.dist_checkpointing = types.SimpleNamespace(save=save_then_die, load=real.load)
    _trainer(seed, checkpoint_dir, TokenSteps(STEPS, GLOBAL_BATCH, MICRO_BATCH, seed=seed), save_every=2).fit()


def resume_worker(seed: int, checkpoint_dir: str):
    from aligner.checkpoint import load_model_weights
    from aligner.parallel import initialize

    initialize(seed=seed)
    data = TokenSteps(STEPS, GLOBAL_BATCH, MICRO_BATCH, seed=seed)
    trainer = _trainer(seed, checkpoint_dir, data, save_every=2, keep_last=2, export_hf=True)
    start, position = trainer.step, data.position
    summary = trainer.fit()
    # The weights alone, into a new model, from the root (its latest checkpoint).
    fresh = make_model(seed + 1)
    loaded_from = load_model_weights(checkpoint_dir, fresh)
    weights_equal = all(torch.equal(a, b) for a, b in zip(fresh.parameters(), trainer.model.parameters(), strict=True))
    return {
        "start": start,
        "position": position,
        "steps": [h["step"] for h in summary.history],
        "weights_loaded": (loaded_from.name, weights_equal),
    }


@pytest.mark.slow
def test_crash_mid_save_keeps_the_previous_checkpoint(tmp_path, fresh_seed):
    root = tmp_path / "ckpt"
    with pytest.raises(RuntimeError, match=rf"exited \(codes \[{CRASH_EXIT_CODE}\]\)"):
        run_distributed(crash_worker, 1, args=(fresh_seed, str(root)))

    assert (root / "latest").read_text().strip() == "step_000002"
    (partial,) = [p for p in root.iterdir() if p.name.startswith("step_000004.tmp-")]
    assert list(partial.glob("*.distcp")) and not (partial / "meta.json").exists()
    assert not (root / "step_000004").exists()

    (resumed,) = run_distributed(resume_worker, 1, args=(fresh_seed, str(root)))
    assert (resumed["start"], resumed["position"]) == (2, 2)  # weights and the data position of step 2
    assert resumed["steps"] == [3, 4, 5, 6]
    assert resumed["weights_loaded"] == ("step_000006", True)
    # keep_last=2 after saves at 4 and 6 (the end); the crashed save's leftovers are gone.
    assert sorted(p.name for p in root.iterdir()) == ["hf", "latest", "step_000004", "step_000006"]
    assert (root / "hf" / "config.json").is_file() and (root / "hf" / "model.safetensors").is_file()
    assert (root / "latest").read_text().strip() == "step_000006"
    files = {p.name for p in (root / "step_000006").iterdir()}
    assert {"meta.json", "metadata.json", "common.pt", ".metadata"} <= files
    assert any(name.endswith(".distcp") for name in files)
