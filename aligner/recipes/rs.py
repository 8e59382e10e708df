"""Rejection sampling (NeMo-Aligner's): in rounds, draw k responses per prompt, keep the best by reward, SFT on them.

    torchrun --nproc_per_node=2 -m aligner.recipes.rs --config configs/rs_tiny.yaml

A round:

1. ``rs.prompts_per_round`` prompts (over all data-parallel ranks), each drawn
   ``rs.samples_per_prompt`` times (k, 4 by default) by the engine, refit to the
   current weights first (``generation.*``).
2. Rewards: the ``reward.terms`` summed (reward models and/or functions).
3. Selection (:func:`aligner.algorithms.rejection.select_top`): each prompt's
   ``rs.top_n`` best samples (ties: the one drawn first) are its slots; a slot is
   kept when its reward is at least ``rs.min_reward`` (null: always). The slots of
   every data-parallel rank are gathered, so every rank holds the round's kept set:
   ``prompts_per_round * top_n`` rows, prompt tokens masked, slots not kept masked
   whole.
4. SFT on it: ``rs.epochs`` passes, in order, in mini-batches of
   ``trainer.global_batch_size`` slots, one optimizer step each, on the token-mean
   NLL of the kept responses (:func:`aligner.recipes.sft.forward_step`). A
   mini-batch without a kept slot makes no update (counted in ``skipped_updates``).

The run's step is one optimizer step: a round is ``epochs * prompts_per_round *
top_n / global_batch_size`` steps, and ``trainer.max_steps`` may end a run inside
a round. Every step reports its round (``round``), the round's samples
(``reward_mean``, ``reward_<term>_mean``, ``response_length_mean``, ...) and its
kept set (:func:`~aligner.algorithms.rejection.kept_set_metrics`: ``kept_count``,
``kept_fraction``, ``kept_reward_mean`` / ``kept_reward_min`` beside
``reward_mean`` / ``reward_min``, ``prompts_without_kept``,
``kept_response_length_mean``); the round's first step also its phase times.
Validation (``data.val``, every ``trainer.val_every`` steps): one response per
held-out prompt, greedy by default, scored by the same rewards.

Resume: the checkpoint holds the prompt loader's position, each data-parallel
replica's random stream of the engine and the round in progress (its number, its
steps done, its kept set: the same on every rank). A run resumed inside a round
trains on the saved kept set: it cannot be drawn again, the weights that drew it
have been trained since. At the layout that wrote it a resume is exact; at another
one the kept set still carries over, the random streams start afresh.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from megatron.core import parallel_state

from aligner import cli
from aligner.algorithms.rejection import kept_set_metrics, select_top
from aligner.config import ConfigError, RunConfig
from aligner.data.prompts import PromptBatch
from aligner.generation.base import Engine, Rollouts
from aligner.generation.config import GenerationConfig
from aligner.models.loading import build_model_from, check_vocab
from aligner.ops import IGNORE_INDEX
from aligner.parallel import gather_over_data_parallel, initialize
from aligner.recipes.sft import forward_step
from aligner.rewards.combine import CombinedReward, build_rewards
from aligner.rewards.config import RewardConfig
from aligner.trainers.online import (
    average_over_data_parallel,
    build_engine,
    check_rollout_batch,
    load_online_prompts,
    validate_rollouts,
)
from aligner.trainers.rollouts import (
    PhaseTimer,
    SamplingGenerator,
    policy_updates,
    prompt_stream,
    rollout_metrics,
    score_rollouts,
    training_rows,
)
from aligner.trainers.run import Run
from aligner.trainers.state import build_train_state

# The columns of a kept-set row that the SFT step reads (and a checkpoint saves).
_KEPT_COLUMNS = ("input_ids", "labels", "loss_mask", "lengths")


@dataclass
class RSConfig:
    """Rejection sampling: the rounds' sampling, selection and fine-tuning.

    Attributes:
        prompts_per_round: distinct prompts drawn per round over all data-parallel ranks.
        samples_per_prompt: responses drawn per prompt (k), the candidates of the selection.
        top_n: responses kept per prompt: its best by reward (ties: the one drawn first).
        min_reward: keep only responses whose reward is at least this (a prompt may then keep fewer than top_n,
            or none); null: no threshold, every prompt keeps top_n.
        epochs: SFT passes over a round's kept set; each pass is one optimizer step per trainer.global_batch_size
            slots (top_n per prompt, the ones below min_reward masked).
    """

    prompts_per_round: int = 32
    samples_per_prompt: int = 4
    top_n: int = 1
    min_reward: float | None = None
    epochs: int = 1

    def __post_init__(self) -> None:
        for name in ("prompts_per_round", "samples_per_prompt", "epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"rs.{name} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.top_n <= self.samples_per_prompt:
            raise ConfigError(
                f"rs.top_n must be in [1, rs.samples_per_prompt={self.samples_per_prompt}] (the responses kept "
                f"of those drawn per prompt), got {self.top_n}"
            )
        if self.min_reward is not None and not math.isfinite(self.min_reward):
            raise ConfigError(f"rs.min_reward must be a finite number or null, got {self.min_reward}")

    @property
    def slots_per_round(self) -> int:
        """Rows of a round's kept set: ``top_n`` per prompt."""
        return self.prompts_per_round * self.top_n


