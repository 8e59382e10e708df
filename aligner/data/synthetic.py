"""Small arithmetic tasks with known answers, deterministic from a seed, and a programmatic reward.

A problem is ``"What is 3 + 5?"``; answers come in three styles:

=========  ==============================================
terse      ``8``
short      ``The answer is 8.``
verbose    ``The answer is 8 because 3 plus 5 makes 8.``
=========  ==============================================

The tasks are sized for a 2-layer transformer trained for 50-200 steps on a CPU.
Wrong answers default to ``"far"``: drawn above the largest correct answer of the
whole problem set, so a number alone tells right from wrong and a tiny reward
model or DPO policy can separate chosen from rejected on held-out problems;
``"near"`` (off by 1-3) is the hard variant. Train and validation rows come from
disjoint problem sets (:func:`split_problems`).

The demo's files (:func:`write_demo_datasets`) answer mostly short and sometimes
verbose in SFT (:data:`DEMO_SFT_STYLES`), and their preference pairs follow
helpfulness: right over wrong, and an explained right answer over a bare one. So
the demo's reward model prefers explanations its SFT model gives when sampled but
not when greedy, which an RL run against that reward model can learn to give.

Every generator returns plain row dicts in the jsonl formats of
:mod:`aligner.data.formats`; :func:`write_demo_datasets` writes all of them.
"""

from __future__ import annotations

import functools
import json
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Style = Literal["terse", "short", "verbose"]
STYLES: tuple[Style, ...] = ("terse", "short", "verbose")
WrongAnswers = Literal["far", "near"]
OPERATORS = {"+": "plus", "-": "minus", "*": "times"}
_QUESTION = re.compile(r"What is (\d+) ([-+*]) (\d+)\?")
_INTEGER = re.compile(r"-?\d+")


@dataclass(frozen=True)
class ArithmeticProblem:
    """``left <operator> right`` with a non-negative integer answer.

    Attributes:
        left: first operand.
        operator: one of ``+``, ``-``, ``*``.
        right: second operand (never larger than ``left`` for ``-``).
    """

    left: int
    operator: str
    right: int

    @property
    def question(self) -> str:
        """The prompt text, e.g. ``What is 3 + 5?``."""
        return f"What is {self.left} {self.operator} {self.right}?"

    @property
    def answer(self) -> int:
        """The correct result."""
        if self.operator == "+":
            return self.left + self.right
        if self.operator == "-":
            return self.left - self.right
        return self.left * self.right

    def response(self, answer: int, style: Style) -> str:
        """A response stating ``answer`` (right or wrong) in ``style``."""
        if style == "terse":
            return str(answer)
        if style == "short":
            return f"The answer is {answer}."
        return f"The answer is {answer} because {self.left} {OPERATORS[self.operator]} {self.right} makes {answer}."


def all_problems(max_operand: int = 9, operators: Sequence[str] = ("+",)) -> list[ArithmeticProblem]:
    """Every problem with operands in ``[0, max_operand]`` (``left >= right`` for ``-``), in a fixed order.

    Raises:
        ValueError: an unknown operator or a negative ``max_operand``.
    """
    if max_operand < 0:
        raise ValueError(f"max_operand must be >= 0, got {max_operand}")
    unknown = [operator for operator in operators if operator not in OPERATORS]
    if unknown or not operators:
        raise ValueError(f"operators must be a non-empty subset of {list(OPERATORS)}, got {list(operators)}")
    return [
        ArithmeticProblem(left, operator, right)
        for operator in operators
        for left in range(max_operand + 1)
        for right in range(max_operand + 1)
        if operator != "-" or left >= right
    ]


def split_problems(
    seed: int, *, max_operand: int = 9, operators: Sequence[str] = ("+",), val_fraction: float = 0.2
) -> tuple[list[ArithmeticProblem], list[ArithmeticProblem]]:
    """Shuffle :func:`all_problems` with ``seed`` and split it into disjoint train and validation problems.

    Raises:
        ValueError: a ``val_fraction`` that leaves either side empty.
    """
    problems = all_problems(max_operand, operators)
    random.Random(seed).shuffle(problems)
    num_val = round(len(problems) * val_fraction)
    if not 0 < num_val < len(problems):
        raise ValueError(f"val_fraction {val_fraction} leaves an empty split of {len(problems)} problems")
    return problems[num_val:], problems[:num_val]


def wrong_answer(
    problem: ArithmeticProblem, rng: random.Random, *, max_answer: int, wrong: WrongAnswers = "far"
) -> int:
    """An incorrect answer to ``problem``.

    ``"far"`` draws from ``(max_answer, 2 * max_answer + 1]``, above every correct answer of the problem
    set (``max_answer`` is its largest answer); ``"near"`` is the correct answer off by 1-3 (never negative).
    """
    if wrong == "far":
        return max_answer + 1 + rng.randrange(max_answer + 1)
    offsets = [offset for offset in (-3, -2, -1, 1, 2, 3) if problem.answer + offset >= 0]
    return problem.answer + rng.choice(offsets)


