"""The recipes' command line: --help lists every key, --print-config round-trips, config errors name the key."""

import dataclasses
from pathlib import Path

import pytest

from aligner.cli import keys_help, parse_command_line
from aligner.config import ConfigError, RunConfig, config_to_yaml, describe_keys, load_config
from aligner.recipes import RECIPE_NAMES, get_recipe

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def leaf_keys(schema, prefix=""):
    """Every dotted leaf key of a dataclass schema, found independently of describe_keys."""
    for entry in dataclasses.fields(schema):
        factory = entry.default_factory
        default = factory() if factory is not dataclasses.MISSING else entry.default
        if dataclasses.is_dataclass(default):
            yield from leaf_keys(type(default), f"{prefix}{entry.name}.")
        else:
            yield f"{prefix}{entry.name}"


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_help_lists_every_key_with_its_default_and_meaning(name, capsys):
    recipe = get_recipe(name)
    with pytest.raises(SystemExit) as exit_info:
        parse_command_line(recipe, ["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    keys = list(leaf_keys(recipe.config_class))
    assert len(keys) > 40
    lines = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ") and " = " in line}
    for key in keys:
        assert key in lines, key
        _, _, rest = lines[key].partition(" = ")
        default, _, meaning = rest.strip().partition("  ")
        assert default and len(meaning.strip()) > 10, lines[key]
    assert "--print-config" in text and "--config" in text


def test_help_shows_recipe_sections_and_yaml_defaults():
    text = keys_help(get_recipe("dpo").config_class)
    assert "dpo.beta = 0.1" in text and "dpo.reference = precompute" in text
    assert "checkpoint.dir = null" in text and "data.group_by_length = true" in text


def test_an_undocumented_key_is_refused():
    @dataclasses.dataclass
    class Section:
        """A section.

        Attributes:
            known: documented.
        """

        known: int = 1
        unknown: int = 2

    with pytest.raises(ValueError, match="Section.unknown"):
        list(describe_keys(Section))


def test_print_config_round_trips(tmp_path, capsys):
    recipe = get_recipe("dpo")
    config, print_only = parse_command_line(
        recipe, ["--config", str(CONFIGS / "dpo_tiny.yaml"), "--print-config", "dpo.beta=0.25", "trainer.seed=7"]
    )
    assert print_only and config.dpo.beta == 0.25 and config.trainer.seed == 7
    written = tmp_path / "resolved.yaml"
    written.write_text(config_to_yaml(config))
    assert load_config(recipe.config_class, written) == config


def test_print_config_prints_without_training(capsys):
    from aligner.cli import main

    main(get_recipe("sft"), ["--config", str(CONFIGS / "sft_tiny.yaml"), "--print-config", "optim.lr=0.5"])
    out = capsys.readouterr().out
    assert "lr: 0.5" in out and "global_batch_size: 16" in out
    assert load_config(get_recipe("sft").config_class, None, ["data.train=x", "model.config.vocab_size=8"])


def test_conflicting_model_sources_are_one_clear_error():
    with pytest.raises(ConfigError, match="model.hf_path and model.config are both set"):
        load_config(get_recipe("sft").config_class, CONFIGS / "sft_tiny.yaml", ["model.hf_path=/some/where"])
    with pytest.raises(ConfigError, match="set model.hf_path"):
        load_config(get_recipe("sft").config_class, None, ["data.train=x"])


@pytest.mark.parametrize(
    "override, named",
    [
        ("dpo.betta=0.2", "dpo.betta"),
        ("trainer.max_steps=many", "trainer.max_steps"),
        ("dpo.loss_type=nope", "dpo.loss_type"),
        ("data.over_length=cut", "data.over_length"),
        ("optim.warmup_steps=50", "optim.warmup_steps"),
        ("nokey", "key=value"),
    ],
)
def test_config_errors_name_the_key(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(get_recipe("dpo").config_class, CONFIGS / "dpo_tiny.yaml", [override])


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(RunConfig, tmp_path / "nope.yaml")


def test_wandb_mode_from_the_environment_wins_over_the_default(monkeypatch):
    schema = get_recipe("sft").config_class
    overrides = ["data.train=x", "model.config.vocab_size=8"]
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert load_config(schema, None, overrides).logging.wandb_mode == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert load_config(schema, None, overrides).logging.wandb_mode == "disabled"
    assert load_config(schema, None, [*overrides, "logging.wandb_mode=online"]).logging.wandb_mode == "online"
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ConfigError, match="WANDB_MODE"):
        load_config(schema, None, overrides)


# The sections every online recipe adds besides its own: the rollout engine and the rewards.
ONLINE_SECTIONS = {
    "grpo": {"generation", "reward"},
    "reinforce": {"generation", "reward"},
    "ppo": {"generation", "reward"},
    "rs": {"generation", "reward"},
    "spin": {"generation"},
}


def test_every_recipe_config_is_the_base_plus_its_own_section():
    base = {entry.name for entry in dataclasses.fields(RunConfig)}
    for name in RECIPE_NAMES:
        recipe = get_recipe(name)
        assert issubclass(recipe.config_class, RunConfig) and recipe.name == name
        own = {entry.name for entry in dataclasses.fields(recipe.config_class)} - base
        assert own == {name} | ONLINE_SECTIONS.get(name, set()) or own <= {name}, (name, own)


@pytest.mark.parametrize(
    "args, named",
    [
        (["dpo.betta=0.2"], "dpo.betta"),
        (["model.config.vocab_size=64"], "model.hf_path and model.config are both set"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_a_config_error_is_one_message_without_a_traceback(args, named):
    """Run as users do: the message names the key, it is the last output, exit code 2, before any data is read."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "aligner.recipes.dpo", "--config", str(CONFIGS / "dpo_tiny.yaml"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "ALIGNER_DEBUG": "0", "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-2].startswith("error: ") and named in lines[-2], result.stderr
    assert "ALIGNER_DEBUG=1" in lines[-1]
    assert "Traceback" not in result.stderr and result.stdout == ""
