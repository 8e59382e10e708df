"""Every shipped config loads into its recipe's schema, and bad keys are named."""

from pathlib import Path

import pytest

from aligner.config import load_config
from aligner.recipes import RECIPE_NAMES, get_recipe

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def schema_of(config_file: Path):
    """A config's recipe is the registered name its file name starts with (``dpo_tiny.yaml``: dpo)."""
    return get_recipe(config_file.stem.split("_")[0]).config_class


def test_every_recipe_has_a_config():
    prefixes = {path.stem.split("_")[0] for path in CONFIGS}
    assert prefixes == set(RECIPE_NAMES)


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
