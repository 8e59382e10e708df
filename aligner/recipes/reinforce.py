"""REINFORCE with a leave-one-out baseline (NeMo-Aligner) and RLOO, on rollouts of an engine.

    torchrun --nproc_per_node=2 -m aligner.recipes.reinforce --config configs/reinforce_tiny.yaml reinforce.variant=rloo

A step (one rollout batch):

1. ``reinforce.prompts_per_step`` prompts (over all data-parallel ranks), each
   drawn ``reinforce.samples_per_prompt`` times by the engine with the current
   weights (``generation.*``), scored by ``reward.terms``.
2. Log-probs of the rollout policy (and its entropy) recomputed by the trainer,
   and of the reference (the initial policy) when the KL penalty is on (without
   it and with one update per rollout batch, the update's own forward gives the
   rollout policy's log-probs instead; ``reinforce.recompute_old_logprobs``).
3. The KL penalty goes into the reward: ``r' = r - kl_coef * reduce_t(kl_t)``
   (``kl_estimator`` k1 or abs; ``kl_reduction`` mean as NeMo-Aligner, sum as
   TRL's RLOO); the baseline of a sample is the mean ``r'`` of the other
   samples of its prompt, over the valid ones (``baseline_valid_only``: the
   responses that ended, NeMo-Aligner's ``is_end``); ``A = r' - baseline``.
4. ``reinforce.epochs`` passes over the batch in mini-batches of
   ``trainer.global_batch_size`` rollouts, one optimizer step each, on
   ``-A * ratio`` with the ratio against the rollout policy clipped to
   ``[1 - clip_eps, 1 + clip_eps]`` (at one update per batch the ratio is
   exactly 1 and the loss is REINFORCE's ``-A * logp`` in value and gradient).
   With ``mask_unfinished`` responses that did not end get no gradient.
5. The engine is refit to the new weights.

Variants (``reinforce.variant``; keys set explicitly win): ``reinforce``
(NeMo-Aligner: k1 KL in the reward with coefficient 0.01, token-mean,
baseline over ended responses, unfinished responses masked) and ``rloo``
(veRL's RLOO: no KL, every sample counts, nothing masked).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from aligner import cli
from aligner.algorithms.policy_gradient import (
    AGGREGATIONS,
    KL_REDUCTIONS,
    PolicyLossConfig,
    kl_in_reward,
    mask_unfinished,
)
from aligner.algorithms.reinforce import rloo_advantages
from aligner.config import ConfigError, RunConfig
from aligner.generation.config import GenerationConfig
from aligner.models.loading import build_model_from, check_vocab, frozen_copy
from aligner.parallel import initialize
from aligner.rewards.combine import build_rewards
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

VARIANTS = {
    "reinforce": {"kl_coef": 0.01, "baseline_valid_only": True, "mask_unfinished": True},
    "rloo": {"kl_coef": 0.0, "baseline_valid_only": False, "mask_unfinished": False},
}
KL_IN_REWARD_ESTIMATORS = ("k1", "abs")


@dataclass
class ReinforceConfig:
    """REINFORCE / RLOO: samples per prompt, the KL penalty in the reward, the baseline and the update.

    Keys left null take the value of the variant.

    Attributes:
        variant: defaults of reinforce (NeMo-Aligner: KL 0.01 in the reward, baseline over ended responses,
            unfinished responses masked) or rloo (no KL, every sample in the baseline, nothing masked).
        prompts_per_step: distinct prompts per step over all data-parallel ranks.
        samples_per_prompt: responses drawn per prompt (>= 2: the leave-one-out baseline needs another sample).
        epochs: passes over each rollout batch (each pass: one optimizer step per trainer.global_batch_size rollouts).
        recompute_old_logprobs: run a forward-only pass for the rollout policy's log-probs even when the update is
            one optimizer step over the whole batch (false: that step's own forward gives them, ratio exactly 1).
        kl_coef: weight of the KL to the reference (the initial policy) in the reward; 0 loads no reference.
        kl_estimator: k1 (logp - ref_logp) or abs (its absolute value, NeMo-Aligner's use_absolute_kl).
        kl_reduction: mean (NeMo-Aligner) or sum (TRL's RLOO) of the per-token KL over a response.
        baseline_valid_only: the baseline averages only the responses that ended (is_end).
        mask_unfinished: responses that did not end (cut at max_new_tokens) get no gradient.
        clip_eps: the ratio against the rollout policy is clipped to [1 - clip_eps, 1 + clip_eps] (epochs > 1).
        aggregation: token-mean, seq-mean-token-mean, seq-mean-token-sum or seq-mean-token-sum-norm.
    """

    variant: str = "reinforce"
    prompts_per_step: int = 8
    samples_per_prompt: int = 4
    epochs: int = 1
    recompute_old_logprobs: bool = False
    kl_coef: float | None = None
    kl_estimator: str = "k1"
    kl_reduction: str = "mean"
    baseline_valid_only: bool | None = None
    mask_unfinished: bool | None = None
    clip_eps: float = 0.2
    aggregation: str = "token-mean"

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ConfigError(f"reinforce.variant must be one of {tuple(VARIANTS)}, got {self.variant!r}")
        for name in ("prompts_per_step", "epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"reinforce.{name} must be >= 1, got {getattr(self, name)}")
        if self.samples_per_prompt < 2:
            raise ConfigError(
                f"reinforce.samples_per_prompt must be >= 2 (the baseline is the mean of the other samples), got "
                f"{self.samples_per_prompt}"
            )
        if self.kl_estimator not in KL_IN_REWARD_ESTIMATORS:
            raise ConfigError(
                f"reinforce.kl_estimator must be one of {KL_IN_REWARD_ESTIMATORS}, got {self.kl_estimator!r}"
            )
        if self.kl_reduction not in KL_REDUCTIONS:
            raise ConfigError(f"reinforce.kl_reduction must be one of {KL_REDUCTIONS}, got {self.kl_reduction!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"reinforce.aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.setting("kl_coef") < 0:
            raise ConfigError(f"reinforce.kl_coef must be >= 0, got {self.kl_coef}")
        try:
            self.policy_loss_config()
        except ValueError as error:
            raise ConfigError(f"reinforce: {error}") from None

    def setting(self, name: str):
        """The key ``name``: its value when set, else the variant's."""
        value = getattr(self, name)
        return VARIANTS[self.variant][name] if value is None else value

    def policy_loss_config(self) -> PolicyLossConfig:
        """The update's loss: the clipped ratio, no KL term (it is in the reward)."""
        return PolicyLossConfig(eps_low=self.clip_eps, eps_high=self.clip_eps, aggregation=self.aggregation)


@dataclass
class ReinforceRunConfig(RunConfig):
    """REINFORCE / RLOO online RL.

    Attributes:
        reinforce: samples per prompt, KL in the reward, the baseline and the update.
        generation: the rollout engine and its sampling.
        reward: the rewards summed into a rollout's reward.
    """

    reinforce: ReinforceConfig = field(default_factory=ReinforceConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.reward.check()
        check_rollout_batch(self, self.reinforce.prompts_per_step * self.reinforce.samples_per_prompt)


def run(config: ReinforceRunConfig) -> Run:
    """Train; returns the finished :class:`~aligner.trainers.run.Run` (``summary``, ``states["policy"]``)."""
    reinforce, generation = config.reinforce, config.generation
    group_size = reinforce.samples_per_prompt
    kl_coef = reinforce.setting("kl_coef")
    initialize(tp=config.parallel.tp, pp=config.parallel.pp, seed=config.trainer.seed)
    # data
    tokenizer, loader, val_prompts = load_online_prompts(
        config, prompts_per_step=reinforce.prompts_per_step, group_size=group_size
    )
    # models: the policy, the reference (only with a KL penalty), the rewards
    model = build_model_from(config.model, tp=config.parallel.tp, pp=config.parallel.pp)
    check_vocab(tokenizer, model)
    check_online_model(model)
    reference = frozen_copy(model) if kl_coef > 0 else None
    rewards = build_rewards(config.reward, pad_token_id=tokenizer.pad_token_id or 0)
    # loss
    forward_step = policy_forward_step(
        reinforce.policy_loss_config(), temperature=generation.temperature, max_new_tokens=generation.max_new_tokens
    )
    # loop: the policy's run (resumed) with its engine
    online = OnlineRun(
        config,
        model,
        loader,
        tokenizer,
        rewards,
        val_prompts,
        rollouts_per_step=reinforce.prompts_per_step * group_size,
        epochs=reinforce.epochs,
        recompute_old_logprobs=reinforce.recompute_old_logprobs,
    )
    sampling = generation.sampling()
    with online:
        stream = prompt_stream(loader)
        while not online.run.done:
            timer = PhaseTimer()
            prompts = next(stream)
            with timer("generate"):
                rollouts = online.generate(prompts, sampling)
            with timer("score"):
                scores = score_rollouts(rewards, tokenizer, prompts, rollouts)
            metrics = {**scores.metrics, **average_over_data_parallel(rollout_metrics(rollouts))}
            batch = training_rows(
                rollouts, pad_token_id=online.engine.pad_token_id, pad_to_multiple_of=config.data.pad_to_multiple_of
            )
            micro_batches = split_rows(
                batch, config.trainer.micro_batch_size, pad_to_multiple_of=config.data.pad_to_multiple_of
            )
            with timer("logprobs"):
                # the KL in the reward needs the rollout policy's log-probs before the update
                metrics.update(online.logprobs(reference, batch, micro_batches, old_needed=reference is not None))
            shaped = scores.total
            if reference is not None:
                shaped, kl_metrics = kl_in_reward(
                    scores.total,
                    batch["old_logprobs"],
                    batch["ref_logprobs"],
                    batch["loss_mask"],
                    kl_coef=kl_coef,
                    estimator=reinforce.kl_estimator,
                    reduction=reinforce.kl_reduction,
                )
                metrics.update(average_over_data_parallel({name: v.item() for name, v in kl_metrics.items()}))
            valid = batch["is_end"] if reinforce.setting("baseline_valid_only") else None
            batch["advantages"] = rloo_advantages(shaped, group_size, valid=valid)
            if reinforce.setting("mask_unfinished"):
                batch["loss_mask"] = mask_unfinished(batch["loss_mask"], batch["is_end"])
            local = {
                "rewards_with_kl_mean": shaped.float().mean().item(),
                "advantage_abs_mean": batch["advantages"].abs().mean().item(),
            }
            metrics.update(average_over_data_parallel(local))
            with timer("train"):
                metrics.update(online.update(batch, forward_step))
            online.end_step(metrics, timer)
        online.run.finish()
    return online.run


RECIPE = cli.Recipe("reinforce", "REINFORCE with a leave-one-out baseline, and RLOO", ReinforceRunConfig, run)


def main(argv: Sequence[str] | None = None) -> None:
    cli.main(RECIPE, argv)


if __name__ == "__main__":
    main()
