"""What an online recipe sets up around its loop: the checks, the rollout engine, validation rollouts.

check_rollout_batch(config, rollouts_per_step)         # before anything is read
check_online_model(model)                              # no dropout: the ratio against the old policy is exact
engine = build_engine(model, tokenizer, config.generation)
engine.refit(model, version=state.step)                # after resume and after every update
run.log_validation(validate_rollouts(engine, val_prompts, rewards, tokenizer, config.generation, seed))
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from aligner.algorithms.policy_gradient import PolicyLossConfig, loss_sum_and_count, policy_loss
from aligner.algorithms.ppo import value_loss
from aligner.config import ConfigError
from aligner.data.prompts import PromptBatch, PromptDataset, PromptLoader, load_prompts, make_prompt_loader
from aligner.data.splits import tokenizer_for
from aligner.data.tokenizer import stop_token_ids
from aligner.generation.base import Engine, Rollouts, SamplingParams
from aligner.generation.config import GenerationConfig
from aligner.models.lm_head import lm_hidden_states, lm_token_logprobs
from aligner.rewards.combine import CombinedReward
from aligner.trainers.rollouts import (
    PhaseTimer,
    SamplingGenerator,
    fit_width,
    policy_updates,
    rollout_metrics,
    score_rollouts,
    token_logprobs,
)
from aligner.trainers.run import Run, run_length
from aligner.trainers.state import TrainState, build_train_state
from aligner.trainers.step import ForwardStep, weighted_metrics

# Metrics of this rank's rollouts that are reduced over the data-parallel group by max, not mean.
_MAXIMA = ("response_length_max",)


def check_rollout_batch(config: Any, rollouts_per_step: int) -> None:
    """The rollout batch splits into optimizer steps of ``trainer.global_batch_size`` rollouts.

    Raises:
        ConfigError: it does not, or ``data.max_length`` leaves the prompt no room beside
            ``generation.max_new_tokens``.
    """
    batch = config.trainer.global_batch_size
    if rollouts_per_step % batch:
        raise ConfigError(
            f"trainer.global_batch_size ({batch} rollouts per optimizer step) must divide the "
            f"{rollouts_per_step} rollouts of a step (prompts per step x samples per prompt)"
        )
    if config.data.max_length <= config.generation.max_new_tokens:
        raise ConfigError(
            f"data.max_length ({config.data.max_length}, prompt + response tokens) must exceed "
            f"generation.max_new_tokens ({config.generation.max_new_tokens}): prompts get the difference"
        )


def check_online_model(model: torch.nn.Module) -> None:
    """Refuse dropout: the old-policy and reference passes and the update must see one function.

    Raises:
        ConfigError: ``hidden_dropout`` or ``attention_dropout`` is not 0.
    """
    config = model.config
    if config.hidden_dropout or config.attention_dropout:
        raise ConfigError(
            f"online RL needs a model without dropout (hidden_dropout={config.hidden_dropout}, "
            f"attention_dropout={config.attention_dropout}): the ratio against the old policy and the KL to the "
            "reference would be noise; set model.config.hidden_dropout=0 and model.config.attention_dropout=0"
        )


def build_engine(model: torch.nn.Module, tokenizer: Any, generation: GenerationConfig) -> Engine:
    """The rollout engine ``generation.backend`` names, over ``model``'s weights (refit it before generating).

    The torch engine generates with ``model`` itself under tensor parallelism (a refit only
    records the version); under pipeline parallelism with a full-depth copy on every rank that
    each refit fills from ``model``'s stages. The megatron engine generates with ``model``
    itself (CUDA and tensor parallelism only) through megatron-core's inference forward and KV
    cache, sized by ``generation.megatron_max_batch_size`` / ``megatron_max_sequence_length``.
    """
    from aligner.generation.refit import build_engine_model
    from aligner.generation.torch_engine import TorchEngine

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if generation.backend == "megatron":
        from aligner.generation.megatron_engine import MegatronEngine

        return MegatronEngine(
            model,
            eos_token_id=stop_token_ids(tokenizer),
            pad_token_id=pad,
            vocab_size=model.aligner_config.vocab_size,
            detokenize=tokenizer.decode,
            max_batch_size=generation.megatron_max_batch_size,
            max_sequence_length=generation.megatron_max_sequence_length,
        )
    return TorchEngine(
        build_engine_model(model),
        eos_token_id=stop_token_ids(tokenizer),
        pad_token_id=pad,
        vocab_size=model.aligner_config.vocab_size,
        detokenize=tokenizer.decode,
    )


def average_over_data_parallel(metrics: dict[str, float]) -> dict[str, float]:
    """This rank's metrics averaged over the data-parallel group (``*_max`` ones: the maximum); a collective."""
    if parallel_state.get_data_parallel_world_size() == 1:
        return metrics
    names = sorted(metrics)
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    values = torch.tensor([metrics[name] for name in names], dtype=torch.float64, device=device)
    maxima = torch.tensor([name in _MAXIMA for name in names], device=device)
    group = parallel_state.get_data_parallel_group()
    summed, largest = values.clone(), values.clone()
    dist.all_reduce(summed, group=group)
    dist.all_reduce(largest, op=dist.ReduceOp.MAX, group=group)
    averaged = torch.where(maxima, largest, summed / parallel_state.get_data_parallel_world_size())
    return dict(zip(names, averaged.tolist(), strict=True))


