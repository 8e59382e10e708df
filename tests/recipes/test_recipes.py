"""The recipes end to end on the synthetic arithmetic task, with the tiny configs of ``configs/``.

Each run is a fresh spawned process (megatron's groups are created once per
process) with the shipped YAML plus overrides pointing at data written here.
The thresholds are the issue's: SFT cuts validation loss by >= 30%, a pairwise
reward model reaches >= 90% held-out accuracy, DPO > 90% reward accuracy with a
positive and growing margin, a regression reward model ends below half its
starting squared error. Parallel layouts (TP=2, PP=2) reproduce the TP=1 run.
"""

from pathlib import Path

import pytest
import torch
from distributed import run_distributed

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# fp32 on CPU; TP/PP only reorder sums (split matmuls, all-reduces): a few ulps per step,
# amplified by a handful of Adam steps.
PARALLEL_RTOL, PARALLEL_ATOL = 1e-4, 1e-5

pytestmark = pytest.mark.slow


def recipe_worker(recipe: str, config_file: str, overrides: list[str], probe_tokens=None):
    """Run ``aligner.recipes.<recipe>`` in this process; return its histories (and logits of ``probe_tokens``)."""
    from aligner.config import load_config
    from aligner.recipes import get_recipe

    entry = get_recipe(recipe)
    run = entry.run(load_config(entry.config_class, CONFIGS / config_file, overrides))
    result = {"history": run.summary.history, "val": run.summary.val_history}
    if probe_tokens is not None:
        from megatron.core import parallel_state

        model = run.states["policy"].model.eval()
        with torch.no_grad():
            logits = model(probe_tokens, None, None, runtime_gather_output=True)
        if parallel_state.is_pipeline_last_stage():
            result["logits"] = logits[..., : model.aligner_config.vocab_size]
    return result


def data_overrides(demo: Path, kind: str, run: str | None = None) -> list[str]:
    """The demo data of ``kind``, no TensorBoard, and a checkpoint folder of this test's own (never resumed)."""
    return [
        f"checkpoint.dir={demo / 'runs' / (run or kind)}",
        f"data.train={demo / 'data' / kind / 'train.jsonl'}",
        f"data.val={demo / 'data' / kind / 'val.jsonl'}",
        f"data.tokenizer={demo / 'tokenizer'}",
        "logging.tensorboard_dir=null",
        "logging.progress_bar=false",
    ]


@pytest.fixture(scope="module")
def sft_run(demo):
    """The tiny SFT run, exported to Hugging Face format (the start of the DPO/KTO runs)."""
    probe = torch.randint(0, 300, (2, 12))
    (result,) = run_distributed(
        recipe_worker,
        1,
        args=("sft", "sft_tiny.yaml", [*data_overrides(demo, "sft"), f"checkpoint.dir={demo / 'runs' / 'sft'}"], probe),
    )
    return result, probe, demo / "runs" / "sft" / "hf"


def test_sft_lowers_validation_loss_by_30_percent(sft_run):
    result, _, _ = sft_run
    first, last = result["val"][0]["loss"], result["val"][-1]["loss"]
    start = result["history"][0]["loss"]  # before the first update: the untrained model
    assert last <= 0.7 * start, (start, first, last)
    assert all(step["count"] > 0 for step in result["history"])


def test_sft_export_loads_in_transformers_with_the_same_logits(sft_run):
    from transformers import AutoModelForCausalLM

    result, probe, hf_dir = sft_run
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True).eval()
    with torch.no_grad():
        expected = hf_model(probe).logits
    # fp32 both ways; the two implementations order attention/RoPE sums differently.
    torch.testing.assert_close(result["logits"], expected, atol=1e-4, rtol=1e-4)


def test_pairwise_reward_model_reaches_90_percent_held_out_accuracy(demo):
    (result,) = run_distributed(recipe_worker, 1, args=("rm", "rm_tiny.yaml", data_overrides(demo, "preference", "rm")))
    final = result["val"][-1]
    assert final["accuracy"] >= 0.9, final
    assert final["margin"] > 0


