"""A training run's configuration: one base (:class:`RunConfig`) and the YAML loader.

Every recipe's configuration is :class:`RunConfig` (model, data, parallel,
trainer, optim, checkpoint, logging) plus only its own section::

    @dataclass
    class DPORunConfig(RunConfig):
        dpo: DPOConfig = field(default_factory=DPOConfig)

    config = load_config(DPORunConfig, "dpo.yaml", ["optim.lr=2e-5", "trainer.max_steps=100"])

:func:`load_config` merges the YAML file and then the ``key=value`` overrides
onto the schema's defaults; an unknown key, a value of the wrong type, a
missing required value or a failed check is a :class:`ConfigError` (a
``ValueError``) that names the key and where it came from.
:func:`describe_keys` lists every key with its default and the one-line meaning
taken from the ``Attributes:`` section of its dataclass's docstring (what
``--help`` prints).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from aligner.console import CONFIG_ERROR_EXIT_CODE, UserError

T = TypeVar("T")

LR_DECAY_STYLES = ("cosine", "linear", "constant", "inverse-square-root")
WANDB_MODES = ("offline", "online", "disabled")
OVER_LENGTH_POLICIES = ("truncate", "drop", "error")
READERS = ("lines", "datasets")


class ConfigError(UserError):
    """A configuration a user wrote is wrong: the message names the key and its source (exit code 2)."""

    exit_code = CONFIG_ERROR_EXIT_CODE


@dataclass
class ModelSourceConfig:
    """Where a model's initial weights come from: exactly one of ``hf_path`` and ``config``.

    Attributes:
        hf_path: a local Hugging Face checkpoint folder (Llama / Mistral / Qwen2) to import.
        config: the architecture (aligner.models.config.ModelConfig keys) of a model drawn at random from the
            trainer's seed: tests and from-scratch runs.
        params_dtype: weight dtype (float32, bfloat16, float16) overriding the checkpoint's or config's.
    """

    hf_path: str | None = None
    config: dict[str, Any] | None = None
    params_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.hf_path is not None and self.config is not None:
            raise ConfigError(
                "model.hf_path and model.config are both set: set exactly one (hf_path imports a checkpoint, "
                "config draws a random model)"
            )

    @property
    def is_set(self) -> bool:
        return self.hf_path is not None or self.config is not None


@dataclass
class DataConfig:
    """The training and validation data and how it is tokenized.

    Attributes:
        train: training data in one of the README's data formats: a .jsonl / .json / .parquet file, a folder
            written by datasets' save_to_disk, or a hub dataset name (owner/name) already in the local datasets
            cache (never downloaded) (NeMo-Aligner / TRL field names accepted).
        val: validation data in the same format; null skips validation.
        split: the split of train to read from a saved DatasetDict folder or a hub dataset.
        val_split: the split of val to read (e.g. test when train and val name the same hub dataset); null: split.
        tokenizer: a local Hugging Face tokenizer folder; null uses model.hf_path's.
        chat_template: true: render records with the tokenizer's chat template; false: plain text (prompt and
            response tokenized separately, the response ended by eos); null: the template when the tokenizer has
            one (base models have none).
        prompt_template: plain text only: a string with {prompt} that formats every prompt (NeMo-Aligner's
            configs use one with <extra_id_1>User and <extra_id_1>Assistant lines); null: the prompt as is.
        end_of_turn_token: chat templates only: the token assistant turns end with when it is not eos
            (e.g. <|im_end|>); null: eos or the one the template puts there (detected).
        max_length: most tokens per sequence (prompt + response).
        over_length: what to do with a longer example: truncate, drop or error.
        group_by_length: batch examples of similar length together (less padding).
        pad_to_multiple_of: round each batch's padded width up to this multiple; null pads to the longest row.
        reader: lines (plain jsonl reader, errors name file:line) or datasets (Hugging Face load_dataset("json"),
            memory-mapped for large files; errors name the row).
        cache_dir: where reader=datasets keeps its Arrow cache; null: a temporary folder removed at exit.
    """

    train: str = "???"
    val: str | None = None
    split: str = "train"
    val_split: str | None = None
    tokenizer: str | None = None
    chat_template: bool | None = None
    prompt_template: str | None = None
    end_of_turn_token: str | None = None
    max_length: int = 1024
    over_length: str = "truncate"
    group_by_length: bool = True
    pad_to_multiple_of: int | None = 8
    reader: str = "lines"
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise ConfigError(f"data.max_length must be >= 2, got {self.max_length}")
        if self.over_length not in OVER_LENGTH_POLICIES:
            raise ConfigError(f"data.over_length must be one of {OVER_LENGTH_POLICIES}, got {self.over_length!r}")
        if self.reader not in READERS:
            raise ConfigError(f"data.reader must be one of {READERS}, got {self.reader!r}")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ConfigError(f"data.pad_to_multiple_of must be >= 1 or null, got {self.pad_to_multiple_of}")

    def split_for(self, which: str) -> str:
        """The dataset split that ``train`` or ``val`` reads (``val_split`` falls back to ``split``)."""
        return self.val_split or self.split if which == "val" else self.split


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
                raise ConfigError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")


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
            raise ConfigError(f"optim.lr_decay_style must be one of {LR_DECAY_STYLES}, got {self.lr_decay_style!r}")
        if not 0.0 <= self.min_lr <= self.lr:
            raise ConfigError(f"optim.min_lr must be in [0, optim.lr={self.lr}], got {self.min_lr}")
        if self.warmup_steps < 0 or self.clip_grad < 0 or self.weight_decay < 0:
            raise ConfigError("optim.warmup_steps, optim.clip_grad and optim.weight_decay must be >= 0")


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
        divergence_patience: stop the run (an error naming the step) when for this many consecutive
            steps the gradient norm is exactly 0 or a language model's loss sits at the uniform value
            ln(vocab_size); 0 disables (a non-finite loss or gradient always stops it).
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
    divergence_patience: int = 10

    def __post_init__(self) -> None:
        if self.global_batch_size < 1 or self.micro_batch_size < 1:
            raise ConfigError("trainer.global_batch_size and trainer.micro_batch_size must be >= 1")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"trainer.global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"trainer.micro_batch_size ({self.micro_batch_size})"
            )
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"trainer.max_steps must be >= 1 or null, got {self.max_steps}")
        if self.max_epochs < 1 or self.log_every < 1:
            raise ConfigError("trainer.max_epochs and trainer.log_every must be >= 1")
        if self.divergence_patience < 0:
            raise ConfigError(f"trainer.divergence_patience must be >= 0, got {self.divergence_patience}")
        if self.val_every < 0 or (self.val_batches is not None and self.val_batches < 1):
            raise ConfigError("trainer.val_every must be >= 0 and trainer.val_batches >= 1 or null")


@dataclass
class CheckpointConfig:
    """Where and how often to checkpoint (see :mod:`aligner.checkpoint`).

    Attributes:
        dir: checkpoint directory; None disables checkpointing.
        save_every: save every this many steps; 0 saves only at the end. The
            last step is always saved when ``dir`` is set.
        keep_last: keep this many most recent checkpoints.
        resume: continue from ``<dir>``'s newest intact checkpoint when there is one (a damaged one is
            reported and skipped).
        resume_from: a checkpoint folder (``.../step_000120``) or root to resume from instead; it must be
            intact. Needs ``dir`` (where the run goes on saving).
        export_hf_at_end: also write a Hugging Face checkpoint to ``<dir>/hf`` at
            the end (language models only).
    """

    dir: str | None = None
    save_every: int = 0
    keep_last: int = 3
    resume: bool = True
    resume_from: str | None = None
    export_hf_at_end: bool = False

    def __post_init__(self) -> None:
        if self.save_every < 0 or self.keep_last < 1:
            raise ConfigError("checkpoint.save_every must be >= 0 and checkpoint.keep_last >= 1")
        if self.resume_from is not None and self.dir is None:
            raise ConfigError("checkpoint.resume_from needs checkpoint.dir (where the resumed run saves)")


@dataclass
class LoggingConfig:
    """Where metrics go; the console progress bar is always on (on the logging rank).

    Attributes:
        tensorboard_dir: TensorBoard event directory; None disables TensorBoard.
        wandb_project: Weights & Biases project; None disables wandb.
        wandb_mode: offline (a local run directory, no network), online or disabled; null (the default) takes
            the WANDB_MODE environment variable, else offline.
        wandb_dir: parent directory of wandb's run directory; None uses wandb's
            default (``./wandb``).
        run_name: the run's name in wandb.
        progress_bar: show the tqdm progress bar.
    """

    tensorboard_dir: str | None = None
    wandb_project: str | None = None
    wandb_mode: str | None = None
    wandb_dir: str | None = None
    run_name: str = "aligner"
    progress_bar: bool = True

    def __post_init__(self) -> None:
        source = "logging.wandb_mode"
        if self.wandb_mode is None:
            self.wandb_mode = os.environ.get("WANDB_MODE", "offline")
            source = "WANDB_MODE (environment)"
        if self.wandb_mode not in WANDB_MODES:
            raise ConfigError(f"{source} must be one of {WANDB_MODES}, got {self.wandb_mode!r}")


@dataclass
class RunConfig:
    """The sections every recipe shares; a recipe's config subclasses it and adds its own section.

    Attributes:
        model: the trained model's initial weights.
        data: the data and its tokenization.
        parallel: tensor / pipeline parallel sizes.
        trainer: batch sizes, run length and cadence.
        optim: optimizer and learning-rate schedule.
        checkpoint: checkpointing and resume.
        logging: metric sinks and the progress bar.
    """

    model: ModelSourceConfig = field(default_factory=ModelSourceConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        if not self.model.is_set:
            raise ConfigError("set model.hf_path (import a checkpoint) or model.config (a random model)")
        max_steps = self.trainer.max_steps
        if self.optim.warmup_steps and max_steps is not None and self.optim.warmup_steps >= max_steps:
            raise ConfigError(
                f"optim.warmup_steps ({self.optim.warmup_steps}) must be smaller than trainer.max_steps ({max_steps})"
            )


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
        ConfigError: a missing or unreadable file, an unknown key, a value that
            does not fit the key's type, a required value left unset, or a check
            of the schema failing; the message names the key and the file (or
            "overrides").
    """
    config = OmegaConf.structured(schema_cls)
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = OmegaConf.load(path)
        except Exception as error:  # yaml's parser errors have no common base worth naming
            raise ConfigError(f"{path}: not valid YAML: {str(error).splitlines()[0]}") from None
        config = _merge(config, loaded, str(path))
    if overrides:
        for override in overrides:
            if "=" not in override:
                raise ConfigError(f"override {override!r} is not key=value (e.g. optim.lr=1e-5)")
        try:
            override_config = OmegaConf.from_dotlist(list(overrides))
        except OmegaConfBaseException as error:
            raise ConfigError(f"overrides: cannot parse {list(overrides)}: {error}") from None
        config = _merge(config, override_config, "overrides")
    source = "overrides" if path is None else f"{path} (with overrides)" if overrides else str(path)
    try:
        return OmegaConf.to_object(config)
    except OmegaConfBaseException as error:
        raise ConfigError(f"{source}: {_describe(error)}") from None
    except ValueError as error:
        raise ConfigError(f"{source}: {error}") from None


