"""The report of ``make demo``: each stage's curves and scores, and the aligned model's answers.

    python -m aligner.demo_report --dir .demo [--stages sft rm grpo dpo] [--examples 6]

Reads what the demo's stages left under ``<dir>/runs/<stage>/`` (TensorBoard
events in ``tensorboard/``, a Hugging Face export in ``hf/``), then

1. plots every stage's curves into ``<dir>/demo_curves.png``: train and validation
   loss of the offline stages; the reward (train rollouts, held-out greedy) and the
   KL to the reference of the online ones;
2. loads every export with ``transformers`` (``AutoModelForCausalLM``, the demo
   tokenizer) and answers the held-out prompts (``<dir>/data/rl_prompt/val.jsonl``,
   problems no training file holds) greedily, scored by the exact-answer reward
   the RL stage trains on;
3. prints a table, one row per stage: its export's held-out accuracy and the
   headline metrics its run logged; then a few held-out answers of the first
   export (SFT) beside the last (the aligned model).

The stages are the run folders with events, in the order they ran, unless
``--stages`` names them.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from aligner.console import UserError

PLOT_NAME = "demo_curves.png"
HELD_OUT_PROMPTS = Path("data") / "rl_prompt" / "val.jsonl"
TOKENIZER = "tokenizer"
# configs/grpo_tiny.yaml's generation.max_new_tokens: a response is scored as the RL stage saw it.
MAX_NEW_TOKENS = 16
# Rollout rewards are logged per step (128 samples of the tiny config, noisy): the table compares
# the mean of the first and of the last this-many logged values.
REWARD_WINDOW = 5
KL_TAGS = ("train/kl", "train/kl_in_reward")  # GRPO / PPO log the KL to the reference as kl, REINFORCE as kl_in_reward


@dataclass
class StageRun:
    """What one stage left behind.

    Attributes:
        name: the run folder's name (``sft``, ``rm``, ``grpo``, ...).
        scalars: TensorBoard tag -> ``[(step, value), ...]`` in step order.
        started: wall time (s since the epoch) of its first event.
        export: its Hugging Face export folder, None when it wrote none (a reward model).
    """

    name: str
    scalars: dict[str, list[tuple[int, float]]]
    started: float
    export: Path | None

    @property
    def is_online(self) -> bool:
        """It sampled rollouts and logged their reward (GRPO, PPO, REINFORCE)."""
        return "train/reward_mean" in self.scalars


@dataclass
class HeldOutAnswers:
    """One export's greedy answers to the held-out prompts.

    Attributes:
        questions: the user turn of each prompt.
        responses: the decoded responses (special tokens dropped).
        rewards: the exact-answer reward of each (1.0 right, 0.0 wrong).
    """

    questions: list[str]
    responses: list[str]
    rewards: list[float]

    @property
    def accuracy(self) -> float:
        """The fraction of prompts answered right."""
        return sum(self.rewards) / len(self.rewards)


def read_scalars(event_dir: str | Path) -> tuple[dict[str, list[tuple[int, float]]], float]:
    """Every scalar of the TensorBoard event files in ``event_dir``, and the wall time of the first event.

    Raises:
        UserError: ``event_dir`` holds no scalar.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(event_dir), size_guidance={"scalars": 0})  # 0: keep every event
    accumulator.Reload()
    scalars = {
        tag: [(event.step, event.value) for event in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]
    }
    if not scalars:
        raise UserError(f"{event_dir} holds no TensorBoard scalars (did the stage run?)")
    started = min(accumulator.Scalars(tag)[0].wall_time for tag in scalars)
    return scalars, started


def load_stages(runs_dir: str | Path, names: Sequence[str] | None = None) -> list[StageRun]:
    """The stages under ``runs_dir``: ``names`` in that order, else every folder with events, in the order they ran.

    Raises:
        UserError: no stage, or a named stage without events.
    """
    runs_dir = Path(runs_dir)
    in_run_order = names is None
    if names is None:
        names = sorted(path.parent.name for path in runs_dir.glob("*/tensorboard") if path.is_dir())
    if not names:
        raise UserError(f"{runs_dir} holds no stage (<stage>/tensorboard); run `make demo` first")
    missing = [name for name in names if not (runs_dir / name / "tensorboard").is_dir()]
    if missing:
        raise UserError(f"no TensorBoard events for stage(s) {missing} under {runs_dir} (<stage>/tensorboard)")
    stages = []
    for name in names:
        scalars, started = read_scalars(runs_dir / name / "tensorboard")
        export = runs_dir / name / "hf"
        stages.append(StageRun(name, scalars, started, export if (export / "config.json").is_file() else None))
    return sorted(stages, key=lambda stage: stage.started) if in_run_order else stages


