"""The pieces of an online loop: prompts -> rollouts -> rewards -> training rows -> log-prob passes -> updates.

Every online recipe (GRPO family, REINFORCE / RLOO, later PPO) composes them::

    stream = prompt_stream(loader)                      # PromptBatches over epochs, resumable through the loader
    rollouts = engine.generate(batch.prompt_ids, sampling, expected_version=state.step, generator=rng.generator)
    scores = score_rollouts(rewards, tokenizer, batch, rollouts)
    batch = training_rows(rollouts, pad_token_id=..., pad_to_multiple_of=...)  # input_ids, labels, loss_mask, ...
    micro = split_rows(batch, micro_batch_size)
    batch["old_logprobs"], entropy = token_logprobs(state.ddp_model, micro, temperature=T)
    ...                                                 # the algorithm's advantages into batch
    metrics = policy_updates(state, batch, forward_step, micro_batch_size=..., mini_batch_size=..., epochs=...)
    engine.refit(state.model, version=state.step)

Token layout: a training row is the rollout's tokens; ``labels[b, t]`` is
``tokens[b, t + 1]`` where that token is a response token and -100 elsewhere,
so column ``t`` of every per-token tensor (``labels``, ``loss_mask``, the
engine's ``generation_logprobs``, the trainer's log-probs) scores token
``t + 1``: the layout of :class:`aligner.generation.base.Rollouts.logprobs`.

Nothing here knows an algorithm: advantages, losses and their settings belong
to the recipe.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import Tensor

from aligner.data.collate import padded_width
from aligner.data.prompts import PromptBatch, PromptLoader
from aligner.generation.base import Rollouts
from aligner.models.lm_head import lm_hidden_states, lm_token_logprobs
from aligner.models.schedule import forward_only
from aligner.ops import IGNORE_INDEX
from aligner.rewards.combine import CombinedReward, RewardScores
from aligner.rewards.inputs import RewardInputs
from aligner.trainers.state import TrainState
from aligner.trainers.step import ForwardStep, train_step

# Metrics whose mean over a step's updates would mislead: the extremes and the last value are reported.
_MIN_METRICS = ("ratio_min",)
_MAX_METRICS = ("ratio_max",)
_LAST_METRICS = ("lr",)
_SUMMED_METRICS = ("count", "tokens", "step_time_s")


def prompt_stream(loader: PromptLoader) -> Iterator[PromptBatch]:
    """The loader's batches, epoch after epoch, from its current position (a resumed loader continues).

    Raises:
        ValueError: an epoch that yields no batch.
    """
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("the prompt loader yielded no batch in an epoch: give more prompts than one step takes")


class SamplingGenerator:
    """The random stream of the engine's draws on this rank, checkpointed with the run (``run.register``).

    Seeded with ``seed + data-parallel rank``: the ranks of one tensor-parallel group draw alike (the
    engine keeps them in step), data-parallel replicas draw differently.
    """

    def __init__(self, seed: int, device: torch.device | str = "cpu") -> None:
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed + parallel_state.get_data_parallel_rank())

    def state_dict(self) -> dict[str, Tensor]:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.generator.set_state(state["state"])


class PhaseTimer:
    """Wall time per phase of a step: ``with timer("generate"): ...``; :meth:`metrics` gives ``time_<phase>_s``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        return {f"time_{phase}_s": seconds for phase, seconds in self.seconds.items()}


def response_texts(tokenizer: Any, rollouts: Rollouts) -> list[str]:
    """Each rollout's response decoded, special tokens (eos, end of turn) left out."""
    return [
        tokenizer.decode(row[start:end].tolist(), skip_special_tokens=True)
        for row, start, end in zip(
            rollouts.tokens, rollouts.prompt_lengths.tolist(), rollouts.lengths.tolist(), strict=True
        )
    ]


def score_rollouts(rewards: CombinedReward, tokenizer: Any, prompts: PromptBatch, rollouts: Rollouts) -> RewardScores:
    """The rewards of ``rollouts`` (one per row of ``prompts``); metrics over the data-parallel group; a collective."""
    inputs = RewardInputs(
        prompts=prompts.prompts,
        responses=response_texts(tokenizer, rollouts),
        extras=prompts.extras,
        tokens=rollouts.tokens,
        lengths=rollouts.lengths,
        is_end=rollouts.is_end,
    )
    return rewards.score(inputs, group=parallel_state.get_data_parallel_group())


def rollout_metrics(rollouts: Rollouts) -> dict[str, float]:
    """Response length (mean, max), ``is_end`` fraction, stop reasons and the engine's throughput."""
    responses = (rollouts.lengths - rollouts.prompt_lengths).double()
    metrics = {
        "response_length_mean": responses.mean().item(),
        "response_length_max": responses.max().item(),
        "is_end_fraction": rollouts.is_end.double().mean().item(),
        "truncated_fraction": 1.0 - rollouts.is_end.double().mean().item(),
    }
    for name in ("generate_s", "tokens_per_s", "response_tokens"):
        if name in rollouts.metrics:
            metrics[f"generation_{name}"] = rollouts.metrics[name]
    return metrics


