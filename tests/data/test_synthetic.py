"""Synthetic arithmetic tasks: determinism, correct answers and labels, learnable pair separation."""

import random
import re
from pathlib import Path

import pytest

from aligner.data.formats import RECORD_KINDS, read_jsonl
from aligner.data.synthetic import (
    STYLES,
    ArithmeticProblem,
    all_problems,
    kto_rows,
    preference_rows,
    regression_rows,
    reward,
    sft_rows,
    split_problems,
    tokenizer_corpus,
    write_demo_datasets,
    wrong_answer,
)


def test_demo_datasets_are_deterministic(tmp_path: Path):
    first = write_demo_datasets(tmp_path / "a", seed=4, num_train=32, num_val=8)
    second = write_demo_datasets(tmp_path / "b", seed=4, num_train=32, num_val=8)
    other = write_demo_datasets(tmp_path / "c", seed=5, num_train=32, num_val=8)
    assert set(first) == set(RECORD_KINDS)
    for kind in RECORD_KINDS:
        for split in ("train", "val"):
            assert first[kind][split].read_bytes() == second[kind][split].read_bytes()
            assert first[kind][split].read_bytes() != other[kind][split].read_bytes()
            records = read_jsonl(first[kind][split], kind)
            assert len(records) == (32 if split == "train" else 8)


def test_demo_answers_and_labels_are_right(tmp_path: Path):
    paths = write_demo_datasets(tmp_path, seed=0, num_train=128, num_val=32)
    for split in ("train", "val"):
        for record in read_jsonl(paths["sft"][split], "sft"):
            assert reward(record.messages[:-1], record.messages[-1]["content"]) == 1.0
        for record in read_jsonl(paths["preference"][split], "preference"):
            # helpfulness pairs: a right answer over a wrong one, or over a less explained right one
            assert reward(record.prompt, record.chosen) == 1.0
            if reward(record.prompt, record.rejected) == 1.0:
                assert len(record.chosen) > len(record.rejected)
            assert record.chosen_reward > record.rejected_reward
        for record in read_jsonl(paths["kto"][split], "kto"):
            assert reward(record.prompt, record.response) == float(record.desirable)
        for record in read_jsonl(paths["regression"][split], "regression"):
            assert record.attributes["correctness"] == 4.0 * reward(record.prompt, record.response)
        for record in read_jsonl(paths["rl_prompt"][split], "rl_prompt"):
            assert reward(record.prompt, str(record.extra["answer"])) == 1.0


def test_train_and_val_problems_are_disjoint(tmp_path: Path):
    train, val = split_problems(0)
    assert not set(train) & set(val) and len(train) + len(val) == 100
    paths = write_demo_datasets(tmp_path, seed=0, num_train=64, num_val=32)
    questions = {
        split: {record.prompt[0]["content"] for record in read_jsonl(paths["preference"][split], "preference")}
        for split in ("train", "val")
    }
    assert not questions["train"] & questions["val"]


def test_far_wrong_answers_are_above_every_correct_answer():
    """What makes the tiny-model RM/DPO tests learnable: the stated number alone separates right from wrong."""
    problems = all_problems(9)
    max_answer = max(problem.answer for problem in problems)
    rng = random.Random(0)
    for problem in problems:
        for _ in range(5):
            assert max_answer < wrong_answer(problem, rng, max_answer=max_answer) <= 2 * max_answer + 1
            near = wrong_answer(problem, rng, max_answer=max_answer, wrong="near")
            assert near != problem.answer and near >= 0 and abs(near - problem.answer) <= 3
    # a validation split uses the whole task's bound, so its wrong answers never collide with correct ones
    _, val = split_problems(0)
    for row in preference_rows(val, 50, seed=1, max_answer=max_answer):
        assert int(re.findall(r"\d+", row["rejected"])[-1]) > max_answer