def config_to_yaml(config: Any) -> str:
    """A dataclass instance (or a mapping) as YAML text that :func:`load_config` reads back."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def describe_keys(schema_cls: type) -> Iterator[tuple[str, Any, str]]:
    """Every leaf key of ``schema_cls`` as ``(dotted key, default, one-line meaning)``, in field order.

    The meaning is the key's entry in the ``Attributes:`` section of its
    dataclass's docstring (entries may name several keys: ``a, b: ...``);
    subclass sections are searched before base classes.

    Raises:
        ValueError: a key without a description (every public key is documented).
    """
    yield from _describe_fields(schema_cls, "")


def _describe_fields(schema_cls: type, prefix: str) -> Iterator[tuple[str, Any, str]]:
    docs = _attribute_docs(schema_cls)
    for entry in dataclasses.fields(schema_cls):
        key = f"{prefix}{entry.name}"
        has_factory = entry.default_factory is not dataclasses.MISSING
        default = entry.default_factory() if has_factory else entry.default
        if dataclasses.is_dataclass(default):
            yield from _describe_fields(type(default), f"{key}.")
            continue
        if entry.name not in docs:
            raise ValueError(f"{schema_cls.__name__}.{entry.name} has no entry in the docstring's Attributes section")
        yield key, default, docs[entry.name]


_ATTRIBUTE = re.compile(r"^(\s*)([A-Za-z_][\w, ]*):\s*(.*)$")


def _attribute_docs(schema_cls: type) -> dict[str, str]:
    """``{field name: description}`` from the ``Attributes:`` sections of ``schema_cls`` and its bases."""
    docs: dict[str, str] = {}
    for cls in reversed(schema_cls.__mro__):
        lines = (cls.__doc__ or "").splitlines()
        try:
            start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes:")
        except StopIteration:
            continue
        names: list[str] = []
        indent = None
        for line in lines[start + 1 :]:
            if not line.strip():
                break
            match = _ATTRIBUTE.match(line)
            if match and (indent is None or len(match.group(1)) == indent):
                indent = len(match.group(1))
                names = [name.strip() for name in match.group(2).split(",")]
                for name in names:
                    docs[name] = match.group(3).strip()
            elif names:
                for name in names:
                    docs[name] += " " + line.strip()
    return docs


def _merge(base: Any, update: Any, source: str) -> Any:
    try:
        return OmegaConf.merge(base, update)
    except OmegaConfBaseException as error:
        raise ConfigError(f"{source}: {_describe(error)}") from None


def _describe(error: OmegaConfBaseException) -> str:
    """``key 'a.b': <first line of omegaconf's message>``."""
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    key = getattr(error, "full_key", None)
    return f"key '{key}': {message}" if key else message
