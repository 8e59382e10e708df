"""Tensor-, pipeline- and data-parallel runs of the trainer (2 gloo ranks) equal the single-process run.

Same weights (drawn here in the full layout and sharded), same global batches,
three optimizer steps; the loss history and the final full weights must match.
The data-parallel case splits each global batch's micro-batches over the ranks,
so the gradient must be divided by the token count of the whole global batch.
The gradient norm (and so clipping) must count every split weight's shards and
every replicated weight once; at TP=2 this relies on build_model marking split
weights ``tensor_model_parallel`` although they are loaded, not initialized.
Each run also saves a checkpoint from every rank and reloads it into a new trainer.
"""

import pytest
import torch
from distributed import run_distributed
from lm_task import OfflineLoop, TokenSteps, lm_forward_step, make_model

STEPS, GLOBAL_BATCH, MICRO_BATCH = 3, 8, 2
VAL_STEPS = 2
# fp32; sharding re-associates sums (row-parallel all-reduce, split matmuls,
# gradient all-reduce), a few ulps per operation, grown by three optimizer steps.
LOSS_RTOL = 1e-5
WEIGHT_ATOL, WEIGHT_RTOL = 2e-5, 1e-4
# See test_offline_accumulation: keeps Adam's update continuous in near-zero gradients.
ADAM_EPS = 1e-3


def worker(tp: int, pp: int, seed: int, checkpoint_dir: str, tensorboard_dir: str | None = None):
    from megatron.core import parallel_state

    from aligner.config import CheckpointConfig, LoggingConfig, OptimConfig, TrainerConfig
    from aligner.models.sharding import gather_full_state_dict
    from aligner.parallel import initialize

    initialize(tp=tp, pp=pp)
    dp = {"dp_rank": parallel_state.get_data_parallel_rank(), "dp_size": parallel_state.get_data_parallel_world_size()}

    def make_trainer(model_seed: int):
        return OfflineLoop(
            make_model(model_seed),
            lm_forward_step,
            TokenSteps(STEPS, GLOBAL_BATCH, MICRO_BATCH, seed=seed, **dp),
            trainer=TrainerConfig(global_batch_size=GLOBAL_BATCH, micro_batch_size=MICRO_BATCH, val_every=2),
            optim=OptimConfig(lr=1e-2, warmup_steps=1, weight_decay=0.1, adam_eps=ADAM_EPS, clip_grad=0.5),
            checkpoint=CheckpointConfig(dir=checkpoint_dir),
            val_data=TokenSteps(VAL_STEPS, GLOBAL_BATCH, MICRO_BATCH, seed=seed + 1, **dp),
            logging=LoggingConfig(tensorboard_dir=tensorboard_dir),
        )

    trainer = make_trainer(seed)
    summary = trainer.fit()
    weights = gather_full_state_dict(trainer.model)
    # Every rank wrote its part of the final checkpoint; a new trainer (other initial weights) loads it.
    reloaded = make_trainer(seed + 2)
    reloaded_weights = gather_full_state_dict(reloaded.model)
    checkpoint_reloaded = reloaded.step == STEPS and all(
        torch.equal(reloaded_weights[k], w) for k, w in weights.items()
    )
    first_replica = (
        parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_data_parallel_rank() == 0
    )
    return {
        "history": summary.history,
        "val_history": summary.val_history,
        "weights": weights if first_replica else {},
        "checkpoint_reloaded": checkpoint_reloaded,
    }


def _merged_weights(results: list[dict]) -> dict[str, torch.Tensor]:
    weights = {}
    for result in results:
        weights.update(result["weights"])
    return weights


@pytest.fixture(scope="module")
def reference(module_seed, tmp_path_factory):
    tensorboard_dir = tmp_path_factory.mktemp("tb")
    checkpoint_dir = str(tmp_path_factory.mktemp("ckpt"))
    result = run_distributed(worker, 1, args=(1, 1, module_seed, checkpoint_dir, str(tensorboard_dir)))[0]
    result["tensorboard_dir"] = tensorboard_dir
    return result


@pytest.mark.slow
def test_reference_run_validates_and_logs(reference):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # validation at step 2 (val_every) and at the last step, over both validation batches
    assert [h["step"] for h in reference["val_history"]] == [2, 3]
    assert all(h["count"] > 0 and h["loss"] > 0 for h in reference["val_history"])
    (event_file,) = reference["tensorboard_dir"].glob("events.out.tfevents.*")
    events = EventAccumulator(str(event_file))
    events.Reload()
    train_loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert train_loss == [(h["step"], pytest.approx(h["loss"])) for h in reference["history"]]
    assert [e.step for e in events.Scalars("val/loss")] == [2, 3]


@pytest.mark.slow
@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2), (1, 1)], ids=["tp2", "pp2", "dp2"])
def test_parallel_run_matches_single_process(tp, pp, module_seed, reference, tmp_path):
    results = run_distributed(worker, 2, args=(tp, pp, module_seed, str(tmp_path)))
    assert all(result["checkpoint_reloaded"] for result in results)
    # one shard file per writing rank (megatron's torch_dist format names them __<rank>_<n>.distcp)
    files = {p.name for p in (tmp_path / "step_000003").iterdir()}
    assert {"meta.json", "metadata.json", "common.pt"} <= files
    assert {name.split("_")[2] for name in files if name.endswith(".distcp")} == {"0", "1"}
    want = reference["history"]
    for result in results:  # every rank reports the same metrics
        got = result["history"]
        assert [h["step"] for h in got] == [1, 2, 3]
        for key in ("loss", "accuracy", "grad_norm"):
            assert [h[key] for h in got] == pytest.approx([h[key] for h in want], rel=LOSS_RTOL), key
        assert [h["count"] for h in got] == [h["count"] for h in want]
        assert [h["tokens"] for h in got] == [h["tokens"] for h in want]
        for got_val, want_val in zip(result["val_history"], reference["val_history"], strict=True):
            assert got_val["step"] == want_val["step"] and got_val["count"] == want_val["count"]
            assert got_val["loss"] == pytest.approx(want_val["loss"], rel=LOSS_RTOL)
    weights = _merged_weights(results)
    assert weights.keys() == reference["weights"].keys()
    for name, full in reference["weights"].items():
        torch.testing.assert_close(weights[name], full, atol=WEIGHT_ATOL, rtol=WEIGHT_RTOL, msg=name)