def test_generators_are_deterministic_and_styled():
    problems = all_problems(5, ("+", "-", "*"))
    assert all(problem.answer >= 0 for problem in problems)
    for generate in (sft_rows, preference_rows, kto_rows, regression_rows):
        assert generate(problems, 20, seed=3) == generate(problems, 20, seed=3)
        assert generate(problems, 20, seed=3) != generate(problems, 20, seed=4)
    for row in preference_rows(problems, 20, seed=0, pairs="verbosity"):
        assert "because" in row["chosen"] and row["rejected"].isdigit()
        assert reward(row["prompt"], row["chosen"]) == reward(row["prompt"], row["rejected"]) == 1.0
    helpfulness = preference_rows(problems, 400, seed=0, pairs="helpfulness", with_rewards=True)
    by_style = [row for row in helpfulness if reward(row["prompt"], row["rejected"]) == 1.0]
    assert 0.4 < len(by_style) / len(helpfulness) < 0.6
    for row in by_style:  # the more explained answer chosen, labelled by its style (helpfulness 2 + style index)
        chosen, rejected = (style_of(row[key]) for key in ("chosen", "rejected"))
        assert STYLES.index(chosen) > STYLES.index(rejected)
        assert (row["chosen_reward"], row["rejected_reward"]) == (2 + STYLES.index(chosen), 2 + STYLES.index(rejected))
    for row in helpfulness:
        if row not in by_style:
            assert reward(row["prompt"], row["chosen"]) == 1.0 and row["rejected_reward"] == 0.0
    mixed = sft_rows(problems, 1000, seed=0, style={"short": 0.8, "verbose": 0.2})
    verbose = sum("because" in row["output"] for row in mixed) / len(mixed)
    assert 0.15 < verbose < 0.25 and all(row["output"].startswith("The answer is") for row in mixed)
    assert sft_rows(problems, 20, seed=3, style={"terse": 1.0}) == sft_rows(problems, 20, seed=3, style="terse")
    with pytest.raises(ValueError, match="style weights"):
        sft_rows(problems, 2, seed=0, style={"loud": 1.0})
    with pytest.raises(ValueError, match="style weights"):
        sft_rows(problems, 2, seed=0, style={"short": 0.0})
    labels = [row["label"] for row in kto_rows(problems, 400, seed=0, desirable_fraction=0.25)]
    assert 0.15 < sum(labels) / len(labels) < 0.35


def style_of(response: str) -> str:
    return "terse" if response.isdigit() else "verbose" if "because" in response else "short"


def test_response_styles_and_attributes():
    problem = ArithmeticProblem(17, "+", 25)
    assert problem.question == "What is 17 + 25?"
    assert problem.response(42, "terse") == "42"
    assert problem.response(42, "short") == "The answer is 42."
    assert problem.response(42, "verbose") == "The answer is 42 because 17 plus 25 makes 42."
    rows = regression_rows([problem], 60, seed=0)
    by_style = {len(row["response"].split()): row["attributes"] for row in rows if "42" in row["response"]}
    assert by_style[1]["verbosity"] < by_style[4]["verbosity"] < by_style[10]["verbosity"]


@pytest.mark.parametrize(
    ("prompt", "response", "expected"),
    [
        ("What is 17 + 25?", "42", 1.0),
        ("What is 17 + 25?", "The answer is 42 because 17 plus 25 makes 42.", 1.0),
        ("What is 17 + 25?", "The answer is 41.", 0.0),
        ("What is 9 - 4?", "5", 1.0),
        ("What is 3 * 4?", "it is 12", 1.0),
        ("What is 3 * 4?", "no idea", 0.0),
        ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 1 + 1?"}], "2", 1.0),
    ],
)
def test_reward(prompt, response, expected):
    assert reward(prompt, response) == expected


def test_reward_rejects_unknown_prompts():
    with pytest.raises(ValueError, match="no arithmetic question"):
        reward("Tell me a joke.", "42")


def test_bad_problem_sets():
    with pytest.raises(ValueError, match="operators must be"):
        all_problems(3, ("/",))
    with pytest.raises(ValueError, match="leaves an empty split"):
        split_problems(0, max_operand=0)


def test_tokenizer_corpus_is_fixed():
    assert tokenizer_corpus() == tokenizer_corpus()
    assert "What is 20 * 20?" in tokenizer_corpus()