@dataclass
class RSRunConfig(RunConfig):
    """Rejection sampling: rounds of sampling, selection by reward and SFT on the kept responses.

    Attributes:
        rs: the rounds: prompts, samples per prompt, selection, SFT passes.
        generation: the engine that draws the samples, and its sampling.
        reward: the rewards summed into a sample's reward.
    """

    rs: RSConfig = field(default_factory=RSConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.reward.check()
        batch, slots = self.trainer.global_batch_size, self.rs.slots_per_round
        if slots % batch:
            raise ConfigError(
                f"trainer.global_batch_size ({batch} kept slots per optimizer step) must divide the {slots} slots "
                f"of a round's kept set (rs.prompts_per_round={self.rs.prompts_per_round} x "
                f"rs.top_n={self.rs.top_n})"
            )
        check_rollout_batch(self, slots)

    @property
    def steps_per_round(self) -> int:
        """Optimizer steps of a round: ``epochs`` passes over its slots in global batches."""
        return self.rs.epochs * self.rs.slots_per_round // self.trainer.global_batch_size


class RoundState:
    """The round in progress: its number, its kept set, its metrics and its steps done; checkpointed with the run.

    ``kept_set`` holds the whole round's rows (every data-parallel rank's slots, the same on
    every rank): ``input_ids``, ``labels`` (-100 off the kept responses), ``loss_mask`` and
    ``lengths``.
    """

    def __init__(self) -> None:
        self.number = 0
        self.steps = 0
        self.steps_done = 0
        self.kept_set: dict[str, torch.Tensor] | None = None
        self.metrics: dict[str, float] = {}

    @property
    def finished(self) -> bool:
        return self.steps_done >= self.steps

    def start(self, kept_set: dict[str, torch.Tensor], metrics: dict[str, float], steps: int) -> None:
        self.number += 1
        self.steps, self.steps_done = steps, 0
        self.kept_set, self.metrics = kept_set, metrics

    def mini_batch(self, rows: int) -> dict[str, torch.Tensor]:
        """This data-parallel rank's share of the next step's ``rows`` slots (passes go through the set in order)."""
        slots = self.kept_set["input_ids"].shape[0]
        start = self.steps_done * rows % slots
        share = rows // parallel_state.get_data_parallel_world_size()
        start += parallel_state.get_data_parallel_rank() * share
        return {name: value[start : start + share] for name, value in self.kept_set.items()}

    def state_dict(self) -> dict[str, Any]:
        """The round's position; its kept set and metrics only while it has steps to go."""
        ongoing = not self.finished
        return {
            "number": self.number,
            "steps": self.steps,
            "steps_done": self.steps_done,
            "kept_set": self.kept_set if ongoing else None,
            "metrics": dict(self.metrics) if ongoing else {},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.number, self.steps, self.steps_done = state["number"], state["steps"], state["steps_done"]
        self.kept_set, self.metrics = state["kept_set"], dict(state["metrics"])


def check_resumed_round(round_state: RoundState, config: RSRunConfig) -> None:
    """A round resumed in its middle must have this config's shape (its kept set and steps are the saved ones).

    Raises:
        ConfigError: the saved round has another number of slots or steps.
    """
    if round_state.finished:
        return
    slots = round_state.kept_set["input_ids"].shape[0]
    if slots != config.rs.slots_per_round or round_state.steps != config.steps_per_round:
        raise ConfigError(
            f"the checkpoint stopped inside round {round_state.number}, whose kept set has {slots} slots over "
            f"{round_state.steps} steps; this config's round has {config.rs.slots_per_round} slots "
            f"(rs.prompts_per_round x rs.top_n) over {config.steps_per_round} steps (rs.epochs, "
            "trainer.global_batch_size): resume with the settings that wrote it"
        )


def draw_kept_set(
    prompts: PromptBatch,
    engine: Engine,
    rewards: CombinedReward,
    tokenizer: Any,
    config: RSRunConfig,
    *,
    version: int,
    generator: torch.Generator,
    timer: PhaseTimer,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Steps 1-3 of a round: the kept set of ``prompts`` (every rank's, joined) and the round's metrics; a collective.

    ``prompts`` are this rank's, each repeated ``rs.samples_per_prompt`` times; ``version`` is the
    weights version the engine must hold; ``generator`` draws the samples.
    """
    rs = config.rs
    # step 1: k samples per prompt with the current weights
    with timer("generate"), engine.awake():
        rollouts = engine.generate(
            prompts.prompt_ids, config.generation.sampling(), expected_version=version, generator=generator
        )
    # step 2: rewards
    with timer("score"):
        scores = score_rollouts(rewards, tokenizer, prompts, rollouts)
    metrics = {**scores.metrics, **average_over_data_parallel(rollout_metrics(rollouts))}
    # step 3: the top_n of each prompt, gathered over the data-parallel ranks
    with timer("select"):
        selection = select_top(scores.total, rs.samples_per_prompt, top_n=rs.top_n, min_reward=rs.min_reward)
        slots = rollouts.select(selection.rows.to(rollouts.tokens.device))
        share = {
            "slots": slots.cpu(),
            "rewards": scores.total.cpu(),
            "response_lengths": (rollouts.lengths - rollouts.prompt_lengths).cpu(),
        }
        shares = gather_over_data_parallel(share)
        rewards_all = torch.cat([part["rewards"] for part in shares])
        lengths_all = torch.cat([part["response_lengths"] for part in shares])
        # A rank's samples are whole prompts, so selecting over the joined rewards joins the ranks' selections.
        selection = select_top(rewards_all, rs.samples_per_prompt, top_n=rs.top_n, min_reward=rs.min_reward)
        metrics.update(kept_set_metrics(rewards_all, selection, lengths_all))
        joined = Rollouts.cat([part["slots"] for part in shares], engine.pad_token_id)
        rows = training_rows(
            joined, pad_token_id=engine.pad_token_id, pad_to_multiple_of=config.data.pad_to_multiple_of
        )
        dropped = ~selection.kept
        rows["labels"][dropped] = IGNORE_INDEX
        rows["loss_mask"][dropped] = 0.0
    return {name: rows[name] for name in _KEPT_COLUMNS}, metrics


def run(config: RSRunConfig) -> Run:
    """Train; returns the finished :class:`~aligner.trainers.run.Run` (``summary``, ``states["policy"]``)."""
    rs, trainer = config.rs, config.trainer
    initialize(tp=config.parallel.tp, pp=config.parallel.pp, seed=trainer.seed)
    # data: a round's prompts, each repeated k times
    tokenizer, loader, val_prompts = load_online_prompts(
        config, prompts_per_step=rs.prompts_per_round, group_size=rs.samples_per_prompt
    )
    # models: the policy, the rewards
    model = build_model_from(config.model, tp=config.parallel.tp, pp=config.parallel.pp)
    check_vocab(tokenizer, model)
    rewards = build_rewards(config.reward, pad_token_id=tokenizer.pad_token_id or 0)
    # loop: the policy's run over optimizer steps (a round is steps_per_round of them), resumed
    rounds = trainer.max_epochs * len(loader)
    steps = rounds * config.steps_per_round
    steps = steps if trainer.max_steps is None else min(trainer.max_steps, steps)
    state = build_train_state(model, config.optim, total_steps=steps, bf16=trainer.bf16)
    run = Run(
        config,
        {"policy": state},
        total_steps=steps,
        data=loader,
        uniform_loss=math.log(model.aligner_config.vocab_size),
    )
    sampling_rng = SamplingGenerator(trainer.seed, next(model.parameters()).device)
    round_state = RoundState()
    run.register("sampling_rng", sampling_rng, per_rank=True)  # each data-parallel replica's own
    run.register("round", round_state)
    run.resume()
    check_resumed_round(round_state, config)
    engine = build_engine(model, tokenizer, config.generation)
    engine.refit(model, version=state.step)

    def validate() -> dict[str, float]:
        if engine.version != state.step:
            engine.refit(model, version=state.step)
        return validate_rollouts(engine, val_prompts, rewards, tokenizer, config.generation, trainer.seed)

    validating = val_prompts is not None and bool(trainer.val_every)
    with run:
        if validating and run.step == 0:
            run.log_validation(validate())
        stream = prompt_stream(loader)
        while not run.done:
            timer = PhaseTimer()
            if round_state.finished:
                if engine.version != state.step:
                    with timer("refit"):
                        engine.refit(model, version=state.step)
                kept_set, metrics = draw_kept_set(
                    next(stream),
                    engine,
                    rewards,
                    tokenizer,
                    config,
                    version=state.step,
                    generator=sampling_rng.generator,
                    timer=timer,
                )
                round_state.start(kept_set, metrics, config.steps_per_round)
            # step 4: one optimizer step on the next global batch of the kept set
            with timer("train"):
                update = policy_updates(
                    state,
                    round_state.mini_batch(trainer.global_batch_size),
                    forward_step,
                    mini_batch_rows=trainer.global_batch_size // parallel_state.get_data_parallel_world_size(),
                    micro_batch_size=trainer.micro_batch_size,
                    pad_to_multiple_of=config.data.pad_to_multiple_of,
                )
            round_state.steps_done += 1
            run.end_step({"round": float(round_state.number), **round_state.metrics, **update, **timer.metrics()})
            if validating and run.should_validate:
                run.log_validation(validate())
            run.save_if_due()
        run.finish()
    return run


RECIPE = cli.Recipe("rs", "Rejection sampling: SFT on the best of k samples per prompt", RSRunConfig, run)


def main(argv: Sequence[str] | None = None) -> None:
    cli.main(RECIPE, argv)


if __name__ == "__main__":
    main()
