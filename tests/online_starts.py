"""What the online recipes' tests share: the workers that train their starts and the overrides of a run.

The starts (the demo's SFT model, its reward model) are session fixtures of
tests/recipes/conftest.py, trained by :func:`stage_worker` in a spawned process; the
worker lives here, in a plain module, so that spawned processes import it by name
(a function of a ``conftest`` module is pickled as ``conftest.<name>``, which names
another ``conftest`` when tests of several folders run in one session).
"""

from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def stage_worker(recipe: str, config_file: str, overrides: list[str]) -> None:
    """Run ``aligner.recipes.<recipe>`` with ``configs/<config_file>`` and ``overrides`` in this process."""
    from aligner.config import load_config
    from aligner.recipes import get_recipe

    entry = get_recipe(recipe)
    entry.run(load_config(entry.config_class, CONFIGS / config_file, overrides))


def stage_overrides(demo: Path, kind: str, run: str) -> list[str]:
    """A stage of the demo: its data kind's train/val files, the demo tokenizer, ``<demo>/runs/<run>``, no logs."""
    return [
        f"data.train={demo / 'data' / kind / 'train.jsonl'}",
        f"data.val={demo / 'data' / kind / 'val.jsonl'}",
        f"data.tokenizer={demo / 'tokenizer'}",
        f"checkpoint.dir={demo / 'runs' / run}",
        "logging.tensorboard_dir=null",
        "logging.progress_bar=false",
    ]


def rl_run_overrides(start: Path, run_dir: Path, *, val: bool = False) -> list[str]:
    """An online run from ``start`` (``<demo>/runs/sft/hf``) on the demo's RL prompts, checkpointed in ``run_dir``.

    ``val``: with the held-out prompts (validation rollouts), else none.
    """
    demo = start.parents[2]
    return [
        f"model.hf_path={start}",
        f"data.train={demo / 'data' / 'rl_prompt' / 'train.jsonl'}",
        f"data.val={demo / 'data' / 'rl_prompt' / 'val.jsonl'}" if val else "data.val=null",
        f"data.tokenizer={demo / 'tokenizer'}",
        f"checkpoint.dir={run_dir}",
        "checkpoint.export_hf_at_end=false",
        "logging.tensorboard_dir=null",
        "logging.progress_bar=false",
    ]
