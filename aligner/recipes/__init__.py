"""torchrun entry points, one per algorithm: ``python -m aligner.recipes.<name> --config ... [key=value ...]``.

Each recipe module reads top to bottom: config -> data -> models -> reference
-> loss -> loop, on the shared pieces of :mod:`aligner.trainers`, and declares
itself with a :class:`aligner.cli.Recipe` (its config class and ``run``). The registry
:data:`RECIPE_NAMES` / :func:`get_recipe` is how tools and tests find them.
:mod:`aligner.recipes.prepare_demo` writes the synthetic data and tokenizer the
tiny configs use.
"""

from __future__ import annotations

import importlib

RECIPE_NAMES = ("sft", "rm", "dpo", "kto", "steerlm", "grpo", "reinforce", "ppo", "spin", "rs")


def get_recipe(name: str):
    """The registered :class:`aligner.cli.Recipe` ``name`` (its module is imported on first use).

    Raises:
        KeyError: no such recipe.
    """
    if name not in RECIPE_NAMES:
        raise KeyError(f"no recipe {name!r}; the recipes are {', '.join(RECIPE_NAMES)}")
    return importlib.import_module(f"aligner.recipes.{name}").RECIPE
