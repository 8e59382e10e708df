"""The loop of every offline algorithm (SFT, reward models, DPO family, KTO, SteerLM) on the shared pieces."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from aligner.trainers.run import Run, run_length
from aligner.trainers.state import TrainState, build_train_state
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


def fit_model(
    config: Any,
    model: Any,
    forward_step: ForwardStep,
    train_data: Iterable[list[dict[str, Any]]],
    val_data: Iterable[list[dict[str, Any]]] | None = None,
    *,
    name: str = "policy",
    uniform_loss: float | None = None,
) -> Run:
    """Train one model the way every offline recipe does: its train state, the run (resumed), then :func:`fit`.

    Args:
        config: the run's :class:`aligner.config.RunConfig`.
        model: this rank's model shard, with its initial weights (a checkpoint replaces them on resume).
        forward_step, train_data, val_data: as in :func:`fit`.
        name: the train state's name in checkpoints.
        uniform_loss: see :class:`aligner.trainers.run.Run` (``ln(vocab_size)`` for token-NLL losses).

    Returns:
        The finished run (``summary``, ``states[name]``).
    """
    steps = run_length(config.trainer, train_data)
    state = build_train_state(model, config.optim, total_steps=steps, bf16=config.trainer.bf16)
    run = Run(config, {name: state}, total_steps=steps, data=train_data, uniform_loss=uniform_loss)
    run.resume()
    return fit(run, state, forward_step, train_data, val_data)
