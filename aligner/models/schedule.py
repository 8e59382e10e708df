"""megatron's pipeline schedule over a model's micro-batches: the forward (and backward) of every step.

    collected = forward_only(model, micro_batches, collect_step)   # frozen passes: reference, reward model, old policy

:func:`run_schedule` is what the trainer's ``train_step`` and ``evaluate``
(:mod:`aligner.trainers.step`) run; :func:`forward_only` runs a model without
gradient at any pipeline size, for any caller (the trainer's log-prob passes,
a frozen reward model).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from torch import Tensor

from aligner.data.collate import to_device

Batch = dict[str, Any]
CollectStep = Callable[[Batch, torch.nn.Module], tuple[Tensor, Callable[[Tensor], Any]]]


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def run_schedule(model, micro_batches: list[Batch], forward_step, forward_only: bool, collect_non_loss_data=False):
    """megatron's schedule over the micro-batches; what the last stage's loss functions returned."""
    device = next(model.parameters()).device
    batches = [to_device(batch, device) for batch in micro_batches]

    def megatron_forward_step(data_iterator, model):
        return forward_step(next(data_iterator), model)

    first = batches[0]["input_ids"]
    return get_forward_backward_func()(
        forward_step_func=megatron_forward_step,
        data_iterator=iter(batches),
        model=[model],
        num_microbatches=len(batches),
        seq_length=first.shape[1],
        micro_batch_size=first.shape[0],
        forward_only=forward_only,
        collect_non_loss_data=collect_non_loss_data,
    )


def forward_only(model: torch.nn.Module, micro_batches: list[Batch], collect_step: CollectStep) -> list[Any] | None:
    """Run ``model`` without gradient over ``micro_batches`` (any pipeline size); a collective of its stages.

    ``collect_step(batch, model) -> (output, collect)`` is a forward step whose
    ``collect(output)`` returns anything (the reference's log-probs, values, ...);
    it runs on the last pipeline stage. ``model`` keeps its train/eval mode.

    Returns:
        ``[collect(output) per micro-batch]`` on the last pipeline stage, None on the others.
    """
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        _unwrap(model).config.variable_seq_lengths = True

    def step(batch, model):
        output, collect = collect_step(batch, model)
        return output, lambda output, non_loss_data=True: collect(output)

    collected = run_schedule(model, micro_batches, step, forward_only=True, collect_non_loss_data=True)
    return list(collected) if parallel_state.is_pipeline_last_stage() else None
