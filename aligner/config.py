"""The shared sections of a training run's configuration, and the YAML loader.

A recipe's configuration is a dataclass that composes these sections with its
own algorithm section and a :class:`~aligner.models.config.ModelConfig`::

    @dataclass
    class SFTRunConfig:
        model: ModelConfig
        parallel: ParallelConfig = field(default_factory=ParallelConfig)
        trainer: TrainerConfig = field(default_factory=TrainerConfig)
        optim: OptimConfig = field(default_factory=OptimConfig)
        checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
        logging: LoggingConfig = field(default_factory=LoggingConfig)

    config = load_config(SFTRunConfig, "sft.yaml", ["optim.lr=2e-5", "trainer.max_steps=100"])

:func:`load_config` merges the YAML file and then the ``key=value`` overrides
onto the schema's defaults; an unknown key, a value of the wrong type or a
missing required value is a :class:`ValueError` that names the key and where it
came from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")

LR_DECAY_STYLES = ("cosine", "linear", "constant", "inverse-square-root")
WANDB_MODES = ("offline", "online", "disabled")


@dataclass
class ParallelConfig:
    """Model-parallel sizes; the data-parallel size is ``world_size // (tp * pp)``.

    Attributes:
        tp: tensor-parallel size.
        pp: pipeline-parallel size.
    """

    tp: int = 1
    pp: int = 1

    def __post_init__(self) -> None:
        for name in ("tp", "pp"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class OptimConfig:
    """AdamW (decoupled weight decay) with linear warmup and a decay to ``min_lr``.

    Attributes:
        lr: peak learning rate, reached after ``warmup_steps``.
        min_lr: learning rate at the end of the decay.
        weight_decay: decoupled weight decay; megatron leaves biases and norm
            weights undecayed.
        adam_beta1: Adam's first-moment decay.
        adam_beta2: Adam's second-moment decay.
        adam_eps: Adam's epsilon.
        warmup_steps: optimizer steps of linear warmup from 0 to ``lr``.
        clip_grad: clip the global gradient norm (over every rank, tensor-parallel
            duplicates counted once) to this value; 0 disables clipping.
        lr_decay_style: one of ``cosine``, ``linear``, ``constant``,
            ``inverse-square-root`` (megatron's ``OptimizerParamScheduler``),
            decaying over the run's total steps.
        distributed_optimizer: shard the optimizer state over data-parallel ranks
            (megatron's ``DistributedOptimizer``, which needs CUDA parameters);
            ``null`` (the default) uses it exactly when a GPU is present.
    """

    lr: float = 1e-5
    min_lr: float = 0.0
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    clip_grad: float = 1.0
    lr_decay_style: str = "cosine"
    distributed_optimizer: bool | None = None

    def __post_init__(self) -> None:
        if self.lr_decay_style not in LR_DECAY_STYLES:
            raise ValueError(f"optim.lr_decay_style must be one of {LR_DECAY_STYLES}, got {self.lr_decay_style!r}")
        if not 0.0 <= self.min_lr <= self.lr:
            raise ValueError(f"optim.min_lr must be in [0, optim.lr={self.lr}], got {self.min_lr}")
        if self.warmup_steps < 0 or self.clip_grad < 0 or self.weight_decay < 0:
            raise ValueError("optim.warmup_steps, optim.clip_grad and optim.weight_decay must be >= 0")


@dataclass
class TrainerConfig:
    """The loop: batch sizes, length, validation and logging cadence.

    Attributes:
        global_batch_size: samples per optimizer step over all data-parallel ranks
            (for preference data: pairs).
        micro_batch_size: samples per forward/backward on one rank; each rank runs
            ``global_batch_size // (micro_batch_size * dp)`` micro-batches per step.
        max_steps: stop after this many optimizer steps; None runs ``max_epochs``.
        max_epochs: passes over the training data (needs a data source with a
            length); the run is ``min(max_steps, max_epochs * steps_per_epoch)`` steps.
        val_every: validate every this many steps and at the last step; 0 never.
        val_batches: validation global batches per validation; None uses all.
        log_every: report metrics every this many steps (the last step always).
        seed: the run's seed (process groups, sampler shuffling).
        bf16: bfloat16 weights and activations with fp32 main weights in the
            optimizer (GPU); the model must be built with ``params_dtype: bfloat16``.
    """

    global_batch_size: int = 64
    micro_batch_size: int = 1
    max_steps: int | None = None
    max_epochs: int = 1
    val_every: int = 0
    val_batches: int | None = None
    log_every: int = 1
    seed: int = 1234
    bf16: bool = False

    def __post_init__(self) -> None:
        if self.global_batch_size < 1 or self.micro_batch_size < 1:
            raise ValueError("trainer.global_batch_size and trainer.micro_batch_size must be >= 1")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"trainer.global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"trainer.micro_batch_size ({self.micro_batch_size})"
            )
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"trainer.max_steps must be >= 1 or null, got {self.max_steps}")
        if self.max_epochs < 1 or self.log_every < 1:
            raise ValueError("trainer.max_epochs and trainer.log_every must be >= 1")
        if self.val_every < 0 or (self.val_batches is not None and self.val_batches < 1):
            raise ValueError("trainer.val_every must be >= 0 and trainer.val_batches >= 1 or null")


@dataclass
class CheckpointConfig:
    """Where and how often to checkpoint (see :mod:`aligner.checkpoint`).

    Attributes:
        dir: checkpoint directory; None disables checkpointing.
        save_every: save every this many steps; 0 saves only at the end. The
            last step is always saved when ``dir`` is set.
        keep_last: keep this many most recent checkpoints.
        resume: continue from ``<dir>/latest`` when it exists.
        export_hf_at_end: also write a Hugging Face checkpoint to ``<dir>/hf`` at
            the end (language models only).
    """

    dir: str | None = None
    save_every: int = 0
    keep_last: int = 3
    resume: bool = True
    export_hf_at_end: bool = False

    def __post_init__(self) -> None:
        if self.save_every < 0 or self.keep_last < 1:
            raise ValueError("checkpoint.save_every must be >= 0 and checkpoint.keep_last >= 1")


@dataclass
class LoggingConfig:
    """Where metrics go; the console progress bar is always on (on the logging rank).

    Attributes:
        tensorboard_dir: TensorBoard event directory; None disables TensorBoard.
        wandb_project: Weights & Biases project; None disables wandb.
        wandb_mode: ``offline`` (a local run directory, no network), ``online`` or
            ``disabled``.
        wandb_dir: parent directory of wandb's run directory; None uses wandb's
            default (``./wandb``).
        run_name: the run's name in wandb.
        progress_bar: show the tqdm progress bar.
    """

    tensorboard_dir: str | None = None
    wandb_project: str | None = None
    wandb_mode: str = "offline"
    wandb_dir: str | None = None
    run_name: str = "aligner"
    progress_bar: bool = True

    def __post_init__(self) -> None:
        if self.wandb_mode not in WANDB_MODES:
            raise ValueError(f"logging.wandb_mode must be one of {WANDB_MODES}, got {self.wandb_mode!r}")


def load_config(schema_cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """``schema_cls`` filled from a YAML file and ``key=value`` overrides, in that order.

    Args:
        schema_cls: a dataclass; its defaults are the base.
        path: a YAML file with a (possibly partial) mapping of the schema's keys;
            None uses only the defaults and overrides.
        overrides: dotted ``key=value`` strings (``optim.lr=1e-5``), applied last.

    Returns:
        An instance of ``schema_cls`` (its ``__post_init__`` checks have run).

    Raises:
        ValueError: an unknown key, a value that does not fit the key's type, a
            required value left unset, or a check of the schema failing; the
            message names the key and the file (or "overrides").
    """
    config = OmegaConf.structured(schema_cls)
    if path is not None:
        config = _merge(config, OmegaConf.load(path), str(path))
    if overrides:
        try:
            override_config = OmegaConf.from_dotlist(list(overrides))
        except OmegaConfBaseException as error:
            raise ValueError(f"overrides: cannot parse {list(overrides)}: {error}") from None
        config = _merge(config, override_config, "overrides")
    source = "overrides" if path is None else f"{path} (with overrides)" if overrides else str(path)
    try:
        return OmegaConf.to_object(config)
    except OmegaConfBaseException as error:
        raise ValueError(f"{source}: {_describe(error)}") from None
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None


def config_to_yaml(config: Any) -> str:
    """A dataclass instance (or a mapping) as YAML text that :func:`load_config` reads back."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def _merge(base: Any, update: Any, source: str) -> Any:
    try:
        return OmegaConf.merge(base, update)
    except OmegaConfBaseException as error:
        raise ValueError(f"{source}: {_describe(error)}") from None


def _describe(error: OmegaConfBaseException) -> str:
    """``key 'a.b': <first line of omegaconf's message>``."""
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    key = getattr(error, "full_key", None)
    return f"key '{key}': {message}" if key else message
