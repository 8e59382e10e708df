"""The online recipes (GRPO family, REINFORCE / RLOO) end to end on CPU, with the tiny configs of ``configs/``.

Every run starts from one SFT model of the demo task (exported to Hugging Face
format, so every layout loads the same weights). Mechanics runs are rewarded by
``online_rewards:digit_share`` (the samples of a prompt differ in it, so every
group has reward spread and every step a gradient); learning runs by the
exact-answer checker. Each run is a fresh spawned process
(megatron's groups are created once per process).
"""

import shutil
from pathlib import Path

import pytest
import torch
from distributed import run_distributed

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# fp32 on CPU; TP/PP only reorder sums (split matmuls, all-reduces): a few ulps per step,
# amplified by a couple of Adam steps (as the offline recipes' layout tests).
PARALLEL_RTOL, PARALLEL_ATOL = 1e-4, 1e-5
# Engine and trainer run the same fp32 model on the same tokens; they differ only in how the
# sums are ordered (KV-cached decode vs one full forward): ~1e-6 in a log-prob.
MISMATCH_TOL = 1e-3

pytestmark = pytest.mark.slow

SPREAD_REWARD = ["reward.terms=[{function: 'online_rewards:digit_share'}]"]
CONFIG_FILES = {"grpo": "grpo_tiny.yaml", "reinforce": "reinforce_tiny.yaml"}
# The KL to the reference: a term of GRPO's loss, a penalty in REINFORCE's reward.
KL_METRIC = {"grpo": "kl", "reinforce": "kl_in_reward"}


def online_worker(recipe: str, overrides: list[str]):
    """Run ``aligner.recipes.<recipe>`` in this process; its histories and the policy's full weights."""
    from aligner.config import load_config
    from aligner.models.sharding import gather_full_state_dict
    from aligner.recipes import get_recipe

    entry = get_recipe(recipe)
    run = entry.run(load_config(entry.config_class, CONFIGS / CONFIG_FILES[recipe], overrides))
    return {
        "history": run.summary.history,
        "val": run.summary.val_history,
        "weights": gather_full_state_dict(run.states["policy"].model),
    }


def data_overrides(demo: Path, run_dir: Path, *, val: bool = False) -> list[str]:
    return [
        f"data.train={demo / 'data' / 'rl_prompt' / 'train.jsonl'}",
        f"data.val={demo / 'data' / 'rl_prompt' / 'val.jsonl'}" if val else "data.val=null",
        f"data.tokenizer={demo / 'tokenizer'}",
        f"checkpoint.dir={run_dir}",
        "checkpoint.export_hf_at_end=false",
        "logging.tensorboard_dir=null",
        "logging.progress_bar=false",
    ]


# The start of every run: the demo's SFT model (exported), trained long enough that it answers
# about a third of the held-out problems (greedy) and ends its responses.
SFT_STEPS = 250


def sft_worker(demo: Path) -> Path:
    from aligner.config import load_config
    from aligner.recipes import get_recipe

    entry = get_recipe("sft")
    run_dir = demo / "runs" / "sft"
    overrides = [
        f"data.train={demo / 'data' / 'sft' / 'train.jsonl'}",
        f"data.val={demo / 'data' / 'sft' / 'val.jsonl'}",
        f"data.tokenizer={demo / 'tokenizer'}",
        f"checkpoint.dir={run_dir}",
        f"trainer.max_steps={SFT_STEPS}",
        "trainer.max_epochs=100",
        "trainer.val_every=0",
        "logging.tensorboard_dir=null",
        "logging.progress_bar=false",
    ]
    entry.run(load_config(entry.config_class, CONFIGS / "sft_tiny.yaml", overrides))
    return run_dir / "hf"


@pytest.fixture(scope="module")
def sft_start(demo) -> Path:
    """The SFT model the online runs start from, exported to Hugging Face format (``<demo>/runs/sft/hf``)."""
    (hf_dir,) = run_distributed(sft_worker, 1, args=(demo,))
    return hf_dir


# Small steps: 4 prompts x 4 samples, two optimizer steps of 8 rollouts each.
SMALL = {
    "grpo": ["grpo.prompts_per_step=4", "grpo.group_size=4", "grpo.kl_coef=0.05"],
    "reinforce": ["reinforce.prompts_per_step=4", "reinforce.samples_per_prompt=4", "reinforce.kl_coef=0.05"],
}
SMALL_TRAINER = ["trainer.global_batch_size=8", "trainer.micro_batch_size=4", "trainer.val_every=0"]


def mechanics(recipe: str, start: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        *data_overrides(start.parents[2], run_dir),
        f"model.hf_path={start}",
        *SPREAD_REWARD,
        *SMALL[recipe],
        *SMALL_TRAINER,
        "optim.lr=1e-3",
        *extra,
    ]


@pytest.mark.parametrize("recipe", list(CONFIG_FILES))
def test_one_update_per_batch_has_ratio_one_and_the_engine_agrees_with_the_trainer(recipe, sft_start, tmp_path):
    overrides = mechanics(
        recipe,
        sft_start,
        tmp_path / "run",
        "trainer.global_batch_size=16",
        "trainer.max_steps=3",
        "generation.temperature=0.7",
    )
    (result,) = run_distributed(online_worker, 1, args=(recipe, overrides))
    history = result["history"]
    assert [step["step"] for step in history] == [1, 2, 3]
    for step in history:
        assert step["updates"] == 1
        # The old log-probs are the trainer's own, on the same micro-batches: the ratio is 1 exactly.
        assert step["ratio_min"] == step["ratio_max"] == 1.0, step
        assert step["clip_fraction"] == 0.0
        # The engine's log-probs (after temperature 0.7) are the trainer's, up to summation order.
        assert abs(step["token_mult_prob_error"] - 1.0) < MISMATCH_TOL, step
        assert abs(step["gen_kl_error"]) < MISMATCH_TOL, step
        for name in ("time_generate_s", "time_score_s", "time_train_s", "refit_s", "generation_tokens_per_s"):
            assert name in step
        assert 0.0 <= step["is_end_fraction"] <= 1.0
    assert KL_METRIC[recipe] in history[0]
    assert any(step["grad_norm"] > 0 for step in history)  # something was learned (step 1 may have no spread)