def validate_rollouts(
    engine: Engine,
    prompts: PromptDataset,
    rewards: CombinedReward,
    tokenizer: Any,
    generation: GenerationConfig,
    seed: int,
) -> dict[str, float]:
    """One response per validation prompt (greedy, or drawn with a fixed seed), scored; a collective.

    Each data-parallel rank takes every ``dp``-th prompt. Returns the reward metrics over all
    prompts and the rollouts' length and ``is_end`` statistics.

    Raises:
        ValueError: fewer validation prompts than data-parallel ranks.
    """
    dp_size = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    if len(prompts) < dp_size:
        raise ValueError(f"{len(prompts)} validation prompts for {dp_size} data-parallel ranks: give at least one each")
    loader = PromptLoader(prompts, prompts_per_step=dp_size, dp_size=dp_size, dp_rank=dp_rank, shuffle=False)
    batch = loader.batch(range(dp_rank, len(prompts), dp_size))
    sampling = generation.sampling(greedy=generation.val_greedy, seed=seed + dp_rank)
    rollouts = engine.generate(batch.prompt_ids, sampling)
    scores = score_rollouts(rewards, tokenizer, batch, rollouts)
    return {**scores.metrics, **average_over_data_parallel(rollout_metrics(rollouts))}


def rollout_logprobs(
    state: TrainState,
    reference: torch.nn.Module | None,
    batch: dict[str, torch.Tensor],
    micro_batches: list[dict[str, torch.Tensor]],
    *,
    temperature: float,
    old: bool = True,
) -> dict[str, float]:
    """Put the rollout policy's (``old_logprobs``) and the reference's (``ref_logprobs``) log-probs in ``batch``.

    Forward-only passes over ``micro_batches`` (the rows of ``batch``), at the sampling
    temperature. Returns ``policy_entropy``: the rollout policy's mean entropy over the
    trained tokens, averaged over the data-parallel group (a collective). With ``old`` False
    the rollout policy's pass is left out (see :meth:`OnlineRun.needs_old_logprobs`; the
    update's forward then reports ``policy_entropy``) and nothing is returned.
    """
    width = batch["input_ids"].shape[1]
    if reference is not None:
        ref, _ = token_logprobs(reference, micro_batches, temperature=temperature)
        batch["ref_logprobs"] = fit_width(ref, width)
    if not old:
        return {}
    old_logprobs, entropy = token_logprobs(state.ddp_model, micro_batches, temperature=temperature, entropy=True)
    batch["old_logprobs"] = fit_width(old_logprobs, width)
    mask = batch["loss_mask"]
    mean_entropy = (fit_width(entropy, width) * mask).sum().item() / max(mask.sum().item(), 1.0)
    return average_over_data_parallel({"policy_entropy": mean_entropy})


