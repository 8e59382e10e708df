"""PPO (aligner.recipes.ppo) end to end on CPU with configs/ppo_tiny.yaml: actor, critic, reference, rewards.

Every run starts from the demo's SFT model (the ``sft_start`` fixture of conftest.py,
shared with the other online recipes); the reward-model runs use the demo's pairwise
reward model (``demo_rm``), which also starts the critic (PPO's default). Mechanics
runs are rewarded by ``online_rewards:digit_share`` (rollouts differ in it, so every
step has a gradient); learning runs by the exact-answer checker or the reward model.
Each run is a fresh spawned process (megatron's groups are created once per process).
"""

import shutil
from pathlib import Path

import pytest
from distributed import run_distributed
from online_starts import assert_resumed_bitwise, assert_steps_close, rl_run_overrides

from aligner.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# Engine and trainer log-probs differ only in summation order (KV-cached decode vs one forward).
MISMATCH_TOL = 1e-3


def ppo_worker(overrides: list[str]):
    """Run aligner.recipes.ppo in this process; its histories and both models' full weights."""
    from aligner.models.sharding import gather_full_state_dict
    from aligner.recipes import get_recipe

    entry = get_recipe("ppo")
    run = entry.run(load_config(entry.config_class, CONFIGS / "ppo_tiny.yaml", overrides))
    return {
        "history": run.summary.history,
        "val": run.summary.val_history,
        "policy": gather_full_state_dict(run.states["policy"].model),
        "critic": gather_full_state_dict(run.states["critic"].model),
    }


# Small steps: 4 prompts x 4 samples, two optimizer steps (actor and critic) of 8 rollouts each; a critic
# from the policy (a value head on the SFT model) and the digit-share reward.
def mechanics(start: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        *rl_run_overrides(start, run_dir),
        "reward.terms=[{function: 'online_rewards:digit_share'}]",
        "ppo.critic_init=policy",
        "ppo.critic_warmup_steps=0",
        "ppo.prompts_per_step=4",
        "ppo.samples_per_prompt=4",
        "ppo.kl_coef=0.05",
        "trainer.global_batch_size=8",
        "trainer.micro_batch_size=4",
        "trainer.val_every=0",
        "optim.lr=1e-3",
        "optim.lr_decay_style=constant",  # the resume test stops at 2 of 4 steps: a schedule over max_steps differs
        *extra,
    ]