def training_rows(rollouts: Rollouts, *, pad_token_id: int, pad_to_multiple_of: int | None = None) -> dict[str, Tensor]:
    """Rollouts as one training batch (module docstring layout), ``W`` columns (the longest row, padded).

    Returns:
        ``input_ids [B, W]``, ``labels [B, W]`` (response tokens, -100 elsewhere),
        ``loss_mask [B, W]`` (float, 1 on response tokens), ``generation_logprobs [B, W]``
        (the engine's, 0 elsewhere), ``lengths``, ``prompt_lengths``, ``is_end`` ``[B]``.
    """
    rows, columns = rollouts.tokens.shape
    width = padded_width(rollouts.lengths.tolist(), pad_to_multiple_of)
    input_ids = torch.full((rows, width), pad_token_id, dtype=torch.long)
    input_ids[:, :columns] = rollouts.tokens.cpu()
    mask = torch.zeros(rows, width, dtype=torch.bool)
    mask[:, : columns - 1] = rollouts.response_mask.cpu()
    next_tokens = torch.full((rows, width), IGNORE_INDEX, dtype=torch.long)
    next_tokens[:, : width - 1] = input_ids[:, 1:]
    generation = torch.zeros(rows, width, dtype=torch.float32)
    generation[:, : columns - 1] = rollouts.logprobs.cpu().float()
    return {
        "input_ids": input_ids,
        "labels": torch.where(mask, next_tokens, IGNORE_INDEX),
        "loss_mask": mask.float(),
        "generation_logprobs": torch.where(mask, generation, 0.0),
        "lengths": rollouts.lengths.cpu(),
        "prompt_lengths": rollouts.prompt_lengths.cpu(),
        "is_end": rollouts.is_end.cpu(),
    }


def split_rows(
    batch: dict[str, Tensor], rows_per_part: int, *, pad_to_multiple_of: int | None = None
) -> list[dict[str, Tensor]]:
    """``batch`` cut into consecutive parts of ``rows_per_part`` rows, each trimmed to its own longest row.

    Per-token tensors (``[B, W]``, the width of ``input_ids``) lose the columns past a part's
    longest row (rounded up to ``pad_to_multiple_of``); per-row tensors are sliced.

    Raises:
        ValueError: the rows do not divide into parts of ``rows_per_part``.
    """
    rows, width = batch["input_ids"].shape
    if rows_per_part < 1 or rows % rows_per_part:
        raise ValueError(f"{rows} rows do not split into parts of {rows_per_part}")
    parts = []
    for start in range(0, rows, rows_per_part):
        stop = start + rows_per_part
        part_width = min(width, padded_width(batch["lengths"][start:stop].tolist(), pad_to_multiple_of))
        part = {}
        for name, value in batch.items():
            per_token = value.dim() == 2 and value.shape[1] == width
            part[name] = value[start:stop, :part_width] if per_token else value[start:stop]
        parts.append(part)
    return parts


