"""The exact-answer reward of the synthetic arithmetic task (:mod:`aligner.data.synthetic`).

Config: ``reward.terms: [{function: aligner.rewards.arithmetic:exact_answer}]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from aligner.data import synthetic
from aligner.rewards.inputs import Prompt

ANSWER_FIELD = "answer"  # the extra field synthetic.rl_prompt_rows writes


def exact_answer(
    prompts: Sequence[Prompt], responses: Sequence[str], extras: Sequence[Mapping[str, Any]]
) -> list[float]:
    """1.0 for each response whose stated answer (its last integer) is the right one, else 0.0.

    The right answer is the record's ``answer`` field when it has one (an integer, or a
    string holding one), else the result of the ``What is <a> <op> <b>?`` question in
    the prompt (:func:`aligner.data.synthetic.reward`). A response with no integer
    (garbled, empty) scores 0.0.

    Raises:
        ValueError: an ``answer`` field that is not an integer, or a prompt without a question
            and without an ``answer`` field.
    """
    rewards = []
    for row, (prompt, response, extra) in enumerate(zip(prompts, responses, extras, strict=True)):
        answer = extra.get(ANSWER_FIELD)
        if answer is None:
            rewards.append(synthetic.reward(prompt, response))
            continue
        rewards.append(1.0 if synthetic.stated_answer(response) == _integer(answer, row) else 0.0)
    return rewards


def _integer(answer: Any, row: int) -> int:
    if isinstance(answer, bool):
        raise ValueError(f"row {row}: the 'answer' field must be an integer, got {answer!r}")
    if isinstance(answer, int):
        return answer
    if isinstance(answer, float) and answer.is_integer():
        return int(answer)
    if isinstance(answer, str) and answer.strip().lstrip("-").isdigit():
        return int(answer.strip())
    raise ValueError(f"row {row}: the 'answer' field must be an integer, got {answer!r}")
