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


# fp32 on CPU; TP/PP only reorder sums (split matmuls, all-reduces): a few ulps per step, amplified by a
# couple of Adam steps (as the offline recipes' layout tests).
PARALLEL_RTOL, PARALLEL_ATOL = 1e-4, 1e-5


def assert_steps_close(history: list[dict], want_history: list[dict], names, *, label: str) -> None:
    """The ``names`` metrics of every step of ``history`` equal ``want_history``'s within the layout tolerance."""
    import torch

    got = torch.tensor([[step[name] for name in names] for step in history])
    want = torch.tensor([[step[name] for name in names] for step in want_history])
    torch.testing.assert_close(got, want, rtol=PARALLEL_RTOL, atol=PARALLEL_ATOL, msg=lambda m: f"{label}: {m}")


def assert_resumed_bitwise(first: dict, second: dict, straight: dict, names, models=("weights",)) -> None:
    """A run stopped (``first``) and resumed (``second``) equals the ``straight`` run bitwise.

    The ``names`` metrics of every step and every weight of each of ``models`` (keys of the
    results holding full state dicts) are equal; and the stopped run's weights differ from the
    final ones, so that the comparison is not vacuous.
    """
    import torch

    resumed = first["history"] + second["history"]
    for name in names:
        assert [step[name] for step in resumed] == [step[name] for step in straight["history"]], name
    for model in models:
        for name, want in straight[model].items():
            assert torch.equal(second[model][name], want), (model, name)
        probe = "decoder.final_layernorm.weight"
        assert not torch.equal(first[model][probe], straight[model][probe]), model
