"""SPIN, self-play fine-tuning (NeMo-Aligner's): the SFT model learns to prefer the data's responses to its own.

    torchrun --nproc_per_node=2 -m aligner.recipes.spin --config configs/spin_tiny.yaml "spin.beta=[0.2,0.1,0.05]"

Data: SFT jsonl (``{"input", "output"}``, ``{"prompt", "response"}`` or ``{"messages": [...]}``), encoded
as the SFT recipe encodes it: each record's last trained assistant turn is its real response, the
tokens before it (with the generation prompt) its prompt. The run is ``spin.iterations`` iterations
of ``trainer.max_epochs`` epochs over the data each (``trainer.max_steps``, when set, caps the whole
run). An iteration:

1. The engine (``generation.*``) answers every training prompt with the weights at the start of the
   iteration: greedily with ``spin.greedy``, else drawn from the run's checkpointed random stream;
   and every validation prompt (greedy with ``generation.val_greedy``, else from a fixed seed). A
   generated sequence is cut to ``data.max_length``, as the real ones are.
2. The same weights, the iteration's reference, give the summed log-probs of every real and generated
   response: a forward-only pass, as DPO's ``precompute`` (no second model is held).
3. Steps over the pairs (real = chosen, generated = rejected) on
   :func:`aligner.algorithms.spin.spin_loss` with the iteration's beta, plus ``spin.sft_weight`` times
   the real responses' NLL; a step's loss is the mean over the global batch's pairs. One optimizer and
   learning-rate schedule run through all iterations.
4. The trained weights become the next iteration's generator and reference.

Resume: the current iteration's generated responses and reference log-probs are saved with every
checkpoint (one int64 per generated token and two floats per pair), so a run resumed mid-iteration
trains on exactly the pairs it had; one resumed at an iteration's end generates the next iteration
from the restored weights and random stream, as the uninterrupted run did.

Validation (every ``trainer.val_every`` steps, at the end of every iteration, and at the start of a
fresh run; ``val_every: 0`` never): the ``data.val`` records paired with the responses of the
iteration's reference, through the same loss: ``loss``, the rewards, ``accuracy`` and ``margin``
against that reference, and ``sft_loss``, the real responses' token-mean NLL (for single-turn data
exactly the SFT recipe's validation loss).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import Tensor

from aligner import cli
from aligner.algorithms.dpo import SFT_AVERAGES, sft_term, split_pairs
from aligner.algorithms.logprobs import sum_per_sequence
from aligner.algorithms.spin import spin_loss
from aligner.config import ConfigError, RunConfig
from aligner.data import EncodedDataset, EncodedSequence, GlobalBatchLoader, PreferenceExample
from aligner.data.splits import load_splits, make_loaders
from aligner.generation.base import Engine, SamplingParams
from aligner.generation.config import GenerationConfig
from aligner.models.lm_head import lm_hidden_states, lm_token_logprobs
from aligner.models.loading import build_model_from, check_vocab
from aligner.parallel import gather_over_data_parallel, initialize
from aligner.trainers.online import build_engine
from aligner.trainers.reference import Annotated, precompute_sequence_logprobs
from aligner.trainers.rollouts import PhaseTimer, SamplingGenerator
from aligner.trainers.run import Run
from aligner.trainers.state import TrainState, build_train_state
from aligner.trainers.step import ForwardStep, evaluate, train_step, weighted_metrics

log = logging.getLogger("aligner")


@dataclass
class SPINConfig:
    """Self-play iterations and the loss.

    Attributes:
        iterations: self-play iterations (NeMo-Aligner's max_iterations, T in the paper); each generates with
            the weights at its start, which are also its reference.
        beta: inverse temperature of the loss (NeMo-Aligner's ref_policy_kl_penalty): a number, or a list of
            one per iteration.
        greedy: generate the training responses greedily (else sampled at generation.temperature, top_k, top_p).
        rollout_batch_size: prompts per engine call on each data-parallel rank.
        sft_weight: weight of an added NLL term on the real responses (0: none).
        sft_average: the NLL term per token (mean over each response) or sum.
    """

    iterations: int = 3
    beta: Any = 0.2
    greedy: bool = False
    rollout_batch_size: int = 64
    sft_weight: float = 0.0
    sft_average: str = "token"

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise ConfigError(f"spin.iterations must be >= 1, got {self.iterations}")
        if self.rollout_batch_size < 1:
            raise ConfigError(f"spin.rollout_batch_size must be >= 1, got {self.rollout_batch_size}")
        if self.sft_weight < 0:
            raise ConfigError(f"spin.sft_weight must be >= 0, got {self.sft_weight}")
        if self.sft_average not in SFT_AVERAGES:
            raise ConfigError(f"spin.sft_average must be one of {SFT_AVERAGES}, got {self.sft_average!r}")
        betas = list(self.beta) if isinstance(self.beta, (list, tuple)) else [self.beta]
        if not betas or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and b > 0 for b in betas):
            raise ConfigError(f"spin.beta must be a number > 0 or a list of them, one per iteration; got {self.beta!r}")
        if isinstance(self.beta, (list, tuple)):
            if len(betas) != self.iterations:
                raise ConfigError(
                    f"spin.beta lists {len(betas)} values but spin.iterations is {self.iterations}: give one beta "
                    "per iteration, or a single number for all"
                )
            self.beta = [float(b) for b in betas]
        else:
            self.beta = float(self.beta)

    def beta_at(self, iteration: int) -> float:
        """The beta of iteration ``iteration`` (0-based)."""
        return self.beta[iteration] if isinstance(self.beta, list) else self.beta


@dataclass
class SPINRunConfig(RunConfig):
    """SPIN self-play fine-tuning.

    Attributes:
        spin: the iterations and the loss.
        generation: the engine that answers the prompts, and how it draws.
    """

    spin: SPINConfig = field(default_factory=SPINConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)


def last_trained_turn(sequence: EncodedSequence) -> tuple[int, int]:
    """``(start, end)``: the token span of ``sequence``'s last trained turn (a contiguous run of the loss mask)."""
    end = max(position for position, trained in enumerate(sequence.loss_mask) if trained) + 1
    start = end - 1
    while start > 0 and sequence.loss_mask[start - 1]:
        start -= 1
    return start, end


class SelfPlayPairs:
    """A split's SFT records as SPIN pairs: the real response against the response generated this iteration.

    Indexing gives a :class:`~aligner.data.PreferenceExample` (chosen: prompt + real response; rejected:
    prompt + generated response) whose ``index`` is its position: what the preference collate, the
    loaders and :func:`~aligner.trainers.reference.precompute_sequence_logprobs` read.

    Args:
        sft: the encoded SFT split; each example's last trained turn is its real response.

    Attributes:
        prompts: each example's prompt tokens (what the engine continues).
        real: each example's prompt + real response, only the response trained.
        lengths: the real sequences' lengths (for length-grouped batches).
        generated: this iteration's response tokens per example (cut to ``max_length``), or None.
        identical: ``[N]`` bool, the generated response equals the real one token for token.
        ref_logps: ``[N, 2]`` float32 summed reference log-probs (real, generated), or None.
    """

    def __init__(self, sft: EncodedDataset) -> None:
        self.pad_token_id = sft.pad_token_id
        self.max_length = sft.max_length
        self.prompts: list[list[int]] = []
        self.real: list[EncodedSequence] = []
        for example in sft.examples:
            start, end = last_trained_turn(example.sequence)
            input_ids = example.sequence.input_ids[:end]
            self.prompts.append(input_ids[:start])
            self.real.append(EncodedSequence(input_ids, [False] * start + [True] * (end - start), start))
        self.lengths = [len(sequence) for sequence in self.real]
        self.generated: list[list[int]] | None = None
        self.identical: Tensor | None = None
        self.ref_logps: Tensor | None = None

    def __len__(self) -> int:
        return len(self.real)

    def __getitem__(self, index: int) -> PreferenceExample:
        if self.generated is None:
            raise RuntimeError("no responses generated yet: pair_with() first")
        prompt, response = self.prompts[index], self.generated[index]
        rejected = EncodedSequence(prompt + response, [False] * len(prompt) + [True] * len(response), len(prompt))
        return PreferenceExample(self.real[index], rejected, index)

    def pair_with(self, responses: Sequence[Sequence[int]]) -> None:
        """Take one generated response per example (cut to ``max_length`` with its prompt); clears ``ref_logps``."""
        self.generated = [
            list(response[: self.max_length - len(prompt)])
            for prompt, response in zip(self.prompts, responses, strict=True)
        ]
        self.identical = torch.tensor(
            [
                real.input_ids[real.prompt_length :] == generated
                for real, generated in zip(self.real, self.generated, strict=True)
            ],
            dtype=torch.bool,
        )
        self.ref_logps = None

    def state_dict(self) -> dict[str, Tensor | None]:
        """The generated tokens (flat, with their lengths) and the reference log-probs."""
        if self.generated is None:
            return {"tokens": None, "lengths": None, "ref_logps": None}
        return {
            "tokens": torch.tensor([token for response in self.generated for token in response], dtype=torch.long),
            "lengths": torch.tensor([len(response) for response in self.generated], dtype=torch.long),
            "ref_logps": self.ref_logps,
        }

    def load_state_dict(self, state: dict[str, Tensor | None]) -> None:
        if state["tokens"] is None:
            self.generated = self.identical = self.ref_logps = None
            return
        self.pair_with([part.tolist() for part in torch.split(state["tokens"], state["lengths"].tolist())])
        self.ref_logps = state["ref_logps"]


class Iteration:
    """Which iteration the pairs belong to, and the pairs: checkpointed with the run (``run.register``)."""

    def __init__(self, train: SelfPlayPairs, val: SelfPlayPairs | None) -> None:
        self.number: int | None = None  # 0-based; None before the first generation
        self.train = train
        self.val = val

    def state_dict(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "train": self.train.state_dict(),
            "val": None if self.val is None else self.val.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.number = state["number"]
        self.train.load_state_dict(state["train"])
        if self.val is not None:
            self.val.load_state_dict(state["val"])


def with_pair_fields(loader: GlobalBatchLoader, pairs: SelfPlayPairs) -> Annotated:
    """``loader`` whose micro-batches also carry ``ref_logps`` ``[2B]`` (real rows, then generated) and
    ``identical`` ``[B]``, read from ``pairs`` when the step is drawn (so always the current iteration's)."""

    def annotate(micro_batches: list[dict]) -> list[dict]:
        return [
            {
                **batch,
                "ref_logps": pairs.ref_logps[batch["index"]].T.reshape(-1),
                "identical": pairs.identical[batch["index"]],
            }
            for batch in micro_batches
        ]

    return Annotated(loader, annotate)


def generate_responses(
    engine: Engine,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingParams,
    *,
    version: int,
    generator: torch.Generator,
    batch_size: int,
) -> tuple[list[list[int]], dict[str, float]]:
    """One response per prompt (the data-parallel ranks share the prompts); a collective.

    Returns:
        ``(responses, metrics)``: every prompt's response tokens on every rank, and
        ``response_length_mean`` / ``is_end_fraction`` over all of them.
    """
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    rows = list(range(dp_rank, len(prompts), dp_size))
    drawn: dict[int, tuple[list[int], bool]] = {}
    with engine.awake():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            rollouts = engine.generate(
                [prompts[row] for row in chunk], sampling, expected_version=version, generator=generator
            )
            for row, tokens, prompt_length, length, is_end in zip(
                chunk,
                rollouts.tokens.tolist(),
                rollouts.prompt_lengths.tolist(),
                rollouts.lengths.tolist(),
                rollouts.is_end.tolist(),
                strict=True,
            ):
                drawn[row] = (tokens[prompt_length:length], is_end)
    drawn = {row: entry for share in gather_over_data_parallel(drawn) for row, entry in share.items()}
    responses = [drawn[row][0] for row in range(len(prompts))]
    metrics = {
        "response_length_mean": sum(len(response) for response in responses) / len(responses),
        "is_end_fraction": sum(drawn[row][1] for row in range(len(prompts))) / len(prompts),
    }
    return responses, metrics


def start_iteration(
    number: int,
    iteration: Iteration,
    state: TrainState,
    engine: Engine,
    sampling_rng: SamplingGenerator,
    config: SPINRunConfig,
) -> dict[str, float]:
    """Steps 1-2 of an iteration (module docstring): generate with the current weights, then their log-probs.

    Returns the iteration's generation metrics (``generation_*``, ``time_generate_s``, ``time_reference_s``).
    """
    spin, generation, trainer = config.spin, config.generation, config.trainer
    timer = PhaseTimer()
    engine.refit(state.model, version=state.step)
    splits = [(iteration.train, generation.sampling(greedy=spin.greedy), sampling_rng.generator)]
    if iteration.val is not None:
        # The validation prompts are drawn from a fixed seed: every iteration's held-out pairs alike.
        val_rng = torch.Generator(device=sampling_rng.generator.device)
        val_rng.manual_seed(trainer.seed + parallel_state.get_data_parallel_rank())
        splits.append((iteration.val, generation.sampling(greedy=generation.val_greedy), val_rng))
    metrics: dict[str, float] = {}
    for pairs, sampling, generator in splits:
        with timer("generate"):
            responses, drawn = generate_responses(
                engine,
                pairs.prompts,
                sampling,
                version=state.step,
                generator=generator,
                batch_size=spin.rollout_batch_size,
            )
        pairs.pair_with(responses)
        with timer("reference"):
            pairs.ref_logps = precompute_sequence_logprobs(
                state.ddp_model,
                pairs,
                micro_batch_size=trainer.micro_batch_size,
                pad_to_multiple_of=config.data.pad_to_multiple_of,
            )
        if pairs is iteration.train:
            metrics.update({f"generation_{name}": value for name, value in drawn.items()})
            metrics["generation_identical_fraction"] = pairs.identical.double().mean().item()
    state.ddp_model.train()
    iteration.number = number
    metrics.update(timer.metrics())
    if dist.get_rank() == 0:
        log.info(
            "iteration %d of %d: %d responses generated (%.1f%% identical to the real ones) in %.1f s",
            number + 1,
            spin.iterations,
            len(iteration.train),
            100 * metrics["generation_identical_fraction"],
            metrics["time_generate_s"],
        )
    return metrics


def make_forward_step(spin: SPINConfig, beta: float) -> ForwardStep:
    """The step's ``forward_step``: (summed per-pair loss, pairs, metrics) at ``beta``.

    The batch holds preference rows (real, then generated) with ``ref_logps`` and ``identical``
    (:func:`with_pair_fields`). ``accuracy`` is weighted by the pairs that are not identical and
    ``sft_loss`` by the real responses' tokens, so both are exact over the global batch.
    """

    def forward_step(batch, model):
        hidden = lm_hidden_states(model, batch["input_ids"])  # 2B rows: real, then generated

        def loss_func(hidden: Tensor):
            sums, counts = sum_per_sequence(lm_token_logprobs(model, hidden, batch["labels"]), batch["labels"])
            real, generated = split_pairs(sums)
            ref_real, ref_generated = split_pairs(batch["ref_logps"])
            loss, metrics = spin_loss(real, generated, ref_real, ref_generated, batch["identical"], beta=beta)
            real_counts, _ = split_pairs(counts)
            if spin.sft_weight:
                nll = sft_term(real, real_counts, average=spin.sft_average)
                loss = loss + spin.sft_weight * nll
                metrics["sft_nll"] = nll.detach().mean()
            distinct, accuracy = metrics.pop("distinct_pairs"), metrics.pop("accuracy")
            pairs = real.shape[0]
            reported = weighted_metrics(metrics, pairs)
            reported["accuracy"] = torch.stack([accuracy * distinct, distinct]).double()
            reported["sft_loss"] = torch.stack([-real.detach().sum().double(), real_counts.sum().double()])
            return loss.sum(), torch.tensor(pairs), reported

        return hidden, loss_func

    return forward_step


def run(config: SPINRunConfig) -> Run:
    """Train; returns the finished :class:`~aligner.trainers.run.Run` (``summary``, ``states["policy"]``).

    Raises:
        ConfigError: what the shared sections raise (e.g. fewer records than one global batch).
    """
    spin, trainer = config.spin, config.trainer
    initialize(tp=config.parallel.tp, pp=config.parallel.pp, seed=trainer.seed)
    # data: the SFT splits as pairs, the generated side filled per iteration
    tokenizer, train, val = load_splits(config.model, config.data, "sft")
    iteration = Iteration(SelfPlayPairs(train), None if val is None else SelfPlayPairs(val))
    train_loader, val_loader = make_loaders(trainer, config.data, iteration.train, iteration.val)
    train_data = with_pair_fields(train_loader, iteration.train)
    val_data = None if val_loader is None else with_pair_fields(val_loader, iteration.val)
    # model: the policy, which is also each iteration's generator and reference
    model = build_model_from(config.model, tp=config.parallel.tp, pp=config.parallel.pp)
    check_vocab(tokenizer, model)
    steps_per_iteration = trainer.max_epochs * len(train_loader)
    total_steps = spin.iterations * steps_per_iteration
    if trainer.max_steps is not None:
        total_steps = min(total_steps, trainer.max_steps)
    state = build_train_state(model, config.optim, total_steps=total_steps, bf16=trainer.bf16)
    run = Run(config, {"policy": state}, total_steps=total_steps, data=train_data)
    sampling_rng = SamplingGenerator(trainer.seed, next(model.parameters()).device)
    run.register("sampling_rng", sampling_rng, per_rank=True)  # each data-parallel replica's own
    run.register("iteration", iteration)
    run.resume()
    engine = build_engine(model, tokenizer, config.generation)
    engine.refit(model, version=state.step)
    # loop
    with run:
        batches = run.steps(train_data)
        while not run.done:
            number = run.step // steps_per_iteration
            metrics: dict[str, float] = {}
            if iteration.number != number:
                metrics = start_iteration(number, iteration, state, engine, sampling_rng, config)
            beta = spin.beta_at(number)
            forward_step = make_forward_step(spin, beta)
            if val_data is not None and trainer.val_every and run.step == 0:
                run.log_validation(evaluate(state.ddp_model, val_data, forward_step, run.val_batches))
            metrics = {**train_step(state, next(batches), forward_step), **metrics}
            run.end_step({**metrics, "iteration": float(number + 1), "beta": beta})
            ends_iteration = run.step % steps_per_iteration == 0
            if val_data is not None and (run.should_validate or (trainer.val_every and ends_iteration)):
                run.log_validation(evaluate(state.ddp_model, val_data, forward_step, run.val_batches))
            run.save_if_due()
        run.finish()
    return run


RECIPE = cli.Recipe("spin", "SPIN self-play fine-tuning", SPINRunConfig, run)


def main(argv: Sequence[str] | None = None) -> None:
    cli.main(RECIPE, argv)


if __name__ == "__main__":
    main()