def attributes(problem: ArithmeticProblem, answer: int, style: Style) -> dict[str, int]:
    """HelpSteer2-style labels (0-4) of a response: correctness from the truth, verbosity from the style.

    ``helpfulness`` is 0 for a wrong answer and grows with explanation for a right one; ``complexity``
    follows the style; ``coherence`` is 4 for sentences and 3 for a bare number.
    """
    correct = answer == problem.answer
    level = STYLES.index(style)
    return {
        "helpfulness": 2 + level if correct else 0,
        "correctness": 4 if correct else 0,
        "coherence": 3 if style == "terse" else 4,
        "complexity": level,
        "verbosity": 2 * level,
    }


def reward(prompt: str | Sequence[dict[str, str]], response: str) -> float:
    """1.0 when the last integer in ``response`` is the answer to the question in ``prompt``, else 0.0.

    ``prompt`` is the question text or a message list (its last user turn is read).

    Raises:
        ValueError: a prompt with no ``What is <a> <op> <b>?`` question.
    """
    if not isinstance(prompt, str):
        prompt = [message["content"] for message in prompt if message["role"] == "user"][-1]
    match = _QUESTION.search(prompt)
    if match is None:
        raise ValueError(f"no arithmetic question in prompt {prompt!r}")
    problem = ArithmeticProblem(int(match.group(1)), match.group(2), int(match.group(3)))
    return 1.0 if stated_answer(response) == problem.answer else 0.0


def stated_answer(response: str) -> int | None:
    """The answer a response states: its last integer (``"The answer is 8."`` -> 8), None when it has none."""
    numbers = _INTEGER.findall(response)
    return int(numbers[-1]) if numbers else None


# The demo's SFT answers: mostly short, some verbose. Greedy decoding answers short, while sampling explains
# itself often enough that an RL run rewarded for explanations (the demo's helpfulness reward model) finds them.
DEMO_SFT_STYLES: dict[Style, float] = {"short": 0.8, "verbose": 0.2}


def _max_answer(problems: Sequence[ArithmeticProblem], max_answer: int | None) -> int:
    return max(problem.answer for problem in problems) if max_answer is None else max_answer


def sft_rows(
    problems: Sequence[ArithmeticProblem],
    num_rows: int,
    seed: int,
    *,
    style: Style | Mapping[Style, float] = "short",
) -> list[dict[str, Any]]:
    """``{"input", "output"}`` rows answering randomly drawn problems correctly in ``style``.

    ``style`` is one style for every row, or a mapping of styles to weights from which each row's
    style is drawn (e.g. :data:`DEMO_SFT_STYLES`).

    Raises:
        ValueError: a style mapping with an unknown style or no positive weight.
    """
    weights = {style: 1.0} if isinstance(style, str) else dict(style)
    if any(name not in STYLES for name in weights) or not any(weight > 0 for weight in weights.values()):
        raise ValueError(f"style weights need styles of {list(STYLES)} and a positive weight, got {weights}")
    rng = random.Random(seed)
    rows = []
    for _ in range(num_rows):
        problem = rng.choice(problems)
        # one style draws nothing, so its rows are those of the single-style generator
        row_style = next(iter(weights)) if len(weights) == 1 else rng.choices(list(weights), list(weights.values()))[0]
        rows.append({"input": problem.question, "output": problem.response(problem.answer, row_style)})
    return rows


def preference_rows(
    problems: Sequence[ArithmeticProblem],
    num_rows: int,
    seed: int,
    *,
    pairs: Literal["correctness", "verbosity", "helpfulness"] = "correctness",
    wrong: WrongAnswers = "far",
    with_rewards: bool = False,
    max_answer: int | None = None,
) -> list[dict[str, Any]]:
    """``{"prompt", "chosen", "rejected"}`` rows.

    ``pairs="correctness"``: chosen states the right answer, rejected a wrong one, both in the same
    (random) style so only correctness differs. ``pairs="verbosity"``: both right, chosen verbose,
    rejected terse. ``pairs="helpfulness"``: ordered by the helpfulness label of :func:`attributes`, as
    HelpSteer-style preferences are: half the rows are correctness pairs, half two right answers in
    different styles with the more explained one chosen (verbose over short over terse).
    ``with_rewards`` adds ``chosen_reward``/``rejected_reward`` (the helpfulness label).
    ``max_answer`` bounds the correct answers of the whole task for ``wrong="far"`` (default: the largest
    answer in ``problems``; pass the full task's when generating one split of it).
    """
    rng = random.Random(seed)
    max_answer = _max_answer(problems, max_answer)
    rows = []
    for _ in range(num_rows):
        problem = rng.choice(problems)
        if pairs == "helpfulness" and rng.random() < 0.5:
            less, more = sorted(rng.sample(STYLES, 2), key=STYLES.index)
            chosen, rejected = (problem.answer, more), (problem.answer, less)
        elif pairs in ("correctness", "helpfulness"):
            style = rng.choice(STYLES)
            chosen = (problem.answer, style)
            rejected = (wrong_answer(problem, rng, max_answer=max_answer, wrong=wrong), style)
        else:
            chosen, rejected = (problem.answer, "verbose"), (problem.answer, "terse")
        row: dict[str, Any] = {
            "prompt": problem.question,
            "chosen": problem.response(*chosen),
            "rejected": problem.response(*rejected),
        }
        if with_rewards:
            row["chosen_reward"] = float(attributes(problem, *chosen)["helpfulness"])
            row["rejected_reward"] = float(attributes(problem, *rejected)["helpfulness"])
        rows.append(row)
    return rows