RESUME_CASES = {
    # DAPO: dynamic sampling, clip-higher, dual clip, overlong shaping; two epochs of two mini-batches.
    "grpo-dapo": ("grpo", ["grpo.variant=dapo", "grpo.overlong_buffer_len=4", "grpo.epochs=2"]),
    "reinforce": ("reinforce", ["reinforce.epochs=2"]),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_two_steps_resume_two_equals_four_steps_bitwise(case, sft_start, tmp_path):
    recipe, extra = RESUME_CASES[case]
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    (straight,) = run_distributed(
        online_worker, 1, args=(recipe, mechanics(recipe, sft_start, straight_dir, *extra, "trainer.max_steps=4"))
    )
    (first,) = run_distributed(
        online_worker, 1, args=(recipe, mechanics(recipe, sft_start, resumed_dir, *extra, "trainer.max_steps=2"))
    )
    (second,) = run_distributed(
        online_worker, 1, args=(recipe, mechanics(recipe, sft_start, resumed_dir, *extra, "trainer.max_steps=4"))
    )
    assert [step["step"] for step in second["history"]] == [3, 4]
    resumed = first["history"] + second["history"]
    for key in ("loss", "grad_norm", "reward_mean", "response_length_mean", KL_METRIC[recipe], "lr"):
        assert [step[key] for step in resumed] == [step[key] for step in straight["history"]], key
    for name, want in straight["weights"].items():
        assert torch.equal(second["weights"][name], want), name
    name = "decoder.final_layernorm.weight"
    assert not torch.equal(first["weights"][name], straight["weights"][name])  # the comparison is not vacuous
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.parametrize("recipe", list(CONFIG_FILES))
def test_parallel_layouts_match_a_single_process(recipe, sft_start, tmp_path):
    overrides = mechanics(recipe, sft_start, tmp_path / "single", "trainer.max_steps=2")
    (single,) = run_distributed(online_worker, 1, args=(recipe, overrides))
    want = torch.tensor([[step["loss"], step["reward_mean"], step[KL_METRIC[recipe]]] for step in single["history"]])
    for layout in (["parallel.tp=2"], ["parallel.pp=2"]):
        run_dir = tmp_path / layout[0]
        results = run_distributed(online_worker, 2, args=(recipe, [*overrides, f"checkpoint.dir={run_dir}", *layout]))
        for rank, result in enumerate(results):
            got = torch.tensor(
                [[step["loss"], step["reward_mean"], step[KL_METRIC[recipe]]] for step in result["history"]]
            )
            torch.testing.assert_close(
                got,
                want,
                rtol=PARALLEL_RTOL,
                atol=PARALLEL_ATOL,
                msg=lambda m, layout=layout, rank=rank: f"{layout} rank {rank}: {m}",
            )


# Learning: from the SFT start, the exact-answer reward. The training reward (sampled, on the
# training prompts) must rise; greedy accuracy on the held-out prompts (data/rl_prompt/val.jsonl:
# problems neither the SFT nor the RL data show), measured before the first step and after the
# last, must not fall. Measured at these settings (lr 2e-4, 16 prompts x 8 samples, CPU):
# GRPO's training reward 0.39 -> 0.70 (first / last 50 of 400 steps), held-out 0.36 -> 0.55;
# RLOO held-out 0.36 -> 0.53. The target of +0.2 held-out is not reliably reached by
# this tiny model in the time budget (see the README).
LEARNING_CASES = {
    "grpo": ("grpo", ["grpo.kl_coef=0.0"]),
    "rloo": ("reinforce", ["reinforce.variant=rloo"]),
}
LEARNING_STEPS, WINDOW = 300, 50
TRAIN_RISE = 0.15  # the window means' standard error is ~0.02 (128 binary rewards per step)
HELD_OUT_SLACK = 0.1  # 64 greedy answers over ~20 problems: one problem moves the accuracy by ~0.05


@pytest.mark.parametrize("case", list(LEARNING_CASES))
def test_training_reward_rises_and_held_out_accuracy_does_not_fall(case, sft_start, tmp_path):
    recipe, extra = LEARNING_CASES[case]
    overrides = [
        *data_overrides(sft_start.parents[2], tmp_path / "run", val=True),
        f"model.hf_path={sft_start}",
        f"trainer.max_steps={LEARNING_STEPS}",
        "trainer.max_epochs=100",
        f"trainer.val_every={LEARNING_STEPS}",
        "optim.lr=2e-4",
        *extra,
    ]
    (result,) = run_distributed(online_worker, 1, args=(recipe, overrides))
    rewards = [step["reward_exact_answer_mean"] for step in result["history"]]
    first, last = sum(rewards[:WINDOW]) / WINDOW, sum(rewards[-WINDOW:]) / WINDOW
    assert last - first >= TRAIN_RISE, (first, last)
    assert [entry["step"] for entry in (result["val"][0], result["val"][-1])] == [0, LEARNING_STEPS]
    start, end = (result["val"][index]["reward_exact_answer_mean"] for index in (0, -1))
    assert end >= start - HELD_OUT_SLACK, (start, end)
    print(f"{case}: training reward {first:.3f} -> {last:.3f}, held-out greedy accuracy {start:.3f} -> {end:.3f}")