def answer_held_out(
    export: str | Path, tokenizer_dir: str | Path, prompts_path: str | Path, *, max_new_tokens: int = MAX_NEW_TOKENS
) -> HeldOutAnswers:
    """Greedy answers of the Hugging Face export ``export`` to the ``rl_prompt`` records of ``prompts_path``.

    Plain ``transformers``: ``AutoModelForCausalLM`` and ``AutoTokenizer`` (``tokenizer_dir``), each
    prompt rendered with the chat template and the generation prompt, as the recipes render it; a
    response ends at eos (or the template's end of turn) or after ``max_new_tokens``. Scored by
    :func:`aligner.rewards.arithmetic.exact_answer`.

    Raises:
        UserError: ``export`` is not a Hugging Face checkpoint folder.
        ValueError, FileNotFoundError: see :func:`aligner.data.formats.read_records`.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aligner.data.formats import read_records
    from aligner.data.tokenizer import stop_token_ids
    from aligner.rewards.arithmetic import exact_answer

    if not (Path(export) / "config.json").is_file():
        raise UserError(f"{export} is not a Hugging Face checkpoint (no config.json)")
    records = read_records(prompts_path, "rl_prompt")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(export).eval()
    stops = stop_token_ids(tokenizer)
    prompt_ids = [
        tokenizer(
            tokenizer.apply_chat_template(record.prompt, tokenize=False, add_generation_prompt=True),
            add_special_tokens=False,  # the template writes bos
        )["input_ids"]
        for record in records
    ]
    # Prompts of one length are one batch, unpadded: every row is answered exactly as it would be alone.
    by_length: dict[int, list[int]] = {}
    for index, ids in enumerate(prompt_ids):
        by_length.setdefault(len(ids), []).append(index)
    responses = [""] * len(records)
    with torch.inference_mode():
        for indices in by_length.values():
            input_ids = torch.tensor([prompt_ids[index] for index in indices])  # [rows, prompt]
            output = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=stops,
                pad_token_id=tokenizer.pad_token_id,
            )
            for index, new_tokens in zip(indices, output[:, input_ids.shape[1] :].tolist(), strict=True):
                ended = [position for position, token in enumerate(new_tokens) if token in stops]
                responses[index] = tokenizer.decode(new_tokens[: ended[0] if ended else None], skip_special_tokens=True)
    rewards = exact_answer([record.prompt for record in records], responses, [record.extra for record in records])
    questions = [record.prompt[-1]["content"] for record in records]
    return HeldOutAnswers(questions, responses, rewards)


def plot_stages(stages: Sequence[StageRun], out: str | Path) -> Path:
    """One panel per stage into the PNG ``out``: loss curves (offline stages), reward and KL (online ones)."""
    # A bare Figure renders on the Agg canvas: no display needed, no pyplot state.
    from matplotlib.figure import Figure

    columns = min(len(stages), 2)
    rows = -(-len(stages) // columns)
    figure = Figure(figsize=(6.0 * columns, 3.8 * rows), layout="constrained")
    panels = figure.subplots(rows, columns, squeeze=False).flatten()
    for panel, stage in itertools.zip_longest(panels, stages):
        if stage is None:
            panel.set_visible(False)
        elif stage.is_online:
            _plot_online(panel, stage)
        else:
            _plot_offline(panel, stage)
    figure.savefig(out, dpi=100)
    return Path(out)


def _plot_offline(panel, stage: StageRun) -> None:
    for tag, style, label in (("train/loss", "-", "train loss"), ("val/loss", "o-", "validation loss")):
        if tag in stage.scalars:
            steps, values = zip(*stage.scalars[tag], strict=True)
            panel.plot(steps, values, style, markersize=3, label=label)
    panel.set(title=f"{stage.name}: loss", xlabel="step", ylabel="loss")
    panel.legend(loc="upper right")


def _plot_online(panel, stage: StageRun) -> None:
    lines = []
    for tag, style, label in (
        ("train/reward_mean", "-", "reward, train rollouts"),
        ("val/reward_mean", "o-", "reward, held-out greedy"),
    ):
        if tag in stage.scalars:
            steps, values = zip(*stage.scalars[tag], strict=True)
            lines += panel.plot(steps, values, style, markersize=4, label=label)
    panel.set(title=f"{stage.name}: reward and KL", xlabel="step", ylabel="reward")
    kl_tag = next((tag for tag in KL_TAGS if tag in stage.scalars), None)
    if kl_tag is not None:
        kl_panel = panel.twinx()
        steps, values = zip(*stage.scalars[kl_tag], strict=True)
        lines += kl_panel.plot(steps, values, "-", color="tab:red", alpha=0.7, label="KL to reference")
        kl_panel.set_ylabel("KL")
    panel.legend(lines, [line.get_label() for line in lines], loc="lower right")


def run_metrics(stage: StageRun) -> str:
    """The headline of what ``stage`` logged: ``train reward 0.33 -> 0.75, held-out reward 0.36 -> 0.56, KL 0.41``."""
    scalars = stage.scalars
    parts = []
    if "val/accuracy" in scalars:  # RM: chosen scored above rejected; DPO: by the implicit reward
        parts.append(f"val pair accuracy {scalars['val/accuracy'][-1][1]:.3f}")
    if "train/loss" in scalars and not stage.is_online:  # an online loss is no progress measure
        parts.append(f"train loss {scalars['train/loss'][0][1]:.3f} -> {scalars['train/loss'][-1][1]:.3f}")
    if "val/loss" in scalars:
        parts.append(f"val loss {scalars['val/loss'][-1][1]:.3f}")
    if "train/reward_mean" in scalars:
        rewards = [value for _, value in scalars["train/reward_mean"]]
        first, last = rewards[:REWARD_WINDOW], rewards[-REWARD_WINDOW:]
        parts.append(f"train reward {sum(first) / len(first):.2f} -> {sum(last) / len(last):.2f}")
    if "val/reward_mean" in scalars:
        held_out = scalars["val/reward_mean"]
        parts.append(f"held-out reward {held_out[0][1]:.3f} -> {held_out[-1][1]:.3f}")
    kl_tag = next((tag for tag in KL_TAGS if tag in scalars), None)
    if kl_tag is not None:
        kl = [value for _, value in scalars[kl_tag][-REWARD_WINDOW:]]
        parts.append(f"KL {sum(kl) / len(kl):.3f}")
    return ", ".join(parts)


def format_table(stages: Sequence[StageRun], answers: dict[str, HeldOutAnswers]) -> list[str]:
    """The table's lines: stage, held-out accuracy of its export (``answers[stage.name]``; ``-`` without), metrics."""
    header = ("stage", "held-out accuracy", "metrics of the run")
    rows = [header]
    for stage in stages:
        held_out = answers.get(stage.name)
        accuracy = (
            "-"
            if held_out is None
            else f"{held_out.accuracy:.3f} ({int(sum(held_out.rewards))}/{len(held_out.rewards)})"
        )
        rows.append((stage.name, accuracy, run_metrics(stage)))
    widths = [max(len(row[column]) for row in rows) for column in range(2)]
    return [f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]}".rstrip() for row in rows]


