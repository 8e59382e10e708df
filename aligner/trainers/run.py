"""The run: resume, the cadence (log / validate / save / stop), the metric sinks and the progress bar.

A recipe's loop, offline or online, is::

    run = Run(config, {"policy": state}, total_steps=steps, data=train_loader)
    run.resume()                       # from checkpoint.dir's latest, if any
    with run:                          # closes the progress bar and sinks, also on error
        for micro_batches in run.steps(train_loader):
            metrics = train_step(state, micro_batches, forward_step)
            run.end_step(metrics)       # history, progress bar, sinks every trainer.log_every
            if run.should_validate:
                run.log_validation(evaluate(state.ddp_model, val_loader, forward_step, run.val_batches))
            run.save_if_due()           # every checkpoint.save_every, never the last step
        run.finish()                    # the last checkpoint and the Hugging Face export

Anything with ``state_dict()`` / ``load_state_dict()`` that a resumed run needs
(a sampler's position, a KL controller) is :meth:`Run.register`-ed and saved
with the train states.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from aligner.checkpoint import load_checkpoint, save_checkpoint
from aligner.checkpoint.folder import acquire_lock, check_writable, release_lock
from aligner.checkpoint.integrity import newest_intact_checkpoint, verify_checkpoint
from aligner.checkpoint.layout import checkpoints_newest_first
from aligner.config import ConfigError, TrainerConfig
from aligner.trainers.logging import MetricsLogger
from aligner.trainers.state import TrainState

log = logging.getLogger("aligner")


@dataclass
class TrainSummary:
    """What a run did (the same on every rank).

    Attributes:
        history: one dict per step run by this process: ``step``, ``loss``
            (global token/unit mean), ``count`` (global units), ``grad_norm``
            (before clipping), ``lr`` (used by the step), ``tokens``,
            ``tokens_per_s``, ``step_time_s`` and the algorithm's metrics.
        val_history: one dict per validation: ``step``, ``loss``, ``count``,
            ``tokens`` and the algorithm's metrics.
        step: steps done in total (a resumed run counts the earlier ones).
        checkpoint: the last checkpoint written or loaded, if any.
    """

    history: list[dict[str, float]] = field(default_factory=list)
    val_history: list[dict[str, float]] = field(default_factory=list)
    step: int = 0
    checkpoint: Path | None = None


def run_length(trainer: TrainerConfig, train_data: Iterable) -> int:
    """The run's steps: ``min(max_steps, max_epochs * steps per epoch)`` (either alone when the other is unknown).

    Raises:
        ConfigError: ``train_data`` has no length and ``trainer.max_steps`` is not set.
    """
    if isinstance(train_data, Sized):
        epoch_steps = trainer.max_epochs * len(train_data)
        return epoch_steps if trainer.max_steps is None else min(trainer.max_steps, epoch_steps)
    if trainer.max_steps is None:
        raise ConfigError("the training data has no length: set trainer.max_steps")
    return trainer.max_steps


class Run:
    """Owns a run's progress: its step, resume, cadence, checkpoints, metric sinks and summary.

    Args:
        config: the run's configuration (:class:`aligner.config.RunConfig`; its
            ``trainer``, ``checkpoint`` and ``logging`` sections are read, the
            whole is saved with checkpoints and recorded in wandb).
        states: the trained models by name (checkpointed and exported together).
        total_steps: the run's length (:func:`run_length`).
        data: the training data source, registered as ``data`` (its position is
            checkpointed); it needs ``state_dict`` / ``load_state_dict`` when
            checkpointing.
        uniform_loss: a language model's loss when it predicts the uniform
            distribution, ``ln(vocab_size)`` (token-NLL losses); a loss that sits
            there for ``trainer.divergence_patience`` steps stops the run. None: no such check.

    With ``checkpoint.dir`` set, the folder is checked before step 1 (a collective):
    writable, free space for one more checkpoint, and not in use by another run
    (:mod:`aligner.checkpoint.folder`; the lock is released by :meth:`finish`).

    Raises:
        ConfigError: checkpointing with a data source that has no state,
            ``checkpoint.export_hf_at_end`` without a language model among ``states``,
            or a checkpoint folder that is not writable, too full or in use.
    """

    def __init__(
        self,
        config: Any,
        states: dict[str, TrainState],
        *,
        total_steps: int,
        data: Any = None,
        uniform_loss: float | None = None,
    ) -> None:
        self.config = config
        self.trainer: TrainerConfig = config.trainer
        self.checkpointing = config.checkpoint.dir is not None
        self.states = states
        self.total_steps = total_steps
        self.step = 0
        self.summary = TrainSummary()
        self._registered: dict[str, Any] = {}
        self._per_rank: dict[str, Any] = {}
        self._saved_step: int | None = None
        self._logger: MetricsLogger | None = None
        if config.checkpoint.export_hf_at_end and not any(state.is_language_model for state in states.values()):
            raise ConfigError("checkpoint.export_hf_at_end writes causal language models; this run trains none")
        if data is not None:
            self.register("data", data)
        dp_size = parallel_state.get_data_parallel_world_size(with_context_parallel=True)
        denominator = self.trainer.micro_batch_size * dp_size
        if self.trainer.global_batch_size % denominator:
            raise ConfigError(
                f"trainer.global_batch_size ({self.trainer.global_batch_size}) must be divisible by "
                f"micro_batch_size * data-parallel size = {self.trainer.micro_batch_size} * {dp_size}"
            )
        self.micro_batches_per_step = self.trainer.global_batch_size // denominator
        self._dp_size = dp_size
        self.is_logging_rank = (
            parallel_state.is_pipeline_last_stage()
            and parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0
        )
        self._guard = DivergenceGuard(self.trainer.divergence_patience, uniform_loss)
        self._lock: Path | None = None
        if self.checkpointing:
            self._prepare_checkpoint_dir()

    def _prepare_checkpoint_dir(self) -> None:
        """Writable, room for a checkpoint, locked for this run: checked on rank 0, the verdict shared."""
        # Weights plus two fp32 Adam moments (plus fp32 main weights for half-precision models), once per replica.
        local = sum(
            param.numel() * (param.element_size() + (12 if param.element_size() < 4 else 8))
            for state in self.states.values()
            for param in state.model.parameters()
        )
        total = torch.tensor([float(local)], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            total = total.cuda()
        dist.all_reduce(total)
        needed = int(total.item() / self._dp_size)
        verdict: list[Any] = [None]
        if dist.get_rank() == 0:
            root = Path(self.config.checkpoint.dir)
            try:
                check_writable(root, needed)
                self._lock = acquire_lock(root)
            except ConfigError as error:
                verdict = [str(error)]
        dist.broadcast_object_list(verdict, src=0)
        if verdict[0] is not None:
            raise ConfigError(verdict[0])

    def register(self, name: str, stateful: Any, *, per_rank: bool = False) -> None:
        """Save ``stateful.state_dict()`` with every checkpoint and restore it on resume.

        A state that is the same on every rank is written once (rank 0's); one that differs
        between ranks (``per_rank``, e.g. a data-parallel replica's random stream) is written by
        every rank beside its RNG states and, like them, restored only at the layout that wrote
        it (at another layout it keeps its fresh state, as the RNG streams do).

        Raises:
            ConfigError: checkpointing is on and ``stateful`` has no state.
            ValueError: ``name`` is taken.
        """
        if name in self._registered or name in self._per_rank:
            raise ValueError(f"{name!r} is registered already")
        if self.checkpointing and not (hasattr(stateful, "state_dict") and hasattr(stateful, "load_state_dict")):
            raise ConfigError(f"checkpointing needs {name} with state_dict() and load_state_dict() to resume it")
        (self._per_rank if per_rank else self._registered)[name] = stateful

    # ------------------------------------------------------------------------------------- resume

    def resume(self) -> Path | None:
        """Load the checkpoint to resume from, if any; a collective.

        ``checkpoint.resume_from`` when set (it must be intact), else, with
        ``checkpoint.resume``, the newest intact checkpoint of ``checkpoint.dir``:
        a damaged one (a file missing, truncated or altered against its manifest)
        is reported by path and file and the one before it is tried. The resume is
        logged with its step and path.

        Returns:
            The checkpoint loaded, or None (nothing to resume: a fresh run).

        Raises:
            aligner.checkpoint.integrity.CorruptCheckpointError: ``resume_from`` is damaged.
            FileNotFoundError: ``resume_from`` is not a checkpoint or a root with one.
        """
        section = self.config.checkpoint
        if not self.checkpointing or (section.resume_from is None and not section.resume):
            return None
        if section.resume_from is not None:
            candidates = checkpoints_newest_first(section.resume_from)
            chosen = Path(section.resume_from) if (Path(section.resume_from) / "meta.json").is_file() else None
            chosen = chosen or (candidates[0] if candidates else None)
            if chosen is None:
                raise FileNotFoundError(f"checkpoint.resume_from {section.resume_from} holds no checkpoint")
            verify_checkpoint(chosen)
        else:
            shared = [checkpoints_newest_first(section.dir) if dist.get_rank() == 0 else None]
            dist.broadcast_object_list(shared, src=0)
            chosen = newest_intact_checkpoint(shared[0])
            if chosen is None:
                return None
        run_state = load_checkpoint(chosen, self.states)
        self.step = run_state["step"]
        for name, state in self.states.items():
            state.step = run_state["state_steps"][name]
        for name, stateful in self._registered.items():
            stateful.load_state_dict(run_state["registered"][name])
        rank_state = run_state["rank_state"]
        for name, stateful in self._per_rank.items():
            if name in rank_state:
                stateful.load_state_dict(rank_state[name])
        self._saved_step = self.step if Path(chosen).parent == Path(section.dir) else None
        self.summary.step, self.summary.checkpoint = self.step, Path(chosen)
        if dist.get_rank() == 0:
            log.info("resumed from step %d of %d (%s)", self.step, self.total_steps, chosen)
        return Path(chosen)

    # ------------------------------------------------------------------------------------- cadence

    def __enter__(self) -> Run:
        self._logger = MetricsLogger(
            self.config.logging,
            total_steps=self.total_steps,
            initial_step=self.step,
            enabled=self.is_logging_rank,
            run_config=self.config,
        )
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._logger is not None:
            self._logger.close()
            self._logger = None

    @property
    def data(self) -> Any:
        """The training data source registered as ``data`` (None if there is none)."""
        return self._registered.get("data")

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps

    def steps(self, train_data: Iterable[list[Any]]) -> Iterator[list[Any]]:
        """This rank's micro-batches of each remaining step, over as many epochs of ``train_data`` as it takes.

        Raises:
            ValueError: a step with the wrong number of micro-batches, or an epoch without a step.
        """
        while not self.done:
            empty_epoch = True
            for micro_batches in train_data:
                empty_epoch = False
                if len(micro_batches) != self.micro_batches_per_step:
                    raise ValueError(
                        f"step {self.step + 1}: got {len(micro_batches)} micro-batches, expected "
                        f"global_batch_size / (micro_batch_size * dp) = {self.trainer.global_batch_size} / "
                        f"({self.trainer.micro_batch_size} * {self._dp_size}) = {self.micro_batches_per_step}"
                    )
                yield micro_batches
                if self.done:
                    return
            if empty_epoch:
                raise ValueError(
                    f"the training data yielded no step at step {self.step} of {self.total_steps}; each pass over "
                    "it must yield an epoch"
                )

    def end_step(self, metrics: dict[str, float]) -> None:
        """Count a finished step: its metrics go to the history, the progress bar and, on cadence, the sinks."""
        self.step += 1
        self.summary.step = self.step
        self.summary.history.append({"step": self.step, **metrics})
        self._guard.check(self.step, metrics)
        logger = self._active_logger()
        logger.advance()
        if self.step % self.trainer.log_every == 0 or self.done:
            logger.log(self.step, metrics, "train")

    @property
    def should_validate(self) -> bool:
        """Validate now: every ``trainer.val_every`` steps and at the last step (never when it is 0)."""
        every = self.trainer.val_every
        return bool(every) and (self.step % every == 0 or self.done)

    @property
    def val_batches(self) -> int | None:
        return self.trainer.val_batches

    def log_validation(self, metrics: dict[str, float]) -> None:
        self.summary.val_history.append({"step": self.step, **metrics})
        self._active_logger().log(self.step, metrics, "val")

    def log_metrics(self, metrics: dict[str, float], prefix: str) -> None:
        """Send any other metrics (rollouts, timings) to the sinks at the current step."""
        self._active_logger().log(self.step, metrics, prefix)

    def save_if_due(self) -> None:
        """Checkpoint every ``checkpoint.save_every`` steps (the last step is saved by :meth:`finish`)."""
        every = self.config.checkpoint.save_every
        if self.checkpointing and every and self.step % every == 0 and not self.done:
            self.save()

    def finish(self) -> TrainSummary:
        """The last checkpoint and, with ``checkpoint.export_hf_at_end``, the Hugging Face export; a collective."""
        if self.checkpointing:
            self.save()
            if self.config.checkpoint.export_hf_at_end:
                self.export_hf(Path(self.config.checkpoint.dir) / "hf")
            if self._lock is not None:
                release_lock(self._lock)
        return self.summary

    # ------------------------------------------------------------------------------------- outputs

    def save(self) -> Path:
        """Checkpoint the current step under ``checkpoint.dir`` (a collective); returns its directory.

        A step that is already checkpointed (just saved or resumed from) is not written again.
        """
        if not self.checkpointing:
            raise ValueError("checkpoint.dir is not set")
        if self._saved_step != self.step:
            run_state = {
                "step": self.step,
                "state_steps": {name: state.step for name, state in self.states.items()},
                "registered": {name: stateful.state_dict() for name, stateful in self._registered.items()},
            }
            self.summary.checkpoint = save_checkpoint(
                self.config.checkpoint.dir,
                self.step,
                self.states,
                run_state,
                keep_last=self.config.checkpoint.keep_last,
                run_config=self.config,
                rank_state={name: stateful.state_dict() for name, stateful in self._per_rank.items()},
            )
            self._saved_step = self.step
        return self.summary.checkpoint

    def export_hf(self, out_dir: str | Path) -> None:
        """Write the language-model states as Hugging Face checkpoints (a collective).

        One language model goes to ``out_dir``; several to ``out_dir/<name>``.
        Each export keeps the architecture class, token ids and dtype of
        ``model.hf_path`` (when the run imported one) and holds the run's tokenizer
        (``data.tokenizer``, else ``model.hf_path``'s), with the chat template's
        end-of-turn token among its eos ids; so a recipe chained on the export
        with ``model.hf_path`` alone finds the tokenizer there.
        """
        from aligner.models.hf import export_hf

        model_source = getattr(self.config, "model", None)
        source = getattr(model_source, "hf_path", None)
        tokenizer = getattr(getattr(self.config, "data", None), "tokenizer", None) or source
        models = {name: state.model for name, state in self.states.items() if state.is_language_model}
        for name, model in models.items():
            export_hf(model, out_dir if len(models) == 1 else Path(out_dir) / name, source=source, tokenizer=tokenizer)

    def report(self, name: str) -> str:
        """The run's outcome in one line: steps, first/last training loss, last validation, checkpoint."""
        summary = self.summary
        parts = [f"{name}: {summary.step} steps"]
        losses = [step["loss"] for step in summary.history if "loss" in step]  # PPO's critic warm-up has none
        if losses:
            parts.append(f"train loss {losses[0]:.4g} -> {losses[-1]:.4g}")
        if summary.val_history:
            shown = {k: v for k, v in summary.val_history[-1].items() if k not in ("step", "count", "tokens")}
            parts.append("val " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(shown.items())))
        if summary.checkpoint is not None:
            parts.append(f"checkpoint {summary.checkpoint}")
        return "; ".join(parts)

    def _active_logger(self) -> MetricsLogger:
        if self._logger is None:
            raise RuntimeError("use the run as a context manager (with run: ...) around its loop")
        return self._logger


class DivergenceGuard:
    """Stops a run that is not learning: a gradient norm of exactly 0, or a loss at the uniform value, N steps in a row.

    Args:
        patience: consecutive steps that trip it (0: off).
        uniform_loss: ``ln(vocab_size)`` for token-NLL losses, else None (that check is off).
    """

    # A random initialization sits within a few 1e-3 of ln(V); a collapsed model's uniform logits give it to
    # float precision.
    UNIFORM_RTOL = 1e-4

    def __init__(self, patience: int, uniform_loss: float | None) -> None:
        self.patience = patience
        self.uniform_loss = uniform_loss
        self.zero_grad_steps = 0
        self.uniform_steps = 0

    def check(self, step: int, metrics: dict[str, float]) -> None:
        """Count this step; raise when a count reaches ``patience``.

        Raises:
            FloatingPointError: the message names the step and what was seen.
        """
        if not self.patience:
            return
        self.zero_grad_steps = self.zero_grad_steps + 1 if metrics.get("grad_norm") == 0.0 else 0
        uniform = self.uniform_loss is not None and math.isclose(
            metrics["loss"], self.uniform_loss, rel_tol=self.UNIFORM_RTOL
        )
        self.uniform_steps = self.uniform_steps + 1 if uniform else 0
        if self.zero_grad_steps >= self.patience:
            raise FloatingPointError(
                f"step {step}: the gradient norm has been exactly 0 for {self.zero_grad_steps} steps in a row "
                f"(steps {step - self.zero_grad_steps + 1}-{step}): nothing is being learned. Check that the data "
                "has trained tokens (labels not all -100), the learning rate and the loss; "
                "trainer.divergence_patience=0 turns this check off"
            )
        if self.uniform_steps >= self.patience:
            raise FloatingPointError(
                f"step {step}: the loss has sat at {metrics['loss']:.6g} = ln(vocab_size), a uniform prediction over "
                f"the vocabulary, for {self.uniform_steps} steps in a row: the model has collapsed. Lower the "
                "learning rate or check the data; trainer.divergence_patience=0 turns this check off"
            )
