"""A train state: one trained model with its megatron DDP wrapper, optimizer and learning-rate scheduler.

Every recipe builds one per trained model with :func:`build_train_state`
(PPO builds two: actor and critic); :func:`aligner.trainers.step.train_step`
updates it and :mod:`aligner.checkpoint` saves and restores it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from aligner.config import ConfigError, OptimConfig


@dataclass
class TrainState:
    """One trained model.

    Attributes:
        model: this rank's unwrapped model shard (from :func:`aligner.models.gpt.build_model`).
        ddp_model: ``model`` in megatron's DistributedDataParallel (what the schedules call).
        optimizer: megatron's optimizer over ``ddp_model``.
        scheduler: its learning-rate / weight-decay schedule.
        clip_grad: the global gradient-norm limit (0: none).
        step: optimizer steps taken (restored on resume).
    """

    model: GPTModel
    ddp_model: DistributedDataParallel
    optimizer: MegatronOptimizer
    scheduler: OptimizerParamScheduler
    clip_grad: float
    step: int = 0

    @property
    def is_language_model(self) -> bool:
        """A causal LM (exportable to Hugging Face), not a value / reward model."""
        return self.model.aligner_num_value_outputs is None


def build_train_state(model: GPTModel, optim: OptimConfig, *, total_steps: int, bf16: bool = False) -> TrainState:
    """Wrap ``model`` for training: megatron DDP, AdamW and its schedule over ``total_steps`` steps.

    Sets the model config's per-token loss mode (the schedule backpropagates raw
    loss sums; gradients are divided by the global count after the all-reduce),
    ``finalize_model_grads_func``, ``grad_scale_func`` and, with pipeline
    parallelism, ``variable_seq_lengths`` (micro-batches are padded to their own
    longest row). The distributed optimizer (state sharded over data-parallel
    ranks) is used when ``optim.distributed_optimizer`` says so, by default
    exactly when a GPU is present (it needs CUDA tensors).

    Raises:
        ConfigError: ``bf16`` disagrees with the model's dtype or has no GPU;
            ``optim.warmup_steps`` not below ``total_steps``.
        ValueError: ``model`` did not come from ``build_model``.
    """
    if not hasattr(model, "aligner_config"):
        raise ValueError("model must come from aligner.models.gpt.build_model (unwrapped)")
    if bf16 != (model.config.params_dtype == torch.bfloat16):
        raise ConfigError(
            f"trainer.bf16={bf16} but the model's params_dtype is {model.config.params_dtype}; build the model "
            "with model.params_dtype=bfloat16 exactly when trainer.bf16 is true"
        )
    if bf16 and not torch.cuda.is_available():
        raise ConfigError("trainer.bf16 needs a GPU (megatron's mixed-precision optimizer is CUDA-only)")
    if optim.warmup_steps >= total_steps:
        raise ConfigError(
            f"optim.warmup_steps ({optim.warmup_steps}) must be smaller than the run's {total_steps} steps"
        )
    distributed_optimizer = optim.distributed_optimizer
    if distributed_optimizer is None:
        distributed_optimizer = torch.cuda.is_available()
    model.config.calculate_per_token_loss = True
    model.config.finalize_model_grads_func = finalize_model_grads
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        model.config.variable_seq_lengths = True
    ddp_model = DistributedDataParallel(
        model.config,
        DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=distributed_optimizer),
        module=model,
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=optim.lr,
            min_lr=optim.min_lr,
            weight_decay=optim.weight_decay,
            adam_beta1=optim.adam_beta1,
            adam_beta2=optim.adam_beta2,
            adam_eps=optim.adam_eps,
            # Clipping is done by train_step: megatron's asserts CUDA tensors.
            clip_grad=0.0,
            bf16=bf16,
            params_dtype=model.config.params_dtype,
            use_distributed_optimizer=distributed_optimizer,
        ),
        [ddp_model],
    )
    model.config.grad_scale_func = optimizer.scale_loss
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=optim.warmup_steps,
        lr_decay_steps=total_steps,
        lr_decay_style=optim.lr_decay_style,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=total_steps,
        wd_incr_style="constant",
        # On resume the configured schedule wins; only the step count comes from the checkpoint.
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )
    return TrainState(model, ddp_model, optimizer, scheduler, clip_grad=optim.clip_grad)
