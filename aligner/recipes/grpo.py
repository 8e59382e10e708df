"""GRPO and its variants (DAPO, Dr. GRPO, GSPO): group-relative policy optimization on rollouts of an engine.

    torchrun --nproc_per_node=2 -m aligner.recipes.grpo --config configs/grpo_tiny.yaml grpo.variant=dapo

A step (one rollout batch):

1. ``grpo.prompts_per_step`` prompts (over all data-parallel ranks), each drawn
   ``grpo.group_size`` times by the engine with the current weights
   (``generation.*``); with dynamic sampling (DAPO) the groups whose rewards
   all agree are dropped and more prompts are drawn until the batch is full
   (at most ``grpo.max_generation_rounds`` rounds).
2. Rewards: the ``reward.terms`` summed (functions and/or reward models), plus
   DAPO's overlong penalty when ``grpo.overlong_buffer_len > 0``.
3. Advantages per group: ``(r - mean) / (std + eps)`` (no std division for
   Dr. GRPO; leave-one-out baseline as an option); with overlong filtering the
   unfinished responses leave the loss (they stay in their group's baseline).
4. Old-policy log-probs (and the entropy) recomputed by the trainer, reference
   log-probs when the KL term is on (``kl_coef > 0``; 0 loads no reference):
   forward-only passes through the fused LM head. With one update per rollout
   batch the update's own forward gives the old log-probs and no separate pass
   runs (``grpo.recompute_old_logprobs: true`` forces it).
5. ``grpo.epochs`` passes over the batch in mini-batches of
   ``trainer.global_batch_size`` rollouts, one optimizer step each, on the
   clipped policy loss (:func:`aligner.algorithms.policy_gradient.policy_loss`).
6. The engine is refit to the new weights (free when it shares them).

``grpo.variant`` picks the defaults of a variant (see
:mod:`aligner.algorithms.grpo`); any key set explicitly overrides it. With one
update per rollout batch (``epochs: 1`` and ``global_batch_size`` = the whole
batch) the ratio is exactly 1 and nothing is clipped, as expected. The trainer
computes its log-probs at ``generation.temperature``; ``token_mult_prob_error``
and ``gen_kl_error`` compare them with the engine's, every step.

The run's step is one rollout batch (``trainer.max_steps`` of them); the
learning-rate schedule counts optimizer steps (``updates`` per step).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from aligner import cli
from aligner.algorithms.grpo import PRESETS, GRPOLossConfig, groups_with_spread, grpo_advantages, overlong_penalty
from aligner.algorithms.policy_gradient import mask_unfinished
from aligner.config import ConfigError, RunConfig
from aligner.data.prompts import PromptBatch
from aligner.generation.base import Rollouts
from aligner.generation.config import GenerationConfig
from aligner.models.loading import build_model_from, check_vocab, frozen_copy
from aligner.parallel import initialize
from aligner.rewards.combine import CombinedReward, build_rewards
from aligner.rewards.config import RewardConfig
from aligner.trainers.online import (
    OnlineRun,
    average_over_data_parallel,
    check_online_model,
    check_rollout_batch,
    load_online_prompts,
    policy_forward_step,
)
from aligner.trainers.rollouts import (
    PhaseTimer,
    prompt_stream,
    rollout_metrics,
    score_rollouts,
    split_rows,
    training_rows,
)
from aligner.trainers.run import Run

# The keys whose null means "the variant's value".
_POLICY_KEYS = ("eps_low", "eps_high", "ratio_level", "aggregation", "kl_coef", "kl_estimator")
_GROUP_KEYS = ("baseline", "dynamic_sampling", "overlong_buffer_len", "overlong_penalty_factor", "overlong_filtering")


@dataclass
class GRPOConfig:
    """The GRPO family: groups, advantages, dynamic sampling, overlong handling and the clipped loss.

    Keys left null take the value of the variant.

    Attributes:
        variant: defaults of grpo (std-scaled, k3 KL 0.01), dapo (clip-higher 0.2/0.28, dual clip 10,
            dynamic sampling, overlong shaping over 4096 tokens, no KL), dr_grpo (no std scaling,
            seq-mean-token-sum-norm, no KL) or gspo (sequence ratio clipped to 3e-4/4e-4, seq-mean-token-mean).
        prompts_per_step: distinct prompts per step over all data-parallel ranks.
        group_size: responses drawn per prompt (the group of the advantage).
        epochs: passes over each rollout batch (each pass: one optimizer step per trainer.global_batch_size rollouts).
        recompute_old_logprobs: run a forward-only pass for the rollout policy's log-probs even when the update is
            one optimizer step over the whole batch (false: that step's own forward gives them, ratio exactly 1).
        normalize_std: divide the advantage by the group's std (null: the variant's; false for dr_grpo).
        std_eps: added to the group std.
        baseline: mean (the group mean) or leave_one_out (the mean of the other samples).
        dynamic_sampling: drop groups whose rewards all agree and draw more prompts until the batch is full.
        max_generation_rounds: most generation rounds of a step with dynamic sampling; more is an error.
        overlong_buffer_len: tokens before generation.max_new_tokens over which the overlong penalty ramps (0: off).
        overlong_penalty_factor: the overlong penalty at generation.max_new_tokens.
        overlong_filtering: leave unfinished (truncated) responses out of the loss.
        eps_low: lower clip of the ratio (1 - eps_low).
        eps_high: upper clip of the ratio (1 + eps_high); above eps_low: DAPO's clip-higher.
        dual_clip: bound of the loss for negative advantages, c > 1; 0: off; null: the variant's.
        ratio_level: token (GRPO) or sequence (GSPO: one ratio per response).
        aggregation: token-mean, seq-mean-token-mean, seq-mean-token-sum or seq-mean-token-sum-norm.
        kl_coef: weight of the KL-to-reference term in the loss (0: no reference model is loaded).
        kl_estimator: k1, abs, k2 or k3 (KL term of the loss).
        entropy_coef: weight of an entropy bonus (0: none).
        tis_cap: truncated importance sampling between engine and trainer log-probs, capped at this; null: off.
    """

    variant: str = "grpo"
    prompts_per_step: int = 8
    group_size: int = 4
    epochs: int = 1
    recompute_old_logprobs: bool = False
    normalize_std: bool | None = None
    std_eps: float = 1e-6
    baseline: str | None = None
    dynamic_sampling: bool | None = None
    max_generation_rounds: int = 10
    overlong_buffer_len: int | None = None
    overlong_penalty_factor: float | None = None
    overlong_filtering: bool | None = None
    eps_low: float | None = None
    eps_high: float | None = None
    dual_clip: float | None = None
    ratio_level: str | None = None
    aggregation: str | None = None
    kl_coef: float | None = None
    kl_estimator: str | None = None
    entropy_coef: float = 0.0
    tis_cap: float | None = None

    def __post_init__(self) -> None:
        if self.variant not in PRESETS:
            raise ConfigError(f"grpo.variant must be one of {PRESETS}, got {self.variant!r}")
        for name in ("prompts_per_step", "group_size", "epochs", "max_generation_rounds"):
            if getattr(self, name) < 1:
                raise ConfigError(f"grpo.{name} must be >= 1, got {getattr(self, name)}")
        self.loss_config()

    def loss_config(self) -> GRPOLossConfig:
        """The variant's :class:`~aligner.algorithms.grpo.GRPOLossConfig` with the keys set here on top.

        Raises:
            ConfigError: a value the loss refuses (named).
        """
        preset = GRPOLossConfig.preset(self.variant)
        policy = {f.name: getattr(preset.policy, f.name) for f in fields(preset.policy)}
        policy.update({name: getattr(self, name) for name in _POLICY_KEYS if getattr(self, name) is not None})
        if self.dual_clip is not None:
            policy["dual_clip"] = self.dual_clip or None
        policy.update(entropy_coef=self.entropy_coef, tis_cap=self.tis_cap)
        group = {f.name: getattr(preset, f.name) for f in fields(preset) if f.name != "policy"}
        group.update({name: getattr(self, name) for name in _GROUP_KEYS if getattr(self, name) is not None})
        if self.normalize_std is not None:
            group["scale"] = "std" if self.normalize_std else None
        group["eps"] = self.std_eps
        try:
            return GRPOLossConfig(**{**group, "policy": type(preset.policy)(**policy)})
        except ValueError as error:
            raise ConfigError(f"grpo: {error}") from None


@dataclass
class GRPORunConfig(RunConfig):
    """GRPO-family online RL.

    Attributes:
        grpo: groups, advantages and the loss.
        generation: the rollout engine and its sampling.
        reward: the rewards summed into a rollout's reward.
    """

    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.reward.check()
        check_rollout_batch(self, self.grpo.prompts_per_step * self.grpo.group_size)
        buffer = self.grpo.loss_config().overlong_buffer_len
        if buffer >= self.generation.max_new_tokens:
            raise ConfigError(
                f"grpo.overlong_buffer_len ({buffer}, the {self.grpo.variant} default when unset) must be smaller "
                f"than generation.max_new_tokens ({self.generation.max_new_tokens}); e.g. "
                f"grpo.overlong_buffer_len={self.generation.max_new_tokens // 4}, or 0 for no overlong penalty"
            )


def draw_groups(
    stream: Iterator[PromptBatch],
    online: OnlineRun,
    rewards: CombinedReward,
    tokenizer,
    config: GRPORunConfig,
    timer: PhaseTimer,
) -> tuple[Rollouts, torch.Tensor, dict[str, float]]:
    """This rank's rollouts of a step (whole groups), their shaped rewards, and the metrics of the first round.

    Without dynamic sampling: one round. With it, rounds continue (in lock-step over the
    data-parallel ranks) until every rank holds its share of groups with reward spread; the
    surplus of the last round is dropped.

    Raises:
        RuntimeError: dynamic sampling could not fill the batch in ``grpo.max_generation_rounds`` rounds.
    """
    grpo, loss = config.grpo, config.grpo.loss_config()
    group_size = grpo.group_size
    wanted = grpo.prompts_per_step // parallel_state.get_data_parallel_world_size()
    sampling = config.generation.sampling()
    kept: list[tuple[Rollouts, torch.Tensor]] = []
    metrics: dict[str, float] = {}
    groups = 0
    for round_number in range(1, grpo.max_generation_rounds + 1):
        prompts = next(stream)
        with timer("generate"):
            rollouts = online.generate(prompts, sampling)
        with timer("score"):
            scores = score_rollouts(rewards, tokenizer, prompts, rollouts)
        shaped = scores.total
        if loss.overlong_buffer_len:
            responses = rollouts.lengths - rollouts.prompt_lengths
            penalty = overlong_penalty(
                responses,
                max_length=config.generation.max_new_tokens,
                buffer_len=loss.overlong_buffer_len,
                penalty_factor=loss.overlong_penalty_factor,
            )
            shaped = shaped + penalty
            if round_number == 1:
                metrics["overlong_penalty_mean"] = penalty.mean().item()
        if round_number == 1:
            metrics.update(rollout_metrics(rollouts))
            metrics = {**scores.metrics, **average_over_data_parallel(metrics)}
        if not loss.dynamic_sampling:
            return rollouts, shaped, metrics
        spread = groups_with_spread(shaped, group_size)
        rows = spread.repeat_interleave(group_size).nonzero().squeeze(1)[: (wanted - groups) * group_size]
        if rows.numel():
            kept.append((rollouts.select(rows), shaped[rows]))
            groups += rows.numel() // group_size
        missing = torch.tensor([wanted - groups], dtype=torch.long)
        if dist.get_backend() == "nccl":
            missing = missing.cuda()
        dist.all_reduce(missing, op=dist.ReduceOp.MAX, group=parallel_state.get_data_parallel_group())
        if missing.item() == 0:
            metrics["generation_rounds"] = float(round_number)
            rollouts = Rollouts.cat([part[0] for part in kept], online.engine.pad_token_id)
            return rollouts, torch.cat([part[1] for part in kept]), metrics
    raise RuntimeError(
        f"dynamic sampling: after {grpo.max_generation_rounds} generation rounds a rank holds {groups} of its "
        f"{wanted} groups with reward spread (the others' rewards all agree): raise grpo.max_generation_rounds, "
        "draw more per prompt (grpo.group_size), or turn grpo.dynamic_sampling off"
    )


def run(config: GRPORunConfig) -> Run:
    """Train; returns the finished :class:`~aligner.trainers.run.Run` (``summary``, ``states["policy"]``)."""
    grpo, loss, generation = config.grpo, config.grpo.loss_config(), config.generation
    initialize(tp=config.parallel.tp, pp=config.parallel.pp, seed=config.trainer.seed)
    # data
    tokenizer, loader, val_prompts = load_online_prompts(
        config, prompts_per_step=grpo.prompts_per_step, group_size=grpo.group_size
    )
    # models: the policy, the reference (only with a KL term), the rewards
    model = build_model_from(config.model, tp=config.parallel.tp, pp=config.parallel.pp)
    check_vocab(tokenizer, model)
    check_online_model(model)
    reference = frozen_copy(model) if loss.policy.kl_coef > 0 else None
    rewards = build_rewards(config.reward, pad_token_id=tokenizer.pad_token_id or 0)
    # loss
    forward_step = policy_forward_step(
        loss.policy, temperature=generation.temperature, max_new_tokens=generation.max_new_tokens
    )
    # loop: the policy's run (resumed) with its engine
    online = OnlineRun(
        config,
        model,
        loader,
        tokenizer,
        rewards,
        val_prompts,
        rollouts_per_step=grpo.prompts_per_step * grpo.group_size,
        epochs=grpo.epochs,
        recompute_old_logprobs=grpo.recompute_old_logprobs,
    )
    pad = config.data.pad_to_multiple_of
    with online:
        stream = prompt_stream(loader)
        while not online.run.done:
            timer = PhaseTimer()
            rollouts, shaped, metrics = draw_groups(stream, online, rewards, tokenizer, config, timer)
            batch = training_rows(rollouts, pad_token_id=online.engine.pad_token_id, pad_to_multiple_of=pad)
            batch["advantages"] = grpo_advantages(
                shaped, grpo.group_size, scale=loss.scale, baseline=loss.baseline, eps=loss.eps
            )
            if loss.overlong_filtering:
                batch["loss_mask"] = mask_unfinished(batch["loss_mask"], batch["is_end"])
            micro_batches = split_rows(batch, config.trainer.micro_batch_size, pad_to_multiple_of=pad)
            with timer("logprobs"):
                metrics.update(online.logprobs(reference, batch, micro_batches))
            metrics.update(average_over_data_parallel({"advantage_abs_mean": batch["advantages"].abs().mean().item()}))
            with timer("train"):
                metrics.update(online.update(batch, forward_step))
            online.end_step(metrics, timer)
        online.run.finish()
    return online.run


RECIPE = cli.Recipe("grpo", "GRPO-family online RL (GRPO, DAPO, Dr. GRPO, GSPO)", GRPORunConfig, run)


def main(argv: Sequence[str] | None = None) -> None:
    cli.main(RECIPE, argv)


if __name__ == "__main__":
    main()
