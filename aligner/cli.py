"""The command line of every recipe: ``--config FILE``, ``key=value`` overrides, ``--help``, ``--print-config``.

    python -m aligner.recipes.dpo --help                                  # every key, its default and meaning
    python -m aligner.recipes.dpo --config configs/dpo_tiny.yaml --print-config dpo.beta=0.2
    torchrun --nproc_per_node=2 -m aligner.recipes.dpo --config configs/dpo_tiny.yaml dpo.beta=0.2

The config is loaded and checked before anything else happens (no data is
read, no process group is created), so a bad key or value ends the run at
once with one line naming it (:mod:`aligner.console`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aligner.config import config_to_yaml, describe_keys, load_config
from aligner.console import UsageError


@dataclass(frozen=True)
class Recipe:
    """One algorithm's entry point.

    Attributes:
        name: the module name under ``aligner.recipes`` (and the prefix of its configs).
        description: one line for ``--help``.
        config_class: its run config (:class:`aligner.config.RunConfig` plus its own section).
        run: ``run(config) -> Run``: trains and returns the finished :class:`aligner.trainers.run.Run`.
    """

    name: str
    description: str
    config_class: type
    run: Callable[[Any], Any]


def _yaml_value(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def keys_help(config_class: type) -> str:
    """Every key of ``config_class`` as ``key = default  meaning`` lines (what ``--help`` prints)."""
    rows = [(key, _yaml_value(default), meaning) for key, default, meaning in describe_keys(config_class)]
    key_width = max(len(key) + len(default) + 3 for key, default, _ in rows)
    return "\n".join(f"  {f'{key} = {default}':<{key_width}}  {meaning}" for key, default, meaning in rows)


def parse_command_line(recipe: Recipe, argv: Sequence[str] | None = None) -> tuple[object, bool]:
    """``(config, print_only)`` from the command line; ``--help`` prints the keys and exits.

    Raises:
        aligner.config.ConfigError: a bad file, key or value (named).
    """
    module = f"aligner.recipes.{recipe.name}"
    parser = argparse.ArgumentParser(
        prog=f"python -m {module}",
        description=f"{recipe.description}\n\nkeys (override any with key=value; default after '='):\n"
        + keys_help(recipe.config_class),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE", help="YAML config (configs/*.yaml); the keys below")
    parser.add_argument("--print-config", action="store_true", help="print the resolved YAML config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=1e-5")

    def usage_error(message: str) -> None:  # one message, once across ranks, exit 2 (aligner.console)
        raise UsageError(f"{message} (see python -m {module} --help)")

    parser.error = usage_error
    args = parser.parse_args(argv)
    return load_config(recipe.config_class, args.config, args.overrides), args.print_config


def main(recipe: Recipe, argv: Sequence[str] | None = None) -> None:
    """Parse the command line, train with ``recipe.run`` and print the outcome (global rank 0).

    Errors a user caused end the run with one message (:func:`aligner.console.run_entry_point`).
    """
    from aligner.console import run_entry_point, setup_console_logging

    def entry() -> None:
        rank = int(os.environ.get("RANK", "0"))
        config, print_only = parse_command_line(recipe, argv)
        if print_only:
            if rank == 0:
                sys.stdout.write(config_to_yaml(config))
            return
        setup_console_logging(rank)
        run = recipe.run(config)
        if rank == 0:
            print(run.report(recipe.name), flush=True)

    run_entry_point(entry)