def adaptive_kl_next(coef: float, kl: float, target: float, rollouts: int, horizon: int) -> float:
    """Ziegler et al.'s controller, written out: the proportional error clipped to +-0.2, scaled by rollouts/horizon."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * rollouts / horizon)


@pytest.mark.slow
def test_one_update_per_batch_has_ratio_one_the_critic_trains_and_the_kl_controller_adapts(sft_start, tmp_path):
    target, horizon = 0.05, 64
    overrides = mechanics(
        sft_start,
        tmp_path / "run",
        "trainer.global_batch_size=16",
        "trainer.max_steps=3",
        "generation.temperature=0.7",
        f"ppo.kl_target={target}",
        f"ppo.kl_horizon={horizon}",
    )
    (result,) = run_distributed(ppo_worker, 1, args=(overrides,))
    history = result["history"]
    assert [step["step"] for step in history] == [1, 2, 3]
    for step in history:
        assert step["updates"] == 1
        # The old log-probs come from a forward-only pass of the rollout policy on the update's micro-batches.
        assert step["ratio_min"] == step["ratio_max"] == 1.0, step
        assert step["clip_fraction"] == 0.0
        assert abs(step["token_mult_prob_error"] - 1.0) < MISMATCH_TOL, step
        assert abs(step["gen_kl_error"]) < MISMATCH_TOL, step
        assert step["critic_updates"] == 1 and step["critic_grad_norm"] > 0
        for name in ("critic_loss", "critic_value_error", "critic_value_clip_fraction", "kl", "kl_sum", "score_mean"):
            assert name in step, name
        for name in ("time_generate_s", "time_score_s", "time_logprobs_s", "time_train_s", "refit_s"):
            assert name in step, name
    # step 1 starts at the configured coefficient; each step's KL moves the next one
    assert history[0]["kl_coef"] == pytest.approx(0.05)
    for step, following in zip(history, history[1:], strict=False):
        want = adaptive_kl_next(step["kl_coef"], step["kl_sum"], target, 16, horizon)
        assert following["kl_coef"] == pytest.approx(want, rel=1e-12), (step, following)
    assert history[-1]["kl_coef"] != history[0]["kl_coef"]
    # no update is taken by the actor during critic warm-up: covered by the resume test's two runs below


@pytest.mark.slow
def test_critic_warmup_trains_the_critic_only(sft_start, tmp_path):
    overrides = mechanics(sft_start, tmp_path / "run", "trainer.max_steps=2", "ppo.critic_warmup_steps=1")
    (result,) = run_distributed(ppo_worker, 1, args=(overrides,))
    first, second = result["history"]
    assert "loss" not in first and first["critic_updates"] == 2  # the actor waits
    assert second["updates"] == 2 and second["critic_updates"] == 2


@pytest.mark.slow
def test_two_steps_resume_two_equals_four_steps_bitwise(sft_start, tmp_path):
    """Both models, both optimizers, the adaptive KL controller, the prompt position and the sampling stream."""
    extra = ["ppo.epochs=2", "ppo.kl_target=0.05", "ppo.kl_horizon=64", "ppo.clip_eps_high=0.28", "ppo.value_clip=0.1"]
    extra += ["ppo.mask_unfinished=true", "ppo.dual_clip=3.0", "ppo.entropy_coef=0.01"]
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    runs = [(straight_dir, 4), (resumed_dir, 2), (resumed_dir, 4)]
    straight, first, second = (
        run_distributed(ppo_worker, 1, args=(mechanics(sft_start, run_dir, *extra, f"trainer.max_steps={steps}"),))[0]
        for run_dir, steps in runs
    )
    assert [step["step"] for step in second["history"]] == [3, 4]
    names = ("loss", "grad_norm", "critic_loss", "critic_grad_norm", "reward_mean", "kl", "kl_coef", "lr")
    assert_resumed_bitwise(first, second, straight, names, models=("policy", "critic"))
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.slow
def test_parallel_layouts_match_a_single_process(sft_start, demo_rm, tmp_path):
    """The critic starts from the reward model (trained at one process, resliced to each layout)."""
    overrides = mechanics(
        sft_start,
        tmp_path / "single",
        "trainer.max_steps=2",
        f"reward.terms=[{{model: '{demo_rm}'}}, {{function: 'online_rewards:digit_share'}}]",
        "ppo.critic_init=reward_model",
    )
    keys = ("loss", "critic_loss", "reward_mean", "kl")
    (single,) = run_distributed(ppo_worker, 1, args=(overrides,))
    for layout in (["parallel.tp=2"], ["parallel.pp=2"]):
        run_dir = tmp_path / layout[0]
        results = run_distributed(ppo_worker, 2, args=([*overrides, f"checkpoint.dir={run_dir}", *layout],))
        for rank, result in enumerate(results):
            assert_steps_close(result["history"], single["history"], keys, label=f"{layout} rank {rank}")


def test_config_errors_name_the_key(tmp_path):
    from aligner.recipes.ppo import PPORunConfig

    config = CONFIGS / "ppo_tiny.yaml"
    cases = {
        "ppo.gae_mask_mode=nope": "gae_mask_mode",
        "ppo.kl_estimator=k3": "kl_estimator",
        "ppo.lam=1.5": "ppo.lam",
        "ppo.critic_init=nope": "critic_init",
        "ppo.kl_target=-1": "ppo",
        "trainer.global_batch_size=24": "global_batch_size",
    }
    for override, match in cases.items():
        with pytest.raises((ConfigError, ValueError), match=match):
            load_config(PPORunConfig, config, [override])
    # the critic's default start is the reward model: without one, the error says what to set
    with pytest.raises(ConfigError, match="critic_init"):
        load_config(
            PPORunConfig,
            config,
            ["reward.terms=[{function: 'aligner.rewards.arithmetic:exact_answer'}]", "ppo.critic_init=reward_model"],
        )


# Learning against the demo's reward model (configs/rm_tiny.yaml on the demo's helpfulness pairs: a right answer
# over a far-off wrong one, or over a less explained right one; 1.0 held-out pair accuracy), which also starts the
# critic. The SFT start answers in the short style when greedy (its data: 80% short, 20% verbose answers), which
# this reward model scores ~2.1; it scores a verbose answer ~4.7. PPO with configs/ppo_tiny.yaml's settings for it
# moves the greedy answers to the verbose style. Measured (150 steps, the first 25 training only the critic,
# ~65 s; seeds 1234 and 7): held-out greedy score 2.062 (std 0.642) -> 4.661 / 4.659 (std 0.005 / 0.007), every
# answer verbose (12 tokens) and ended, the summed KL per response at most 7.97 / 7.44. The settings matter:
# - without reward.missing_eos_penalty the policy ran its answers into the token limit (is_end 0), which the
#   reward model scored as highly (KL 20 - 60);
# - at KL coefficient 0.05 - 0.1 it kept ending but dropped or garbled the explanation ("The answer is 4 because
#   4 makes 6."), which this small reward model still pays for: held-out exact answers fell 0.31 -> 0.05 - 0.16.
#   At 0.2 the answers keep the SFT model's verbose form and its accuracy (0.312 -> 0.281 / 0.281).
# The exact-answer checker rides along at weight 0 (a metric only) to watch for that.
RM_STEPS, RM_WARMUP = 150, 25
# The start's held-out greedy scores have a std of 0.64 over the 64 prompts (its mean's standard error 0.08): a
# rise of 1.5 is over twice one prompt's spread and ~19 standard errors of the mean (measured 2.60).
RM_RISE = 1.5
RM_KL_BOUND = 12.0  # nats per response (summed |log-ratio| of the sampled responses) at every step; ~1.5x measured
RM_END_FRACTION = 0.95  # held-out greedy answers that end (measured 1.0)
RM_ACCURACY_SLACK = 0.15  # held-out exact answers may fall this much (measured -0.03; garbling runs -0.16, -0.27)


@pytest.mark.slow
def test_the_reward_model_score_of_greedy_answers_rises_while_the_kl_stays_bounded(sft_start, demo_rm, tmp_path):
    overrides = [
        *rl_run_overrides(sft_start, tmp_path / "run", val=True),
        f"reward.terms=[{{model: '{demo_rm}'}}, {{function: 'aligner.rewards.arithmetic:exact_answer', weight: 0.0}}]",
        "ppo.critic_init=reward_model",
        f"ppo.critic_warmup_steps={RM_WARMUP}",
        f"trainer.max_steps={RM_STEPS}",
        f"trainer.val_every={RM_STEPS}",
    ]
    (result,) = run_distributed(ppo_worker, 1, args=(overrides,))
    first, last = result["val"][0], result["val"][-1]
    assert [first["step"], last["step"]] == [0, RM_STEPS]
    start, end = first["reward_reward_model_mean"], last["reward_reward_model_mean"]
    kl_max = max(step["kl_sum"] for step in result["history"])
    print(
        f"reward model score of held-out greedy answers {start:.3f} (std {first['reward_reward_model_std']:.3f}) -> "
        f"{end:.3f} (std {last['reward_reward_model_std']:.3f}); response length {first['response_length_mean']:.2f}"
        f" -> {last['response_length_mean']:.2f}; ended {last['is_end_fraction']:.3f}; max KL {kl_max:.3f}; "
        f"exact answers {first['reward_exact_answer_mean']:.3f} -> {last['reward_exact_answer_mean']:.3f}"
    )
    assert end - start >= RM_RISE, (start, end)
    assert last["is_end_fraction"] >= RM_END_FRACTION, last
    assert kl_max <= RM_KL_BOUND, kl_max
    assert last["reward_exact_answer_mean"] >= first["reward_exact_answer_mean"] - RM_ACCURACY_SLACK, (first, last)


# Learning the exact answer: the critic starts from the policy (the SFT model with a new value head) and trains
# alone for the first 25 steps; then 475 steps of 16 prompts x 8 samples at temperature 0.7, one actor and one
# critic update each, lr 5e-4 decayed to 1e-5 (configs/ppo_tiny.yaml with the exact-answer reward and KL coefficient
# 0.01; the config's missing-eos penalty 2 stays). Measured (one CPU thread, ~125 s): held-out greedy accuracy
# 0.312 -> 0.781 / 0.672 (seeds 1234 / 7), training reward (first / last 50 steps) 0.53 -> 0.92. Held-out
# accuracy dips for the first 100 steps (to 0.19 - 0.30) while the critic learns the problems' values, and
# recovers after.
ARITHMETIC_STEPS, ARITHMETIC_WARMUP, WINDOW = 500, 25, 50
TRAIN_RISE = 0.15  # the window means' standard error is ~0.02 (128 binary rewards per step)
HELD_OUT_RISE = 0.2  # the issue's; the measured runs cleared it by 0.16 - 0.27


@pytest.mark.slow
def test_exact_answer_training_reward_and_held_out_accuracy_rise(sft_start, tmp_path):
    overrides = [
        *rl_run_overrides(sft_start, tmp_path / "run", val=True),
        "reward.terms=[{function: 'aligner.rewards.arithmetic:exact_answer'}]",
        "ppo.critic_init=policy",
        "ppo.kl_coef=0.01",
        f"ppo.critic_warmup_steps={ARITHMETIC_WARMUP}",
        f"trainer.max_steps={ARITHMETIC_STEPS}",
        f"trainer.val_every={ARITHMETIC_STEPS}",
    ]
    (result,) = run_distributed(ppo_worker, 1, args=(overrides,))
    rewards = [step["reward_exact_answer_mean"] for step in result["history"]]
    first, last = sum(rewards[:WINDOW]) / WINDOW, sum(rewards[-WINDOW:]) / WINDOW
    start, end = (result["val"][index]["reward_exact_answer_mean"] for index in (0, -1))
    print(f"ppo: training reward {first:.3f} -> {last:.3f}, held-out greedy accuracy {start:.3f} -> {end:.3f}")
    assert last - first >= TRAIN_RISE, (first, last)
    assert end - start >= HELD_OUT_RISE or end >= 0.9, (start, end)