def _share_from_last_stage(tensor: Tensor | None, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """The last pipeline stage's ``tensor`` on every stage (other stages pass None)."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return tensor
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    shared = tensor.to(device) if tensor is not None else torch.empty(shape, dtype=dtype, device=device)
    dist.broadcast(
        shared,
        src=parallel_state.get_pipeline_model_parallel_last_rank(),
        group=parallel_state.get_pipeline_model_parallel_group(),
    )
    return shared.cpu()


@torch.no_grad()
def token_logprobs(
    model: torch.nn.Module, micro_batches: list[dict[str, Tensor]], *, temperature: float = 1.0, entropy: bool = False
) -> tuple[Tensor, Tensor | None]:
    """The model's per-token log-probs of the ``labels`` (and entropy) over ``micro_batches``, rows joined.

    A forward-only pass (any pipeline size, never the ``[B, T, V]`` logits) in eval mode (the
    model's mode is restored); the results reach every pipeline stage.

    Returns:
        ``(logprobs, entropy)``: ``[B, W]`` float32 with ``W`` the widest micro-batch, 0 where
        ``labels`` is -100; ``entropy`` (of the labelled positions, 0 elsewhere) or None.
    """

    def collect_step(batch, model):
        hidden = lm_hidden_states(model, batch["input_ids"])

        def collect(hidden):
            out = lm_token_logprobs(
                model, hidden, batch["labels"], temperature=temperature, return_entropy=entropy, labelled_only=True
            )
            return tuple(t.float().cpu() for t in out) if entropy else (out.float().cpu(),)

        return hidden, collect

    outputs = _forward_rows(model, micro_batches, collect_step, 2 if entropy else 1)
    return outputs[0], (outputs[1] if entropy else None)


@torch.no_grad()
def token_values(model: torch.nn.Module, micro_batches: list[dict[str, Tensor]]) -> Tensor:
    """A critic's value at every position over ``micro_batches``, rows joined: ``[B, W]`` float32.

    ``values[b, t]`` is the value of the state after ``input_ids[b, :t + 1]``, the column where the
    log-prob of token ``t + 1`` sits (the rollout rows' layout); a forward-only pass of the value
    model (``num_value_outputs=1``; any pipeline size) in eval mode, reaching every pipeline stage.
    """

    def collect_step(batch, model):
        output = model(batch["input_ids"], None, None)  # [B, S, 1] on the last stage

        def collect(values):
            return (values[..., 0].float().cpu(),)

        return output, collect

    return _forward_rows(model, micro_batches, collect_step, 1)[0]


def _forward_rows(model: torch.nn.Module, micro_batches: list[dict[str, Tensor]], collect_step, outputs: int):
    """``outputs`` ``[B, W]`` float32 tensors that ``collect_step`` gives per micro-batch, rows joined, widths fitted
    to the widest micro-batch, on every pipeline stage; the model runs forward-only in eval mode (its mode restored)."""
    was_training = model.training
    model.eval()
    try:
        collected = forward_only(model, micro_batches, collect_step)
    finally:
        model.train(was_training)
    rows = sum(batch["input_ids"].shape[0] for batch in micro_batches)
    width = max(batch["input_ids"].shape[1] for batch in micro_batches)
    joined_outputs = []
    for index in range(outputs):
        joined = None
        if collected is not None:
            joined = torch.cat([fit_width(part[index], width) for part in collected])
        joined_outputs.append(_share_from_last_stage(joined, (rows, width), torch.float32))
    return joined_outputs


def fit_width(tensor: Tensor, width: int) -> Tensor:
    """``[B, W']`` padded with zeros or cut to ``width`` columns."""
    if tensor.shape[1] >= width:
        return tensor[:, :width]
    return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]))


def policy_updates(
    state: TrainState,
    batch: dict[str, Tensor],
    forward_step: ForwardStep,
    *,
    mini_batch_rows: int,
    micro_batch_size: int,
    epochs: int = 1,
    pad_to_multiple_of: int | None = None,
) -> dict[str, float]:
    """``epochs`` passes over ``batch`` in mini-batches of ``mini_batch_rows`` rows, one optimizer step each.

    A mini-batch without a trained token over the data-parallel group (every response masked,
    e.g. none ended and unfinished ones are left out) makes no step and is counted in
    ``skipped_updates``.

    Returns:
        The steps' metrics combined: means, except ``ratio_min`` / ``ratio_max`` (extremes), ``lr``
        (the last step's), ``count`` / ``tokens`` / ``step_time_s`` (sums); plus ``updates`` and
        ``skipped_updates``. Without any step: ``loss`` and ``grad_norm`` 0.
    """
    steps = []
    skipped = 0
    for _ in range(epochs):
        for mini_batch in split_rows(batch, mini_batch_rows):
            if _trained_tokens(mini_batch) == 0:
                skipped += 1  # nothing to learn from (every response masked): no step, rather than 0 / 0
                continue
            micro_batches = split_rows(mini_batch, micro_batch_size, pad_to_multiple_of=pad_to_multiple_of)
            steps.append(train_step(state, micro_batches, forward_step))
    metrics = combine_update_metrics(steps) if steps else {"loss": 0.0, "grad_norm": 0.0, "updates": 0.0}
    metrics["skipped_updates"] = float(skipped)
    return metrics


def _trained_tokens(mini_batch: dict[str, Tensor]) -> int:
    """The mini-batch's trained tokens over the data-parallel group (a collective)."""
    count = mini_batch["loss_mask"].sum().reshape(1).double()
    if dist.get_backend() == "nccl":
        count = count.cuda()
    dist.all_reduce(count, group=parallel_state.get_data_parallel_group())
    return int(count.item())


def combine_update_metrics(steps: list[dict[str, float]]) -> dict[str, float]:
    """Metrics of several optimizer steps as one (see :func:`policy_updates`)."""
    combined: dict[str, float] = {"updates": float(len(steps))}
    for name in steps[0]:
        values = [step[name] for step in steps]
        if name in _MIN_METRICS:
            combined[name] = min(values)
        elif name in _MAX_METRICS:
            combined[name] = max(values)
        elif name in _LAST_METRICS:
            combined[name] = values[-1]
        elif name in _SUMMED_METRICS:
            combined[name] = sum(values)
        else:
            combined[name] = sum(values) / len(values)
    if combined.get("step_time_s"):
        combined["tokens_per_s"] = combined["tokens"] / combined["step_time_s"]
    return combined