def format_examples(before: tuple[str, HeldOutAnswers], after: tuple[str, HeldOutAnswers], count: int) -> list[str]:
    """The first ``count`` distinct held-out questions with the two models' answers and whether each is right."""
    (before_name, before_answers), (after_name, after_answers) = before, after
    seen: dict[str, int] = {}
    for index, question in enumerate(before_answers.questions):
        if len(seen) < count:
            seen.setdefault(question, index)
    width = max(len(question) for question in seen)
    lines = []
    for question, index in seen.items():
        answers = [
            f"{name}: {held_out.responses[index]!r} {'right' if held_out.rewards[index] else 'wrong'}"
            for name, held_out in ((before_name, before_answers), (after_name, after_answers))
        ]
        lines.append(f"{question:<{width}}  " + "  |  ".join(answers))
    return lines


def report(demo_dir: str | Path, stages: Sequence[str] | None = None, examples: int = 6) -> list[str]:
    """Plot, evaluate and tabulate the demo under ``demo_dir`` (see the module's docstring); returns the lines printed.

    Raises:
        UserError: no stage ran, or the held-out prompts or the tokenizer are missing.
    """
    demo_dir = Path(demo_dir)
    runs = load_stages(demo_dir / "runs", stages)
    for path in (demo_dir / HELD_OUT_PROMPTS, demo_dir / TOKENIZER):
        if not path.exists():
            raise UserError(f"{path} does not exist: python -m aligner.recipes.prepare_demo --out {demo_dir}")
    plot = plot_stages(runs, demo_dir / PLOT_NAME)
    answers = {
        stage.name: answer_held_out(stage.export, demo_dir / TOKENIZER, demo_dir / HELD_OUT_PROMPTS)
        for stage in runs
        if stage.export is not None
    }
    held_out = next(iter(answers.values()), None)
    size = "" if held_out is None else f"{len(held_out.questions)} prompts, {len(set(held_out.questions))} problems; "
    lines = [
        f"held-out prompts: {demo_dir / HELD_OUT_PROMPTS} ({size}greedy answers of the Hugging Face exports)",
        *format_table(runs, answers),
    ]
    if len(answers) >= 2:
        first, last = next(iter(answers)), next(reversed(answers))
        lines += ["", f"held-out answers before ({first}) and after ({last}) alignment:"]
        lines += format_examples((first, answers[first]), (last, answers[last]), examples)
    lines += ["", f"curves: {plot}", f"TensorBoard: tensorboard --logdir {demo_dir / 'runs'}"]
    for line in lines:
        print(line)
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    from aligner.console import run_entry_point

    def entry() -> None:
        parser = argparse.ArgumentParser(prog="python -m aligner.demo_report", description=__doc__.splitlines()[0])
        parser.add_argument("--dir", default=".demo", help="the demo's folder (default .demo)")
        parser.add_argument("--stages", nargs="+", default=None, help="run folders in order (default: as they ran)")
        parser.add_argument("--examples", type=int, default=6, help="held-out answers to show (default 6)")
        args = parser.parse_args(argv)
        import torch
        from transformers.utils import logging as transformers_logging

        # The models are tiny: one thread is as fast, and never waits on a busy machine's other thread.
        torch.set_num_threads(1)
        transformers_logging.disable_progress_bar()  # one "Loading weights" bar per export otherwise
        report(args.dir, args.stages, args.examples)

    run_entry_point(entry)


if __name__ == "__main__":
    main()
