"""aligner.config: YAML + overrides onto dataclass schemas; bad keys and values name themselves."""

from dataclasses import dataclass, field

import pytest

from aligner.config import (
    CheckpointConfig,
    LoggingConfig,
    OptimConfig,
    ParallelConfig,
    TrainerConfig,
    config_to_yaml,
    load_config,
)
from aligner.models.config import ModelConfig


@dataclass
class RunConfig:
    model: ModelConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


MODEL_YAML = """\
model:
  num_layers: 2
  hidden_size: 32
  num_attention_heads: 4
  ffn_hidden_size: 64
  vocab_size: 64
"""


@pytest.fixture
def yaml_file(tmp_path):
    def write(text: str):
        path = tmp_path / "run.yaml"
        path.write_text(text)
        return path

    return write


def test_file_and_overrides_apply_in_order(yaml_file):
    path = yaml_file(MODEL_YAML + "optim:\n  lr: 3.0e-4\n  warmup_steps: 5\ntrainer:\n  max_steps: 10\n")
    config = load_config(RunConfig, path, ["optim.lr=1e-4", "parallel.tp=2", "checkpoint.dir=/tmp/x"])
    assert isinstance(config, RunConfig) and isinstance(config.optim, OptimConfig)
    assert config.optim.lr == 1e-4  # the override wins over the file
    assert config.optim.warmup_steps == 5  # the file wins over the default
    assert config.optim.clip_grad == 1.0  # the default stays
    assert config.trainer.max_steps == 10 and config.parallel.tp == 2 and config.checkpoint.dir == "/tmp/x"
    assert config.model.num_query_groups == 4  # ModelConfig.__post_init__ ran
    assert config.logging.wandb_project is None


def test_round_trip_through_yaml(yaml_file, tmp_path):
    config = load_config(RunConfig, yaml_file(MODEL_YAML), ["trainer.val_batches=3", "logging.wandb_mode=disabled"])
    saved = tmp_path / "saved.yaml"
    saved.write_text(config_to_yaml(config))
    assert load_config(RunConfig, saved) == config


@pytest.mark.parametrize(
    "text, overrides, key",
    [
        (MODEL_YAML + "optim:\n  learning_rate: 1.0\n", [], "optim.learning_rate"),
        (MODEL_YAML + "trainer:\n  max_steps: many\n", [], "trainer.max_steps"),
        (MODEL_YAML + "model_extra: 1\n", [], "model_extra"),
        (MODEL_YAML, ["optim.betas=0.9"], "optim.betas"),
        (MODEL_YAML, ["trainer.global_batch_size=1.5"], "trainer.global_batch_size"),
        (MODEL_YAML, ["model.num_layers=two"], "model.num_layers"),
    ],
)
def test_unknown_key_or_wrong_type_names_the_key_and_source(yaml_file, text, overrides, key):
    path = yaml_file(text)
    with pytest.raises(ValueError, match=f"'{key}'") as info:
        load_config(RunConfig, path, overrides)
    assert (str(path) if not overrides else "overrides") in str(info.value)


def test_missing_required_section_is_an_error():
    with pytest.raises(ValueError, match="'model'"):
        load_config(RunConfig, None, ["optim.lr=1e-4"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("logging.wandb_mode=sometimes", "logging.wandb_mode"),
        ("optim.lr_decay_style=step", "optim.lr_decay_style"),
        ("trainer.micro_batch_size=3", "trainer.micro_batch_size"),
        ("optim.min_lr=1.0", "optim.min_lr"),
        ("parallel.pp=0", "parallel.pp"),
    ],
)
def test_invalid_value_names_the_key(yaml_file, override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_config(RunConfig, yaml_file(MODEL_YAML), [override])