def kto_rows(
    problems: Sequence[ArithmeticProblem],
    num_rows: int,
    seed: int,
    *,
    desirable_fraction: float = 0.5,
    wrong: WrongAnswers = "far",
    max_answer: int | None = None,
) -> list[dict[str, Any]]:
    """``{"prompt", "response", "label"}`` rows; desirable (``label: true``) exactly when the answer is right.

    ``max_answer`` as in :func:`preference_rows`.
    """
    rng = random.Random(seed)
    max_answer = _max_answer(problems, max_answer)
    rows = []
    for _ in range(num_rows):
        problem = rng.choice(problems)
        desirable = rng.random() < desirable_fraction
        answer = problem.answer if desirable else wrong_answer(problem, rng, max_answer=max_answer, wrong=wrong)
        style = rng.choice(STYLES)
        rows.append({"prompt": problem.question, "response": problem.response(answer, style), "label": desirable})
    return rows


def regression_rows(
    problems: Sequence[ArithmeticProblem],
    num_rows: int,
    seed: int,
    *,
    correct_fraction: float = 0.5,
    wrong: WrongAnswers = "far",
    max_answer: int | None = None,
) -> list[dict[str, Any]]:
    """``{"prompt", "response", "attributes"}`` rows over every style, labelled by :func:`attributes`.

    ``max_answer`` as in :func:`preference_rows`.
    """
    rng = random.Random(seed)
    max_answer = _max_answer(problems, max_answer)
    rows = []
    for _ in range(num_rows):
        problem = rng.choice(problems)
        correct = rng.random() < correct_fraction
        answer = problem.answer if correct else wrong_answer(problem, rng, max_answer=max_answer, wrong=wrong)
        style = rng.choice(STYLES)
        rows.append(
            {
                "prompt": problem.question,
                "response": problem.response(answer, style),
                "attributes": attributes(problem, answer, style),
            }
        )
    return rows


def rl_prompt_rows(problems: Sequence[ArithmeticProblem], num_rows: int, seed: int) -> list[dict[str, Any]]:
    """``{"prompt", "answer"}`` rows; the answer rides along as an extra field for reward functions."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num_rows):
        problem = rng.choice(problems)
        rows.append({"prompt": problem.question, "answer": problem.answer})
    return rows


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write one JSON object per line (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row) + "\n")
    return path


def write_demo_datasets(
    out_dir: str | Path, seed: int = 0, *, num_train: int = 512, num_val: int = 64, max_operand: int = 9
) -> dict[str, dict[str, Path]]:
    """Write ``<out_dir>/<kind>/{train,val}.jsonl`` for every record kind from disjoint problem sets.

    Kinds: sft (:data:`DEMO_SFT_STYLES`), preference (``pairs="helpfulness"``), regression, kto,
    rl_prompt. Preference rows carry rewards (usable by RPO and plain DPO alike). Returns
    ``{kind: {"train": path, "val": path}}``.
    """
    train_problems, val_problems = split_problems(seed, max_operand=max_operand)
    max_answer = max(problem.answer for problem in train_problems + val_problems)
    generators = {
        "sft": functools.partial(sft_rows, style=DEMO_SFT_STYLES),
        "preference": functools.partial(preference_rows, pairs="helpfulness", with_rewards=True, max_answer=max_answer),
        "regression": functools.partial(regression_rows, max_answer=max_answer),
        "kto": functools.partial(kto_rows, max_answer=max_answer),
        "rl_prompt": rl_prompt_rows,
    }
    paths: dict[str, dict[str, Path]] = {}
    for offset, (kind, generate) in enumerate(generators.items()):
        # Distinct seeds per kind and split, so the files are not copies of each other.
        train_rows = generate(train_problems, num_train, seed * 1000 + 2 * offset)
        val_rows = generate(val_problems, num_val, seed * 1000 + 2 * offset + 1)
        paths[kind] = {
            "train": write_jsonl(train_rows, Path(out_dir) / kind / "train.jsonl"),
            "val": write_jsonl(val_rows, Path(out_dir) / kind / "val.jsonl"),
        }
    return paths


def tokenizer_corpus(max_operand: int = 20) -> list[str]:
    """Texts to train the demo tokenizer on: every question and answer style of ``+ - *`` up to ``max_operand``.

    Deterministic (no randomness), so a tokenizer trained on it is too.
    """
    texts = ["You are a helpful assistant.", "Answer the question.", "system", "user", "assistant"]
    for problem in all_problems(max_operand, tuple(OPERATORS)):
        texts.append(problem.question)
        texts.extend(problem.response(problem.answer, style) for style in STYLES)
    return texts