def policy_forward_step(policy: PolicyLossConfig, *, temperature: float, max_new_tokens: int) -> ForwardStep:
    """The update's ``forward_step``: :func:`~aligner.algorithms.policy_gradient.policy_loss` of a micro-batch.

    The batch holds the rollout rows (:func:`~aligner.trainers.rollouts.training_rows`) with
    ``advantages``, ``old_logprobs`` and, when there is a reference, ``ref_logprobs`` (the KL is then
    reported, and added to the loss with ``policy.kl_coef > 0``). The policy's log-probs are taken at
    the sampling ``temperature``; its entropy when the loss has an entropy bonus. A batch without
    ``old_logprobs`` is the rollout policy's own single update (:meth:`OnlineRun.needs_old_logprobs`):
    the old log-probs are this forward's, detached (the ratio is exactly 1), and its entropy is
    reported as ``policy_entropy``.
    """

    def forward_step(batch, model):
        hidden = lm_hidden_states(model, batch["input_ids"])

        def loss_func(hidden):
            on_policy = "old_logprobs" not in batch
            with_entropy = policy.entropy_coef > 0 or on_policy
            out = lm_token_logprobs(
                model,
                hidden,
                batch["labels"],
                temperature=temperature,
                return_entropy=with_entropy,
                labelled_only=True,  # the loss and the metric read the entropy of response tokens only
            )
            logprobs, entropy = out if with_entropy else (out, None)
            mask = batch["loss_mask"]
            loss_sum, count, metrics = policy_loss(
                logprobs,
                logprobs.detach() if on_policy else batch["old_logprobs"],
                batch["advantages"],
                mask,
                policy,
                ref_logprobs=batch.get("ref_logprobs"),
                entropy=entropy,
                generation_logprobs=batch["generation_logprobs"],
                max_length=max_new_tokens,
            )
            if on_policy:
                metrics["policy_entropy"] = metrics["entropy"] if policy.entropy_coef > 0 else metrics.pop("entropy")
            return loss_sum, count, weighted_metrics(metrics, mask.sum())

        return hidden, loss_func

    return forward_step


def value_forward_step(*, clip: float | None) -> ForwardStep:
    """A critic update's ``forward_step``: :func:`~aligner.algorithms.ppo.value_loss`, token-mean over the batch.

    The batch holds the rollout rows with ``old_values`` (the critic's at rollout time) and
    ``returns`` (GAE's), aligned with ``loss_mask`` (:func:`~aligner.trainers.rollouts.token_values`' layout).
    """

    def forward_step(batch, model):
        output = model(batch["input_ids"], None, None)  # [B, S, 1] on the last stage

        def loss_func(values):
            mask = batch["loss_mask"]
            per_token, metrics = value_loss(
                values[..., 0].float(), batch["old_values"], batch["returns"], mask, clip=clip
            )
            loss_sum, count = loss_sum_and_count(per_token, mask, "token-mean")
            return loss_sum, count, weighted_metrics(metrics, mask.sum())

        return output, loss_func

    return forward_step


def load_online_prompts(config: Any, *, prompts_per_step: int, group_size: int):
    """``(tokenizer, loader, val_prompts)``: the run's tokenizer, its resumable prompt loader, the validation prompts.

    Prompts get ``data.max_length - generation.max_new_tokens`` tokens at most (longer ones follow
    ``data.over_length``); ``val_prompts`` is None without ``data.val``.
    """
    tokenizer = tokenizer_for(config.model, config.data)
    prompt_length = config.data.max_length - config.generation.max_new_tokens
    prompts = load_prompts(config.data.train, tokenizer, config.data, max_prompt_length=prompt_length)
    val_prompts = None
    if config.data.val is not None:
        split = config.data.split_for("val")
        val_prompts = load_prompts(
            config.data.val, tokenizer, config.data, max_prompt_length=prompt_length, split=split
        )
    loader = make_prompt_loader(
        prompts, prompts_per_step=prompts_per_step, group_size=group_size, seed=config.trainer.seed
    )
    return tokenizer, loader, val_prompts


