"""PPO with a critic (NeMo-Aligner's RLHF algorithm): actor, critic, frozen reference and rewards in one job.

    torchrun --nproc_per_node=2 -m aligner.recipes.ppo --config configs/ppo_tiny.yaml

The actor and the critic are two train states (own optimizers and schedules) of one
run, checkpointed and resumed together with the KL controller, the prompt position
and the sampling stream. On a GPU, ``ppo.offload_frozen`` keeps the reference and the
reward models in CPU memory outside their passes and ``ppo.offload_optimizer`` moves
both optimizers' states and gradient buffers out while the engine generates
(:mod:`aligner.trainers.offload`).

A step (one rollout batch):

1. ``ppo.prompts_per_step`` prompts (over all data-parallel ranks), each drawn
   ``ppo.samples_per_prompt`` times by the engine with the current weights.
2. Scores: the ``reward.terms`` summed (reward models and/or functions).
3. Forward-only passes: the rollout policy's log-probs (the ratio's old ones
   and the KL's), the reference's, and the critic's values, all in the rollout
   rows' layout.
4. Token rewards: ``-kl_coef * kl_t`` on every response token (k1 or abs) plus
   the score on the last one (:func:`aligner.algorithms.ppo.ppo_token_rewards`),
   ``kl_coef`` from the fixed or adaptive KL controller (checkpointed).
5. GAE (the fused ``gae`` op; ``gamma``, ``lam``, ``gae_mask_mode``) gives the
   advantages and the critic's returns; advantages are whitened over the
   data-parallel group.
6. ``ppo.epochs`` passes over the batch in mini-batches of
   ``trainer.global_batch_size`` rollouts: the critic on the clipped value loss,
   then (after ``critic_warmup_steps``) the actor on the clipped policy loss.
7. The KL controller moves, the engine is refit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from megatron.core import parallel_state

from aligner import cli
from aligner.algorithms.policy_gradient import AGGREGATIONS, PolicyLossConfig, mask_unfinished
from aligner.algorithms.ppo import KL_IN_REWARD_ESTIMATORS, KLController, ppo_token_rewards, whiten_over_group
from aligner.config import ConfigError, OptimConfig, RunConfig
from aligner.generation.config import GenerationConfig
from aligner.models.loading import build_model_from, check_vocab, frozen_copy
from aligner.ops import gae
from aligner.ops.rl import GAE_MASK_MODES
from aligner.parallel import initialize
from aligner.rewards.combine import build_rewards
from aligner.rewards.config import RewardConfig
from aligner.rewards.model import RewardModelScorer, load_reward_model
from aligner.trainers.offload import gpu_resident, offload_frozen, optimizer_off_gpu
from aligner.trainers.online import (
    OnlineRun,
    average_over_data_parallel,
    check_online_model,
    check_rollout_batch,
    load_online_prompts,
    policy_forward_step,
    value_forward_step,
)
from aligner.trainers.rollouts import (
    PhaseTimer,
    fit_width,
    prompt_stream,
    rollout_metrics,
    score_rollouts,
    split_rows,
    token_values,
    training_rows,
)
from aligner.trainers.run import Run, run_length
from aligner.trainers.state import build_train_state

CRITIC_INITS = ("reward_model", "policy")


@dataclass
class PPOConfig:
    """PPO's rollouts, targets and losses (NeMo-Aligner's defaults).

    Attributes:
        prompts_per_step: distinct prompts per step over all data-parallel ranks.
        samples_per_prompt: responses drawn per prompt.
        epochs: PPO epochs over each rollout batch (each: one optimizer step per trainer.global_batch_size).
        critic_init: reward_model (the critic starts from critic_checkpoint, an rm recipe checkpoint) or policy
            (from the policy's weights, with a new value head).
        critic_checkpoint: the rm checkpoint the critic starts from; null: the first reward-model term's.
        critic_lr: the critic's learning rate (null: optim.lr); its schedule is optim's.
        critic_warmup_steps: steps that train the critic only, before the actor starts.
        kl_coef: the KL penalty's weight in the token rewards (the adaptive controller's start); 0: no reference.
        kl_estimator: k1 or abs (NeMo-Aligner's use_absolute_kl).
        kl_target: the adaptive controller's target KL (per response, summed over tokens); null: fixed kl_coef.
        kl_horizon: the adaptive controller's horizon, in samples.
        gamma, lam: GAE's discount and lambda.
        gae_mask_mode: zero (NeMo-Aligner) or carry_forward (veRL) at masked positions.
        whiten_advantages: whiten the advantages over the data-parallel batch.
        clip_eps: the ratio is clipped to [1 - clip_eps, 1 + clip_eps_high].
        clip_eps_high: the upper clip (null: clip_eps).
        dual_clip: c > 1 bounds the loss of negative advantages; null: off.
        value_clip: the critic's values move at most this far from their rollout-time values; null: no clip.
        entropy_coef: weight of an entropy bonus in the actor loss.
        mask_unfinished: responses that never ended get no actor gradient (the critic still learns their values).
        aggregation: the actor loss's aggregation (token-mean, ...).
        offload_frozen: on a GPU, keep the reference and the reward models in CPU memory except during their
            passes (saves 2 bytes per bf16 parameter of each on every GPU; costs a host-device copy per pass).
        offload_optimizer: on a GPU, move the actor's and the critic's optimizer states and gradient buffers to
            CPU memory while the engine generates (saves ~16 bytes per trained parameter with bf16 training, less
            with the distributed optimizer's sharding, for the KV cache).
    """

    prompts_per_step: int = 8
    samples_per_prompt: int = 1
    epochs: int = 1
    critic_init: str = "reward_model"
    critic_checkpoint: str | None = None
    critic_lr: float | None = None
    critic_warmup_steps: int = 0
    kl_coef: float = 0.01
    kl_estimator: str = "abs"
    kl_target: float | None = None
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    gae_mask_mode: str = "zero"
    whiten_advantages: bool = True
    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    dual_clip: float | None = None
    value_clip: float | None = 0.2
    entropy_coef: float = 0.0
    mask_unfinished: bool = False
    aggregation: str = "token-mean"
    offload_frozen: bool = False
    offload_optimizer: bool = False

    def __post_init__(self) -> None:
        for name in ("prompts_per_step", "samples_per_prompt", "epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ppo.{name} must be >= 1, got {getattr(self, name)}")
        if self.critic_init not in CRITIC_INITS:
            raise ConfigError(f"ppo.critic_init must be one of {CRITIC_INITS}, got {self.critic_init!r}")
        if self.kl_estimator not in KL_IN_REWARD_ESTIMATORS:
            raise ConfigError(f"ppo.kl_estimator must be one of {KL_IN_REWARD_ESTIMATORS}, got {self.kl_estimator!r}")
        if self.gae_mask_mode not in GAE_MASK_MODES:
            raise ConfigError(f"ppo.gae_mask_mode must be one of {GAE_MASK_MODES}, got {self.gae_mask_mode!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"ppo.aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"ppo.{name} must be in [0, 1], got {getattr(self, name)}")
        try:
            self.controller()
            self.policy_loss_config()
        except ValueError as error:
            raise ConfigError(f"ppo: {error}") from None

    def controller(self) -> KLController:
        """A new KL controller at ``kl_coef`` (adaptive with ``kl_target``)."""
        return KLController(self.kl_coef, target=self.kl_target, horizon=self.kl_horizon)

    def policy_loss_config(self) -> PolicyLossConfig:
        """The actor's clipped loss (the KL is in the rewards, not in the loss)."""
        return PolicyLossConfig(
            eps_low=self.clip_eps,
            eps_high=self.clip_eps if self.clip_eps_high is None else self.clip_eps_high,
            dual_clip=self.dual_clip,
            aggregation=self.aggregation,
            entropy_coef=self.entropy_coef,
        )


@dataclass
class PPORunConfig(RunConfig):
    """PPO with a critic.

    Attributes:
        ppo: rollouts, targets and losses.
        generation: the rollout engine and its sampling.
        reward: the rewards summed into a rollout's score.
    """

    ppo: PPOConfig = field(default_factory=PPOConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.reward.check()
        check_rollout_batch(self, self.ppo.prompts_per_step * self.ppo.samples_per_prompt)
        if self.ppo.critic_init == "reward_model" and self.critic_checkpoint() is None:
            raise ConfigError(
                "ppo.critic_init is reward_model but no reward-model checkpoint is known: set ppo.critic_checkpoint "
                "(an rm recipe checkpoint), add a reward term with a model, or set ppo.critic_init=policy"
            )

    def critic_checkpoint(self) -> str | None:
        """The rm checkpoint the critic starts from: ``ppo.critic_checkpoint``, else the first model term's."""
        if self.ppo.critic_checkpoint is not None:
            return self.ppo.critic_checkpoint
        return next((term.model for term in self.reward.terms if term.model is not None), None)


def build_critic(config: PPORunConfig):
    """This rank's trainable critic: the reward model's weights (one output) or the policy's with a value head."""
    if config.ppo.critic_init == "policy":
        return build_model_from(config.model, num_value_outputs=1, tp=config.parallel.tp, pp=config.parallel.pp)
    critic, attributes = load_reward_model(config.critic_checkpoint())
    if attributes:
        raise ConfigError(
            f"ppo.critic_checkpoint {config.critic_checkpoint()} is a regression reward model with {len(attributes)} "
            "outputs; the critic needs one (a pairwise reward model), or set ppo.critic_init=policy"
        )
    return critic.requires_grad_(True).train()


def reward_models(rewards) -> list:
    """The frozen models among the reward terms (what ``ppo.offload_frozen`` moves)."""
    return [term.reward.model for term in rewards.terms if isinstance(term.reward, RewardModelScorer)]


def run(config: PPORunConfig) -> Run:
    """Train; returns the finished :class:`~aligner.trainers.run.Run` (``states["policy"]``, ``states["critic"]``)."""
    ppo, generation = config.ppo, config.generation
    rollouts_per_step = ppo.prompts_per_step * ppo.samples_per_prompt
    initialize(tp=config.parallel.tp, pp=config.parallel.pp, seed=config.trainer.seed)
    # data
    tokenizer, loader, val_prompts = load_online_prompts(
        config, prompts_per_step=ppo.prompts_per_step, group_size=ppo.samples_per_prompt
    )
    # models: the actor, the critic, the reference (only with a KL penalty), the rewards
    model = build_model_from(config.model, tp=config.parallel.tp, pp=config.parallel.pp)
    check_vocab(tokenizer, model)
    check_online_model(model)
    reference = frozen_copy(model) if ppo.kl_coef > 0 else None
    rewards = build_rewards(config.reward, pad_token_id=tokenizer.pad_token_id or 0)
    critic_optim = OptimConfig(**{**vars(config.optim), "lr": ppo.critic_lr or config.optim.lr})
    updates_per_step = ppo.epochs * rollouts_per_step // config.trainer.global_batch_size
    critic = build_train_state(
        build_critic(config),
        critic_optim,
        total_steps=run_length(config.trainer, loader) * updates_per_step,
        bf16=config.trainer.bf16,
    )
    controller = ppo.controller()
    references = [reference] if reference is not None else []
    frozen = [*references, *reward_models(rewards)]
    if ppo.offload_frozen:
        offload_frozen(frozen)
    # losses
    actor_step = policy_forward_step(
        ppo.policy_loss_config(), temperature=generation.temperature, max_new_tokens=generation.max_new_tokens
    )
    critic_step = value_forward_step(clip=ppo.value_clip)
    # loop: the actor's run (resumed with the critic and the KL controller) and its engine
    online = OnlineRun(
        config,
        model,
        loader,
        tokenizer,
        rewards,
        val_prompts,
        rollouts_per_step=rollouts_per_step,
        epochs=ppo.epochs,
        extra_states={"critic": critic},
        stateful={"kl_controller": controller},
    )
    sampling = generation.sampling()
    pad = config.data.pad_to_multiple_of
    dp_group = parallel_state.get_data_parallel_group()
    with online:
        stream = prompt_stream(loader)
        while not online.run.done:
            timer = PhaseTimer()
            prompts = next(stream)
            with timer("generate"), optimizer_off_gpu([online.state, critic], enabled=ppo.offload_optimizer) as moved:
                rollouts = online.generate(prompts, sampling)
            with timer("score"), gpu_resident(reward_models(rewards), enabled=ppo.offload_frozen):
                scores = score_rollouts(rewards, tokenizer, prompts, rollouts)
            metrics = {**scores.metrics, **average_over_data_parallel(rollout_metrics(rollouts))}
            if ppo.offload_optimizer:
                metrics["offloaded_optimizer_gib"] = moved / 2**30
            batch = training_rows(rollouts, pad_token_id=online.engine.pad_token_id, pad_to_multiple_of=pad)
            micro_batches = split_rows(batch, config.trainer.micro_batch_size, pad_to_multiple_of=pad)
            with timer("logprobs"), gpu_resident(references, enabled=ppo.offload_frozen):
                # the KL in the rewards needs the rollout policy's log-probs before any update
                metrics.update(online.logprobs(reference, batch, micro_batches, old_needed=True))
                values = token_values(critic.ddp_model, micro_batches)
                batch["old_values"] = fit_width(values, batch["input_ids"].shape[1])
            mask = batch["loss_mask"]
            ref = batch.get("ref_logprobs", batch["old_logprobs"])  # no reference: no KL
            token_rewards, reward_metrics = ppo_token_rewards(
                scores.total, batch["old_logprobs"], ref, mask, kl_coef=controller.value, estimator=ppo.kl_estimator
            )
            advantages, returns = gae(
                token_rewards, batch["old_values"], mask, gamma=ppo.gamma, lam=ppo.lam, mask_mode=ppo.gae_mask_mode
            )
            if ppo.whiten_advantages:
                advantages = whiten_over_group(advantages, mask, group=dp_group)
            batch["advantages"], batch["returns"] = advantages, returns
            actor_batch = batch  # the critic learns the value of every response; the actor maybe not of unfinished
            if ppo.mask_unfinished:
                actor_batch = {**batch, "loss_mask": mask_unfinished(mask, batch["is_end"])}
            local = {name: value.item() for name, value in reward_metrics.items()}
            metrics.update(average_over_data_parallel({**local, "kl_coef": controller.value}))
            with timer("train"):
                critic_metrics = online.update(batch, critic_step, state=critic)
                metrics.update({f"critic_{name}": value for name, value in critic_metrics.items()})
                if online.run.step >= ppo.critic_warmup_steps:
                    metrics.update(online.update(actor_batch, actor_step))
            controller.update(metrics["kl_sum"], n_steps=rollouts_per_step)
            online.end_step(metrics, timer)
        online.run.finish()
    return online.run


RECIPE = cli.Recipe("ppo", "PPO with a critic (actor, critic, reference, reward model)", PPORunConfig, run)


def main(argv: Sequence[str] | None = None) -> None:
    cli.main(RECIPE, argv)


if __name__ == "__main__":
    main()
