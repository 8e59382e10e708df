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
from online_starts import PARALLEL_ATOL, PARALLEL_RTOL, assert_resumed_bitwise, assert_steps_close, rl_run_overrides

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
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


# Small steps: 4 prompts x 4 samples, two optimizer steps of 8 rollouts each.
SMALL = {
    "grpo": ["grpo.prompts_per_step=4", "grpo.group_size=4", "grpo.kl_coef=0.05"],
    "reinforce": [
        "reinforce.prompts_per_step=4",
        "reinforce.samples_per_prompt=4",
        "reinforce.kl_coef=0.05",
        "reinforce.mask_unfinished=true",  # the variant's default (the tiny config turns it off for learning)
    ],
}
SMALL_TRAINER = ["trainer.global_batch_size=8", "trainer.micro_batch_size=4", "trainer.val_every=0"]


def mechanics(recipe: str, start: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        *rl_run_overrides(start, run_dir),
        *SPREAD_REWARD,
        *SMALL[recipe],
        *SMALL_TRAINER,
        "optim.lr=1e-3",
        "optim.lr_decay_style=constant",  # the resume test stops at 2 of 4 steps: a schedule over max_steps differs
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
        # The old log-probs are the trainer's own (GRPO: the update forward's; REINFORCE, whose KL in the
        # reward needs them first: a forward-only pass on the same micro-batches): the ratio is 1 exactly.
        assert step["ratio_min"] == step["ratio_max"] == 1.0, step
        assert step["clip_fraction"] == 0.0
        # The engine's log-probs (after temperature 0.7) are the trainer's, up to summation order.
        assert abs(step["token_mult_prob_error"] - 1.0) < MISMATCH_TOL, step
        assert abs(step["gen_kl_error"]) < MISMATCH_TOL, step
        for name in ("time_generate_s", "time_score_s", "time_train_s", "refit_s", "generation_tokens_per_s"):
            assert name in step
        assert 0.0 <= step["is_end_fraction"] <= 1.0
    assert KL_METRIC[recipe] in history[0]
    assert all("policy_entropy" in step for step in history)
    assert any(step["grad_norm"] > 0 for step in history)  # something was learned (step 1 may have no spread)


def test_a_single_update_takes_the_old_logprobs_from_its_own_forward(sft_start, tmp_path):
    """One optimizer step per rollout batch: the update's forward (no separate pass) gives the recomputed step.

    Both runs draw the same rollouts (same seed and weights at every step as long as the updates agree);
    the recomputed old log-probs equal the update forward's up to float32 rounding (eval vs train mode
    on the same micro-batches, no dropout), so the steps agree to rounding amplified by Adam.
    """
    results = {}
    for recompute in (False, True):
        overrides = mechanics(
            "grpo",
            sft_start,
            tmp_path / f"run-{recompute}",
            "trainer.global_batch_size=16",
            "trainer.max_steps=2",
            f"grpo.recompute_old_logprobs={str(recompute).lower()}",
        )
        (results[recompute],) = run_distributed(online_worker, 1, args=("grpo", overrides))
    own, recomputed = results[False]["history"], results[True]["history"]
    assert all(step["time_logprobs_s"] < other["time_logprobs_s"] for step, other in zip(own, recomputed, strict=True))
    for step, other in zip(own, recomputed, strict=True):
        for name in ("loss", "grad_norm", "policy_entropy", "kl", "reward_mean", "token_mult_prob_error"):
            assert step[name] == pytest.approx(other[name], rel=PARALLEL_RTOL, abs=PARALLEL_ATOL), name
        assert step["ratio_min"] == step["ratio_max"] == 1.0  # exactly: the old log-probs are the forward's own
    for name, tensor in results[True]["weights"].items():
        torch.testing.assert_close(results[False]["weights"][name], tensor, rtol=PARALLEL_RTOL, atol=PARALLEL_ATOL)


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
    names = ("loss", "grad_norm", "reward_mean", "response_length_mean", KL_METRIC[recipe], "lr")
    assert_resumed_bitwise(first, second, straight, names)
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.parametrize("recipe", list(CONFIG_FILES))
def test_parallel_layouts_match_a_single_process(recipe, sft_start, tmp_path):
    overrides = mechanics(recipe, sft_start, tmp_path / "single", "trainer.max_steps=2")
    (single,) = run_distributed(online_worker, 1, args=(recipe, overrides))
    names = ("loss", "reward_mean", KL_METRIC[recipe])
    for layout in (["parallel.tp=2"], ["parallel.pp=2"]):
        run_dir = tmp_path / layout[0]
        results = run_distributed(online_worker, 2, args=(recipe, [*overrides, f"checkpoint.dir={run_dir}", *layout]))
        for rank, result in enumerate(results):
            assert_steps_close(result["history"], single["history"], names, label=f"{layout} rank {rank}")


# Learning: from the SFT start, the exact-answer reward, each recipe for LEARNING_STEPS steps of 16
# prompts x 8 samples at temperature 0.7 (one optimizer step each, lr 5e-4 decayed to 1e-5 by cosine). Greedy
# accuracy on the held-out prompts (data/rl_prompt/val.jsonl: 20 problems neither the SFT nor the RL data show)
# is measured before the first step and after the last; the sampled training reward must rise too.
# Measured here (one CPU thread, 65 - 90 s a run), from 0.312: held-out 0.781 (GRPO), 0.688 (REINFORCE), 0.781
# (RLOO); training reward (first / last 50 steps) 0.57 -> 0.91, 0.55 -> 0.89, 0.55 -> 0.91. With six other seeds
# (trainer.seed 7, 11, 3, 5, 13, 21) GRPO ended 0.578 - 0.781, REINFORCE 0.672 - 0.781, RLOO 0.672 - 0.781: over
# the 21 runs the rise ranged +0.27 to +0.47 (mean +0.43), so the tests assert the issue's +0.2. At temperature
# 1.0 it ranged +0.08 to +0.47 over 11 runs (+0.2 in 5): held-out accuracy is that of 20 problems (a problem is
# 1 - 5 of the 64 prompts), and which of them a run gets right moved by a few between seeds. REINFORCE keeps its
# KL in the reward but trains on unfinished responses too: with them masked (the variant's default) nothing
# pushes a response to end, and on this task responses drift to the length limit (is_end 0.98 -> 0.22 over 800
# steps).
LEARNING_CASES = {
    "grpo": ("grpo", ["grpo.kl_coef=0.0"]),
    "reinforce": ("reinforce", ["reinforce.mask_unfinished=false"]),
    "rloo": ("reinforce", ["reinforce.variant=rloo"]),
}
LEARNING_STEPS, WINDOW = 500, 50
TRAIN_RISE = 0.15  # the window means' standard error is ~0.02 (128 binary rewards per step)
HELD_OUT_RISE = 0.2  # the issue's; every one of 21 measured runs cleared it by 0.06 or more


@pytest.mark.parametrize("case", list(LEARNING_CASES))
def test_training_reward_and_held_out_accuracy_rise(case, sft_start, tmp_path):
    recipe, extra = LEARNING_CASES[case]
    overrides = [
        *rl_run_overrides(sft_start, tmp_path / "run", val=True),
        f"trainer.max_steps={LEARNING_STEPS}",
        "trainer.max_epochs=1000",
        f"trainer.val_every={LEARNING_STEPS}",
        "trainer.global_batch_size=128",
        "trainer.micro_batch_size=64",
        "optim.lr=5e-4",
        "optim.min_lr=1e-5",
        "optim.lr_decay_style=cosine",
        *extra,
    ]
    (result,) = run_distributed(online_worker, 1, args=(recipe, overrides))
    rewards = [step["reward_exact_answer_mean"] for step in result["history"]]
    first, last = sum(rewards[:WINDOW]) / WINDOW, sum(rewards[-WINDOW:]) / WINDOW
    assert [entry["step"] for entry in (result["val"][0], result["val"][-1])] == [0, LEARNING_STEPS]
    start, end = (result["val"][index]["reward_exact_answer_mean"] for index in (0, -1))
    print(f"{case}: training reward {first:.3f} -> {last:.3f}, held-out greedy accuracy {start:.3f} -> {end:.3f}")
    assert last - first >= TRAIN_RISE, (first, last)
    assert end - start >= HELD_OUT_RISE or end >= 0.9, (start, end)
