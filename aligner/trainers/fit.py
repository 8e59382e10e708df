"""The loop of every offline algorithm (SFT, reward models, DPO family, KTO, SteerLM) on the shared pieces."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from aligner.trainers.run import Run
from aligner.trainers.state import TrainState
from aligner.trainers.step import ForwardStep, evaluate, train_step


def fit(
    run: Run,
    state: TrainState,
    forward_step: ForwardStep,
    train_data: Iterable[list[dict[str, Any]]],
    val_data: Iterable[list[dict[str, Any]]] | None = None,
) -> Run:
    """Train ``state`` on ``train_data`` until ``run`` is done; validate, log and checkpoint on its cadence.

    Returns:
        ``run`` (its ``summary`` holds the steps run; ``run.summary`` also holds
        the steps done so far when a step raises).
    """
    with run:
        for micro_batches in run.steps(train_data):
            run.end_step(train_step(state, micro_batches, forward_step))
            if val_data is not None and run.should_validate:
                run.log_validation(evaluate(state.ddp_model, val_data, forward_step, run.val_batches))
            run.save_if_due()
        run.finish()
    return run