def test_regression_reward_model_halves_its_squared_error(demo):
    (result,) = run_distributed(
        recipe_worker, 1, args=("rm", "rm_regression_tiny.yaml", data_overrides(demo, "regression", "rm_regression"))
    )
    start = result["history"][0]["loss"]
    final = result["val"][-1]["loss"]
    assert final < 0.5 * start, (start, final)
    assert {"mse_verbosity", "mse_correctness"} <= set(result["val"][-1])


def test_dpo_raises_reward_accuracy_with_a_growing_margin(sft_run):
    _, _, hf_dir = sft_run
    demo = hf_dir.parents[2]
    (result,) = run_distributed(
        recipe_worker,
        1,
        args=("dpo", "dpo_tiny.yaml", [*data_overrides(demo, "preference", "dpo"), f"model.hf_path={hf_dir}"]),
    )
    margins = [entry["margin"] for entry in result["val"]]
    assert result["val"][-1]["accuracy"] > 0.9, result["val"]
    assert margins[0] > 0 and margins[-1] > margins[0], margins
    # Step 1 starts at the reference: every implicit reward is 0, the loss log(2).
    assert result["history"][0]["loss"] == pytest.approx(0.6931472, abs=1e-5)


def test_kto_separates_desirable_from_undesirable(sft_run):
    _, _, hf_dir = sft_run
    demo = hf_dir.parents[2]
    (result,) = run_distributed(
        recipe_worker,
        1,
        args=("kto", "kto_tiny.yaml", [*data_overrides(demo, "kto", "kto"), f"model.hf_path={hf_dir}"]),
    )
    first, last = result["val"][0], result["val"][-1]
    gap = [entry["desirable_reward"] - entry["undesirable_reward"] for entry in (first, last)]
    assert gap[1] > gap[0] > 0, result["val"]
    assert last["loss"] < result["history"][0]["loss"]


SHORT_RUN = [
    "trainer.max_steps=3",
    "optim.warmup_steps=1",
    "trainer.val_every=0",
    "checkpoint.dir=null",
    "checkpoint.export_hf_at_end=false",
]


# recipe, config, data kind, extra overrides, layouts on 2 processes ([]: data-parallel; for
# DPO also the reference table computed half per replica). The on-the-fly reference (DPO) and
# KTO's reference and KL point run forward-only pipeline schedules before each step. KTO's
# reference point z pools the micro-batches of all data-parallel ranks, so only its tp/pp
# layouts compute the same loss as one process.
MODEL_PARALLEL = (["parallel.tp=2"], ["parallel.pp=2"])
PARALLEL_CASES = {
    "sft": ("sft", "sft_tiny.yaml", "sft", [], (*MODEL_PARALLEL, [])),
    "dpo": ("dpo", "dpo_tiny.yaml", "preference", [], (*MODEL_PARALLEL, [])),
    "dpo-on-the-fly": ("dpo", "dpo_tiny.yaml", "preference", ["dpo.reference=on_the_fly"], MODEL_PARALLEL),
    "kto": ("kto", "kto_tiny.yaml", "kto", [], MODEL_PARALLEL),
}


@pytest.mark.parametrize("case", list(PARALLEL_CASES))
def test_parallel_layouts_match_a_single_process(sft_run, case):
    recipe, config_file, kind, extra, layouts = PARALLEL_CASES[case]
    _, _, hf_dir = sft_run
    demo = hf_dir.parents[2]
    overrides = [*data_overrides(demo, kind), f"model.hf_path={hf_dir}", "model.config=null", *SHORT_RUN, *extra]
    (single,) = run_distributed(recipe_worker, 1, args=(recipe, config_file, overrides))
    want = torch.tensor([step["loss"] for step in single["history"]])
    for layout in layouts:
        for result in run_distributed(recipe_worker, 2, args=(recipe, config_file, [*overrides, *layout])):
            # every rank reports the global metrics
            got = torch.tensor([step["loss"] for step in result["history"]])
            torch.testing.assert_close(got, want, rtol=PARALLEL_RTOL, atol=PARALLEL_ATOL, msg=f"{layout}")
            assert [step["count"] for step in result["history"]] == [step["count"] for step in single["history"]]
