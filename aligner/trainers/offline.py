"""The training loop of every offline algorithm (SFT, reward models, DPO family, KTO, SteerLM).

An algorithm plugs in one function, its ``forward_step``; the loop owns the
rest: megatron's forward/backward schedule (pipeline-parallel or not), its
DistributedDataParallel gradient all-reduce, its optimizer and learning-rate
scheduler, gradient clipping, validation, checkpoints and logging::

    def forward_step(batch, model):  # batch: one micro-batch dict, already on the device
        logits = model(batch["input_ids"], None, None)  # a non-last pipeline stage returns hidden states

        def loss_func(logits):  # runs on the last pipeline stage only
            mask = batch["labels"] != -100
            nll = ...  # [B, S] per-token NLL, 0 where not mask
            correct = ...  # number of trained tokens predicted right
            return nll.sum(), mask.sum(), {"accuracy": torch.stack([correct, mask.sum()])}

        return logits, loss_func

    trainer = OfflineTrainer(model, forward_step, loader, trainer=cfg.trainer, optim=cfg.optim)
    summary = trainer.fit()

The loss of a step is ``sum of loss_sum / sum of count`` over every micro-batch
of every data-parallel rank: megatron's per-token-loss mode
(``calculate_per_token_loss``) backpropagates the raw sums and divides the
all-reduced gradients by the global count, so splitting a global batch into
micro-batches or ranks never changes the step (no mean of means).

Metrics a ``loss_func`` returns are reduced over the global batch: a 0-dim
tensor is averaged over micro-batches (each micro-batch weighs the same); a
2-element tensor ``[numerator, denominator]`` is reported as
``sum(numerators) / sum(denominators)`` (weigh by tokens, pairs, ...).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from torch import Tensor

from aligner.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from aligner.config import CheckpointConfig, LoggingConfig, OptimConfig, TrainerConfig
from aligner.trainers.logging import MetricsLogger

Batch = dict[str, Any]
LossFunc = Callable[[Tensor], tuple[Tensor, Tensor, dict[str, Tensor]]]
ForwardStep = Callable[[Batch, torch.nn.Module], tuple[Tensor, LossFunc]]

# megatron's own clipping adds this to the norm before dividing (clip_grad_by_total_norm_fp32).
_CLIP_EPS = 1.0e-6
_LOSS = "loss"
_TOKENS = "tokens"
_RESERVED = (_LOSS, _TOKENS, "count", "grad_norm", "lr", "tokens_per_s", "step_time_s")


@dataclass
class TrainSummary:
    """What :meth:`OfflineTrainer.fit` did (the same on every rank).

    Attributes:
        history: one dict per optimizer step run by this call: ``step``, ``loss``
            (global token/unit mean), ``count`` (global units), ``grad_norm``
            (before clipping), ``lr`` (used by the step), ``tokens``,
            ``tokens_per_s``, ``step_time_s`` and the algorithm's metrics.
        val_history: one dict per validation: ``step``, ``loss``, ``count``,
            ``tokens`` and the algorithm's metrics.
        step: optimizer steps done in total (a resumed run counts the earlier ones).
        checkpoint: the last checkpoint written or loaded, if any.
    """

    history: list[dict[str, float]] = field(default_factory=list)
    val_history: list[dict[str, float]] = field(default_factory=list)
    step: int = 0
    checkpoint: Path | None = None


class OfflineTrainer:
    """Trains ``model`` on ``train_data`` with the loss that ``forward_step`` defines.

    Args:
        model: this rank's shard from :func:`aligner.models.gpt.build_model`
            (unwrapped; the trainer wraps it in megatron's DDP and sets its
            config's ``calculate_per_token_loss``, ``finalize_model_grads_func``,
            ``grad_scale_func`` and, with pipeline parallelism,
            ``variable_seq_lengths``).
        forward_step: ``forward_step(batch, model) -> (output, loss_func)``:
            ``batch`` is one micro-batch dict (tensors moved to the model's
            device; other values as given), ``model`` the wrapped model to call.
            ``loss_func(output) -> (loss_sum, count, metrics)`` runs on the last
            pipeline stage: ``loss_sum`` a 0-dim differentiable tensor (the SUM
            of the per-unit losses of the micro-batch), ``count`` a 0-dim integer
            tensor (the units it sums over: tokens, sequences or pairs), ``metrics``
            0-dim or ``[numerator, denominator]`` tensors (see the module docstring).
        train_data: an iterable whose every pass yields an epoch (from its
            current position) of steps, each a ``list`` of this rank's micro-batch
            dicts (``global_batch_size // (micro_batch_size * dp)`` of them); every
            rank of a data-parallel replica (its tensor and pipeline ranks) gets
            the same micro-batches. It needs ``__len__`` (steps per epoch) unless
            ``trainer.max_steps`` is set, and ``state_dict()`` /
            ``load_state_dict(state)`` when checkpointing.
        trainer: the loop's settings.
        optim: optimizer and learning-rate schedule.
        checkpoint: checkpointing (off by default).
        logging: metric sinks.
        val_data: validation steps in the same format (any number of
            micro-batches each); iterated afresh at each validation, and
            rewound afterwards (``state_dict`` / ``load_state_dict``) when it has
            a state, so that every validation sees the same batches.
        run_config: the whole run's configuration, saved with checkpoints and
            recorded in wandb.

    Raises:
        ValueError: inconsistent settings (bf16 versus the model's dtype, a
            run length that cannot be determined, warmup not shorter than the
            run, checkpointing with a data source that has no state, HF export
            of a value model).
    """

    def __init__(
        self,
        model: GPTModel,
        forward_step: ForwardStep,
        train_data: Iterable[list[Batch]],
        *,
        trainer: TrainerConfig,
        optim: OptimConfig,
        checkpoint: CheckpointConfig | None = None,
        logging: LoggingConfig | None = None,
        val_data: Iterable[list[Batch]] | None = None,
        run_config: Any = None,
    ) -> None:
        self.config = trainer
        self.optim_config = optim
        self.checkpoint_config = checkpoint or CheckpointConfig()
        self.logging_config = logging or LoggingConfig()
        self.forward_step = forward_step
        self.train_data = train_data
        self.val_data = val_data
        self.run_config = run_config
        self._check_inputs(model)

        self.total_steps = self._total_steps()
        if optim.warmup_steps >= self.total_steps:
            raise ValueError(
                f"optim.warmup_steps ({optim.warmup_steps}) must be smaller than the run's {self.total_steps} steps"
            )
        self.dp_size = parallel_state.get_data_parallel_world_size(with_context_parallel=True)
        denominator = trainer.micro_batch_size * self.dp_size
        if trainer.global_batch_size % denominator:
            raise ValueError(
                f"trainer.global_batch_size ({trainer.global_batch_size}) must be divisible by "
                f"micro_batch_size * data-parallel size = {trainer.micro_batch_size} * {self.dp_size}"
            )
        self.micro_batches_per_step = trainer.global_batch_size // denominator

        self.model = model
        self.device = next(model.parameters()).device
        self.is_last_stage = parallel_state.is_pipeline_last_stage()
        self.is_logging_rank = (
            self.is_last_stage
            and parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0
        )
        # The distributed optimizer (state sharded over data-parallel ranks) requires CUDA tensors.
        distributed_optimizer = optim.distributed_optimizer
        if distributed_optimizer is None:
            distributed_optimizer = torch.cuda.is_available()
        model.config.calculate_per_token_loss = True
        model.config.finalize_model_grads_func = finalize_model_grads
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            model.config.variable_seq_lengths = True  # micro-batches are padded to their own longest row
        self.ddp_model = DistributedDataParallel(
            model.config,
            DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=distributed_optimizer),
            module=model,
        )
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=optim.lr,
                min_lr=optim.min_lr,
                weight_decay=optim.weight_decay,
                adam_beta1=optim.adam_beta1,
                adam_beta2=optim.adam_beta2,
                adam_eps=optim.adam_eps,
                # Clipping is done here (_clip_gradients): megatron's asserts CUDA tensors.
                clip_grad=0.0,
                bf16=trainer.bf16,
                params_dtype=model.config.params_dtype,
                use_distributed_optimizer=distributed_optimizer,
            ),
            [self.ddp_model],
        )
        model.config.grad_scale_func = self.optimizer.scale_loss
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0,
            max_lr=optim.lr,
            min_lr=optim.min_lr,
            lr_warmup_steps=optim.warmup_steps,
            lr_decay_steps=self.total_steps,
            lr_decay_style=optim.lr_decay_style,
            start_wd=optim.weight_decay,
            end_wd=optim.weight_decay,
            wd_incr_steps=self.total_steps,
            wd_incr_style="constant",
            # On resume the configured schedule wins; only the step count comes from the checkpoint.
            use_checkpoint_opt_param_scheduler=False,
            override_opt_param_scheduler=True,
        )
        self.step = 0
        self.summary = TrainSummary()
        self.checkpoint_path: Path | None = None
        self._saved_step: int | None = None
        if self.checkpoint_config.dir is not None and self.checkpoint_config.resume:
            self._resume()

    def _check_inputs(self, model: GPTModel) -> None:
        if not hasattr(model, "aligner_config"):
            raise ValueError("model must come from aligner.models.gpt.build_model (unwrapped)")
        if self.config.bf16 != (model.config.params_dtype == torch.bfloat16):
            raise ValueError(
                f"trainer.bf16={self.config.bf16} but the model's params_dtype is {model.config.params_dtype}; "
                "build the model with params_dtype bfloat16 exactly when trainer.bf16 is true"
            )
        if self.config.bf16 and not torch.cuda.is_available():
            raise ValueError("trainer.bf16 needs a GPU (megatron's mixed-precision optimizer is CUDA-only)")
        if self.checkpoint_config.dir is not None and not (
            hasattr(self.train_data, "state_dict") and hasattr(self.train_data, "load_state_dict")
        ):
            raise ValueError(
                "checkpointing needs train_data with state_dict() and load_state_dict() to resume the data stream"
            )
        if self.checkpoint_config.export_hf_at_end and model.aligner_num_value_outputs is not None:
            raise ValueError("checkpoint.export_hf_at_end writes causal language models; this model has a value head")

    def _total_steps(self) -> int:
        max_steps = self.config.max_steps
        if isinstance(self.train_data, Sized):
            epoch_steps = self.config.max_epochs * len(self.train_data)
            return epoch_steps if max_steps is None else min(max_steps, epoch_steps)
        if max_steps is None:
            raise ValueError("train_data has no length: set trainer.max_steps")
        return max_steps

    def _resume(self) -> None:
        path = None
        if dist.get_rank() == 0:
            path = latest_checkpoint(self.checkpoint_config.dir)
        shared = [path]
        dist.broadcast_object_list(shared, src=0)
        if shared[0] is None:
            return
        state = load_checkpoint(shared[0], self.model, self.optimizer, self.scheduler)
        self.step = state["step"]
        self.train_data.load_state_dict(state["data"])
        self.checkpoint_path, self._saved_step = shared[0], self.step

    # ----------------------------------------------------------------------------------------- loop

    def fit(self) -> TrainSummary:
        """Train until the run's last step; validate, log and checkpoint on the way.

        Returns:
            The summary of the steps run by this call; it is also ``self.summary``,
            which holds the steps done so far when ``fit`` raises.

        Raises:
            FloatingPointError: a step's loss or gradient norm is not finite
                (raised on every rank, before the optimizer update).
            ValueError: a step with the wrong number of micro-batches, or
                ``train_data`` yielding an empty epoch.
        """
        summary = self.summary = TrainSummary(step=self.step, checkpoint=self.checkpoint_path)
        logger = MetricsLogger(
            self.logging_config,
            total_steps=self.total_steps,
            initial_step=self.step,
            enabled=self.is_logging_rank,
            run_config=self.run_config,
        )
        checkpointing = self.checkpoint_config.dir is not None
        try:
            while self.step < self.total_steps:
                empty_epoch = True
                for micro_batches in self.train_data:
                    empty_epoch = False
                    metrics = self.train_step(micro_batches)
                    summary.history.append({"step": self.step, **metrics})
                    summary.step = self.step
                    logger.advance()
                    last = self.step == self.total_steps
                    if self.step % self.config.log_every == 0 or last:
                        logger.log(self.step, metrics, "train")
                    val_every = self.config.val_every
                    if self.val_data is not None and val_every and (self.step % val_every == 0 or last):
                        val_metrics = self.validate()
                        summary.val_history.append({"step": self.step, **val_metrics})
                        logger.log(self.step, val_metrics, "val")
                    save_every = self.checkpoint_config.save_every
                    if checkpointing and save_every and self.step % save_every == 0 and not last:
                        summary.checkpoint = self.save_checkpoint()
                    if last:
                        break
                if empty_epoch:
                    raise ValueError(
                        f"train_data yielded no step at step {self.step} of {self.total_steps}; each pass over it "
                        "must yield an epoch"
                    )
            if checkpointing:
                summary.checkpoint = self.save_checkpoint()
                if self.checkpoint_config.export_hf_at_end:
                    self.export_hf(Path(self.checkpoint_config.dir) / "hf")
        finally:
            logger.close()
        return summary

    def train_step(self, micro_batches: list[Batch]) -> dict[str, float]:
        """One optimizer step over this rank's ``micro_batches`` of a global batch; a collective.

        Returns:
            The step's metrics (see :class:`TrainSummary`), the same on every rank.

        Raises:
            ValueError: not ``micro_batches_per_step`` micro-batches.
            FloatingPointError: a non-finite loss or gradient norm (no update is made).
        """
        if len(micro_batches) != self.micro_batches_per_step:
            raise ValueError(
                f"step {self.step + 1}: got {len(micro_batches)} micro-batches, expected "
                f"global_batch_size / (micro_batch_size * dp) = {self.config.global_batch_size} / "
                f"({self.config.micro_batch_size} * {self.dp_size}) = {self.micro_batches_per_step}"
            )
        start = time.perf_counter()
        self.ddp_model.train()
        self.ddp_model.zero_grad_buffer()
        self.optimizer.zero_grad()
        records = self._run_schedule(micro_batches, forward_only=False)
        metrics = self._reduce(records, _count_tokens(micro_batches))
        if not math.isfinite(metrics[_LOSS]):
            raise FloatingPointError(
                f"step {self.step + 1}: the loss is {metrics[_LOSS]} (over {metrics['count']:.0f} units); "
                "stopping before the optimizer update. Check the data (empty or extreme rows), the learning "
                "rate and the loss inputs."
            )
        self.optimizer.prepare_grads()
        grad_norm = self.optimizer.get_grad_norm()
        if not math.isfinite(grad_norm):
            raise FloatingPointError(
                f"step {self.step + 1}: the gradient norm is {grad_norm} with a finite loss {metrics[_LOSS]}; "
                "stopping before the optimizer update"
            )
        self._clip_gradients(grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step_with_ready_grads()
        self.scheduler.step(increment=1)
        self.step += 1
        elapsed = time.perf_counter() - start
        return {
            **metrics,
            "grad_norm": grad_norm,
            "lr": lr,
            "tokens_per_s": metrics[_TOKENS] / elapsed,
            "step_time_s": elapsed,
        }

    def _clip_gradients(self, grad_norm: float) -> None:
        """Scale the (main) gradients so their global norm is at most ``clip_grad``, as megatron does."""
        if self.optim_config.clip_grad <= 0:
            return
        coefficient = self.optim_config.clip_grad / (grad_norm + _CLIP_EPS)
        if coefficient < 1.0:
            grads = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
            torch._foreach_mul_(grads, coefficient)

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Forward-only pass over ``val_data`` (at most ``val_batches`` steps); a collective.

        Returns:
            ``loss``, ``count``, ``tokens`` and the algorithm's metrics, reduced
            over every validation micro-batch of every rank as in training.
        """
        # Every validation sees the same batches: a stateful source (a sampler) is rewound after it.
        position = self.val_data.state_dict() if hasattr(self.val_data, "state_dict") else None
        self.ddp_model.eval()
        records: list[dict[str, Tensor]] = []
        tokens = 0
        for index, micro_batches in enumerate(self.val_data):
            if self.config.val_batches is not None and index >= self.config.val_batches:
                break
            records += self._run_schedule(micro_batches, forward_only=True)
            tokens += _count_tokens(micro_batches)
        self.ddp_model.train()
        if position is not None:
            self.val_data.load_state_dict(position)
        return self._reduce(records, tokens)

    def _run_schedule(self, micro_batches: list[Batch], forward_only: bool) -> list[dict[str, Tensor]]:
        """megatron's schedule over the micro-batches; the per-micro-batch records on the last stage."""
        batches = [_to_device(batch, self.device) for batch in micro_batches]

        def megatron_forward_step(data_iterator, model):
            output, loss_func = self.forward_step(next(data_iterator), model)
            return output, _recording(loss_func)

        first = batches[0]["input_ids"]
        return get_forward_backward_func()(
            forward_step_func=megatron_forward_step,
            data_iterator=iter(batches),
            model=[self.ddp_model],
            num_microbatches=len(batches),
            seq_length=first.shape[1],
            micro_batch_size=first.shape[0],
            forward_only=forward_only,
        )

    def _reduce(self, records: list[dict[str, Tensor]], tokens: int) -> dict[str, float]:
        """Sum the micro-batch records over data-parallel ranks, then share them with every pipeline stage."""
        metrics = None
        if self.is_last_stage:
            names = sorted(records[0]) if records else [_LOSS]
            for record in records:
                if sorted(record) != names:
                    raise ValueError(f"micro-batches returned different metrics: {sorted(record)} and {names}")
            pairs = torch.zeros(len(names) + 1, 2, dtype=torch.float64, device=self.device)
            for index, name in enumerate(names):
                for record in records:
                    pairs[index] += record[name].to(pairs)
            pairs[-1] = torch.tensor([tokens, 1.0], dtype=torch.float64)
            dist.all_reduce(pairs, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
            pairs = pairs.cpu()
            metrics = {}
            for index, name in enumerate(names):
                numerator, denominator = pairs[index].tolist()
                metrics[name] = numerator / denominator if denominator else numerator
            metrics["count"] = pairs[names.index(_LOSS), 1].item()
            metrics[_TOKENS] = pairs[-1, 0].item()
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            shared = [metrics]
            dist.broadcast_object_list(
                shared,
                src=parallel_state.get_pipeline_model_parallel_last_rank(),
                group=parallel_state.get_pipeline_model_parallel_group(),
            )
            metrics = shared[0]
        return metrics

    # ------------------------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path:
        """Checkpoint the current step under ``checkpoint.dir`` (a collective); returns its directory.

        A step that is already checkpointed (just saved or resumed from) is not written again.
        """
        if self.checkpoint_config.dir is None:
            raise ValueError("checkpoint.dir is not set")
        if self._saved_step != self.step:
            self.checkpoint_path = save_checkpoint(
                self.checkpoint_config.dir,
                self.step,
                self.model,
                self.optimizer,
                self.scheduler,
                {"step": self.step, "data": self.train_data.state_dict()},
                keep_last=self.checkpoint_config.keep_last,
                run_config=self.run_config,
            )
            self._saved_step = self.step
        return self.checkpoint_path

    def export_hf(self, out_dir: str | Path) -> None:
        """Write the current weights as a Hugging Face checkpoint (a collective; language models only)."""
        from aligner.models.hf import export_hf

        export_hf(self.model, out_dir)


def _recording(loss_func: LossFunc) -> Callable[[Tensor], tuple[Tensor, Tensor, dict[str, Tensor]]]:
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
        record = {_LOSS: torch.stack([loss_sum.detach().double(), count.double()])}
        for name, value in metrics.items():
            if name in _RESERVED:
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


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


def _count_tokens(micro_batches: list[Batch]) -> int:
    """Real (non-pad) tokens of a step on this rank: ``lengths`` when the batch has them."""
    total = 0
    for batch in micro_batches:
        total += int(batch["lengths"].sum()) if "lengths" in batch else batch["input_ids"].numel()
    return total
