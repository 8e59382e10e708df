"""Every shipped config loads into its recipe's schema, and bad keys are named."""

import importlib
from pathlib import Path

import pytest

from aligner.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
RECIPE_OF_PREFIX = {"sft": "sft", "rm": "rm", "dpo": "dpo", "kto": "kto", "steerlm": "steerlm"}


def schema_of(config_file: Path):
    module = importlib.import_module(f"aligner.recipes.{RECIPE_OF_PREFIX[config_file.stem.split('_')[0]]}")
    return next(getattr(module, name) for name in dir(module) if name.endswith("RunConfig"))


@pytest.mark.parametrize("config_file", CONFIGS, ids=lambda path: path.name)
def test_shipped_config_loads(config_file):
    config = load_config(schema_of(config_file), config_file)
    assert config.trainer.global_batch_size % config.trainer.micro_batch_size == 0


def test_unknown_key_is_named():
    from aligner.recipes.dpo import DPORunConfig

    with pytest.raises(ValueError, match="dpo.betta"):
        load_config(DPORunConfig, CONFIGS[0].parent / "dpo_tiny.yaml", ["dpo.betta=0.2"])


def test_bad_algorithm_value_is_named():
    from aligner.recipes.dpo import DPORunConfig

    with pytest.raises(ValueError, match="loss_type"):
        load_config(DPORunConfig, CONFIGS[0].parent / "dpo_tiny.yaml", ["dpo.loss_type=nope"])
