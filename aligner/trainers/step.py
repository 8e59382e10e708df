"""One optimizer step and evaluation passes, on megatron's forward/backward schedules (any pipeline size).

An algorithm plugs in a ``forward_step``::

    def forward_step(batch, model):  # batch: one micro-batch dict on the model's device
        hidden = lm_hidden_states(model, batch["input_ids"])  # what this pipeline stage outputs

        def loss_func(hidden):  # runs on the last pipeline stage only
            token_logps = lm_token_logprobs(model, hidden, batch["labels"])
            mask = batch["labels"] != IGNORE_INDEX
            return -(token_logps * mask).sum(), mask.sum(), {}  # (loss sum, count, metrics)

        return hidden, loss_func

    metrics = train_step(state, micro_batches, forward_step)

The loss of a step is ``sum of loss_sum / sum of count`` over every micro-batch
of every data-parallel rank: megatron's per-token-loss mode
(``calculate_per_token_loss``) backpropagates the raw sums and divides the
all-reduced gradients by the global count, so splitting a global batch into
micro-batches or ranks never changes the step (no mean of means).

Metrics a ``loss_func`` returns are reduced over the global batch: a 0-dim
tensor is averaged over micro-batches (each micro-batch weighs the same); a
2-element tensor ``[numerator, denominator]`` is reported as
``sum(numerators) / sum(denominators)`` (weigh by tokens, pairs, ...):
:func:`weighted_metrics` turns batch means into such pairs.

Forward-only passes that collect outputs (reference, old-policy, reward-model
scores) are :func:`aligner.models.schedule.forward_only`, below the trainer so
that frozen scorers can run them too.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import Tensor

from aligner.models.schedule import Batch, run_schedule
from aligner.trainers.state import TrainState

LossFunc = Callable[[Tensor], tuple[Tensor, Tensor, dict[str, Tensor]]]
ForwardStep = Callable[[Batch, torch.nn.Module], tuple[Tensor, LossFunc]]

# megatron's own clipping adds this to the norm before dividing (clip_grad_by_total_norm_fp32).
_CLIP_EPS = 1.0e-6
LOSS = "loss"
TOKENS = "tokens"
RESERVED_METRICS = (LOSS, TOKENS, "count", "grad_norm", "lr", "tokens_per_s", "step_time_s")


def train_step(state: TrainState, micro_batches: list[Batch], forward_step: ForwardStep) -> dict[str, float]:
    """One optimizer step of ``state`` over this rank's ``micro_batches`` of a global batch; a collective.

    Runs megatron's forward/backward schedule over the micro-batches, reduces the
    loss and metrics over the global batch, computes the gradient norm, clips it
    to ``state.clip_grad``, steps the optimizer and the scheduler.

    Args:
        state: the trained model (:func:`aligner.trainers.state.build_train_state`).
        micro_batches: this rank's micro-batch dicts (tensors are moved to the
            model's device); every rank of a data-parallel replica gets the same.
        forward_step: ``forward_step(batch, model) -> (output, loss_func)``, see the module docstring.

    Returns:
        The same on every rank: ``loss`` (global mean), ``count`` (global units),
        ``tokens`` (real tokens), ``grad_norm`` (before clipping), ``lr`` (used by
        the step), ``tokens_per_s``, ``step_time_s`` and the algorithm's metrics.

    Raises:
        FloatingPointError: a non-finite loss or gradient norm (no update is
            made; the message names the step of ``state``).
    """
    start = time.perf_counter()
    state.ddp_model.train()
    state.ddp_model.zero_grad_buffer()
    state.optimizer.zero_grad()
    records = run_schedule(state.ddp_model, micro_batches, _recording_step(forward_step), forward_only=False)
    metrics = reduce_records(records, count_tokens(micro_batches))
    step = state.step + 1
    if not math.isfinite(metrics[LOSS]):
        raise FloatingPointError(
            f"step {step}: the loss is {metrics[LOSS]} (over {metrics['count']:.0f} units); stopping before the "
            "optimizer update. Check the data (empty or extreme rows), the learning rate and the loss inputs."
        )
    state.optimizer.prepare_grads()
    grad_norm = state.optimizer.get_grad_norm()
    if not math.isfinite(grad_norm):
        raise FloatingPointError(
            f"step {step}: the gradient norm is {grad_norm} with a finite loss {metrics[LOSS]}; stopping before "
            "the optimizer update"
        )
    _clip_gradients(state, grad_norm)
    lr = state.optimizer.param_groups[0]["lr"]
    state.optimizer.step_with_ready_grads()
    state.scheduler.step(increment=1)
    state.step = step
    elapsed = time.perf_counter() - start
    return {
        **metrics,
        "grad_norm": grad_norm,
        "lr": lr,
        "tokens_per_s": metrics[TOKENS] / elapsed,
        "step_time_s": elapsed,
    }


def _clip_gradients(state: TrainState, grad_norm: float) -> None:
    """Scale the (main) gradients so their global norm is at most ``clip_grad``, as megatron does."""
    if state.clip_grad <= 0:
        return
    coefficient = state.clip_grad / (grad_norm + _CLIP_EPS)
    if coefficient < 1.0:
        groups = state.optimizer.param_groups
        torch._foreach_mul_([p.grad for group in groups for p in group["params"] if p.grad is not None], coefficient)


@torch.no_grad()
@torch.no_grad()
def evaluate(
    model: torch.nn.Module, batches: Iterable[list[Batch]], forward_step: ForwardStep, max_steps: int | None = None
) -> dict[str, float]:
    """The loss and metrics of ``forward_step`` over ``batches`` (at most ``max_steps`` steps), without gradient.

    ``model`` is put in eval mode for the pass and back in train mode after it.
    A stateful source (a sampler with ``state_dict`` / ``load_state_dict``) is
    rewound afterwards, so that every evaluation sees the same batches.

    Returns:
        ``loss``, ``count``, ``tokens`` and the algorithm's metrics, reduced over
        every micro-batch of every rank as :func:`train_step` does.
    """
    position = batches.state_dict() if hasattr(batches, "state_dict") else None
    model.eval()
    records: list[dict[str, Tensor]] = []
    tokens = 0
    for index, micro_batches in enumerate(batches):
        if max_steps is not None and index >= max_steps:
            break
        records += run_schedule(model, micro_batches, _recording_step(forward_step), forward_only=True)
        tokens += count_tokens(micro_batches)
    model.train()
    if position is not None:
        batches.load_state_dict(position)
    return reduce_records(records, tokens)


def _recording_step(forward_step: ForwardStep) -> ForwardStep:
    def step(batch, model):
        output, loss_func = forward_step(batch, model)
        return output, _recording(loss_func)

    return step


def _recording(loss_func: LossFunc) -> LossFunc:
    """Wrap an algorithm's ``loss_func`` for megatron: check its outputs, turn metrics into sum pairs."""

    def wrapped(output: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        loss_sum, count, metrics = loss_func(output)
        if loss_sum.dim() != 0 or count.dim() != 0:
            raise ValueError(
                f"loss_func must return a 0-dim loss sum and count, got shapes {tuple(loss_sum.shape)} and "
                f"{tuple(count.shape)}"
            )
        if count.is_floating_point() or count.is_complex():
            raise TypeError(f"loss_func's count must be an integer tensor (tokens, rows, pairs), got {count.dtype}")
        record = {LOSS: torch.stack([loss_sum.detach().double(), count.double()])}
        for name, value in metrics.items():
            if name in RESERVED_METRICS:
                raise ValueError(f"metric name {name!r} is reserved by the trainer; rename it")
            value = value.detach().double()
            if value.dim() == 0:
                record[name] = torch.stack([value, torch.ones_like(value)])
            elif value.shape == (2,):
                record[name] = value
            else:
                raise ValueError(f"metric {name!r} must be 0-dim or [numerator, denominator], got {tuple(value.shape)}")
        # megatron adds the counts into an int32 total; it divides the gradients by the global total.
        return loss_sum, count.to(torch.int), record

    return wrapped


def reduce_records(records: list[dict[str, Tensor]], tokens: int) -> dict[str, float]:
    """Sum the micro-batch records over data-parallel ranks, then share them with every pipeline stage."""
    metrics = None
    if parallel_state.is_pipeline_last_stage():
        names = sorted(records[0]) if records else [LOSS]
        for record in records:
            if sorted(record) != names:
                raise ValueError(f"micro-batches returned different metrics: {sorted(record)} and {names}")
        device = records[0][LOSS].device if records else torch.device("cpu")
        pairs = torch.zeros(len(names) + 1, 2, dtype=torch.float64, device=device)
        for index, name in enumerate(names):
            for record in records:
                pairs[index] += record[name].to(pairs)
        pairs[-1] = torch.tensor([tokens, 1.0], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            pairs = pairs.cuda()
        dist.all_reduce(pairs, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        pairs = pairs.cpu()
        metrics = {}
        for index, name in enumerate(names):
            numerator, denominator = pairs[index].tolist()
            metrics[name] = numerator / denominator if denominator else numerator
        metrics["count"] = pairs[names.index(LOSS), 1].item()
        metrics[TOKENS] = pairs[-1, 0].item()
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        shared = [metrics]
        dist.broadcast_object_list(
            shared,
            src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        )
        metrics = shared[0]
    return metrics


def weighted_metrics(metrics: dict[str, Tensor], count: Tensor | int) -> dict[str, Tensor]:
    """Batch-mean metrics as ``[mean * count, count]`` pairs, so micro-batches weigh by their size.

    Metrics that are not 0-dim (per-attribute vectors) are left out.
    """
    weight = torch.as_tensor(count, dtype=torch.float64)
    return {
        name: torch.stack([value.detach().double() * weight.to(value.device), weight.to(value.device)])
        for name, value in metrics.items()
        if value.dim() == 0
    }


def count_tokens(micro_batches: list[Batch]) -> int:
    """Real (non-pad) tokens of a step on this rank: ``lengths`` when the batch has them."""
    total = 0
    for batch in micro_batches:
        total += int(batch["lengths"].sum()) if "lengths" in batch else batch["input_ids"].numel()
    return total