class OnlineRun:
    """An online recipe's trained policy, run and engine: built, resumed, and the engine refit to the weights.

    Args:
        config: the recipe's run config (``trainer``, ``optim``, ``generation``, ``data`` are read).
        model: this rank's policy shard with its initial weights (a checkpoint replaces them on resume).
        loader: the prompt loader (registered as the run's ``data``).
        tokenizer, rewards: for validation rollouts.
        val_prompts: validation prompts, or None.
        rollouts_per_step: rollouts of a step over all data-parallel ranks.
        epochs: passes over each rollout batch.
        recompute_old_logprobs: always run the forward-only pass of the rollout policy's log-probs
            (see :meth:`needs_old_logprobs`).
        extra_states: more train states of the run (e.g. PPO's ``critic``), saved and resumed with the policy.
        stateful: objects with ``state_dict`` / ``load_state_dict`` checkpointed with the run (e.g. a KL controller).

    Attributes:
        state, run, engine, sampling_rng: the train state (``policy``), the resumed run, the engine at
            the resumed weights, the engine's checkpointed random stream.
        validate: ``validate()`` -> validation metrics, or None without validation prompts.
    """

    def __init__(
        self,
        config: Any,
        model: torch.nn.Module,
        loader: PromptLoader,
        tokenizer: Any,
        rewards: CombinedReward,
        val_prompts: PromptDataset | None,
        *,
        rollouts_per_step: int,
        epochs: int,
        recompute_old_logprobs: bool = False,
        extra_states: dict[str, TrainState] | None = None,
        stateful: dict[str, Any] | None = None,
    ) -> None:
        dp_size = parallel_state.get_data_parallel_world_size()
        self.config = config
        self.epochs = epochs
        self.recompute_old_logprobs = recompute_old_logprobs
        self.mini_batch_rows = config.trainer.global_batch_size // dp_size
        updates_per_step = epochs * rollouts_per_step // config.trainer.global_batch_size
        steps = run_length(config.trainer, loader)
        self.state = build_train_state(
            model, config.optim, total_steps=steps * updates_per_step, bf16=config.trainer.bf16
        )
        self.run = Run(config, {"policy": self.state, **(extra_states or {})}, total_steps=steps, data=loader)
        self.sampling_rng = SamplingGenerator(config.trainer.seed, next(model.parameters()).device)
        self.run.register("sampling_rng", self.sampling_rng, per_rank=True)  # each data-parallel replica's own
        for name, obj in (stateful or {}).items():
            self.run.register(name, obj)
        self.run.resume()
        self.engine = build_engine(model, tokenizer, config.generation)
        self.engine.refit(model, version=self.state.step)
        self.validate = None
        if val_prompts is not None:
            self.validate = functools.partial(
                validate_rollouts, self.engine, val_prompts, rewards, tokenizer, config.generation, config.trainer.seed
            )

    def __enter__(self) -> OnlineRun:
        """Enter the run; a fresh run with validation validates the starting point (logged at step 0)."""
        self.run.__enter__()
        if self.validate is not None and self.config.trainer.val_every and self.run.step == 0:
            self.run.log_validation(self.validate())
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.run.__exit__(*exc_info)

    def generate(self, prompts: PromptBatch, sampling: SamplingParams) -> Rollouts:
        """This rank's rollouts of ``prompts`` with the current weights (a stale engine is an error).

        The engine is woken for the generation and put to sleep after it, so that on a GPU its KV
        cache does not stay allocated through scoring and training.
        """
        with self.engine.awake():
            return self.engine.generate(
                prompts.prompt_ids, sampling, expected_version=self.state.step, generator=self.sampling_rng.generator
            )

    def needs_old_logprobs(self, batch: dict[str, torch.Tensor]) -> bool:
        """Whether the update of ``batch`` needs a forward-only pass for the rollout policy's log-probs.

        Not when the update is one optimizer step over the whole batch (one epoch, the batch within
        one mini-batch) and ``recompute_old_logprobs`` is off: that step's forward runs the rollout
        policy itself (the weights the engine generated with, no dropout), so its log-probs, detached,
        are the old ones, as in TRL and veRL; the pass would cost a forward over every rollout.
        """
        rows = batch["input_ids"].shape[0]
        return self.recompute_old_logprobs or self.epochs > 1 or rows > self.mini_batch_rows

    def logprobs(
        self,
        reference: torch.nn.Module | None,
        batch: dict[str, torch.Tensor],
        micro_batches: list[dict[str, torch.Tensor]],
        *,
        old_needed: bool = False,
    ) -> dict[str, float]:
        """:func:`rollout_logprobs` of ``batch`` at the sampling temperature: the reference's, and the rollout
        policy's where the update needs them (:meth:`needs_old_logprobs`) or ``old_needed`` (e.g. for a KL in
        the reward)."""
        old = old_needed or self.needs_old_logprobs(batch)
        temperature = self.config.generation.temperature
        return rollout_logprobs(self.state, reference, batch, micro_batches, temperature=temperature, old=old)

    def update(
        self, batch: dict[str, torch.Tensor], forward_step: ForwardStep, *, state: TrainState | None = None
    ) -> dict[str, float]:
        """``epochs`` passes over ``batch`` in mini-batches of ``trainer.global_batch_size`` rollouts (over ranks).

        ``state``: the train state to update, the policy's by default (PPO passes its critic).
        """
        return policy_updates(
            self.state if state is None else state,
            batch,
            forward_step,
            mini_batch_rows=self.mini_batch_rows,
            micro_batch_size=self.config.trainer.micro_batch_size,
            epochs=self.epochs,
            pad_to_multiple_of=self.config.data.pad_to_multiple_of,
        )

    def end_step(self, metrics: dict[str, float], timer: PhaseTimer) -> None:
        """Refit the engine to the updated weights, count the step, validate and checkpoint on the run's cadence."""
        with timer("refit"):
            metrics["refit_s"] = self.engine.refit(self.state.model, version=self.state.step)
        metrics.update(timer.metrics())
        self.run.end_step(metrics)
        if self.validate is not None and self.run.should_validate:
            self.run.log_validation(self.validate())
        self.run.save_if_due()
