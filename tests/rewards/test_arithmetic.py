"""The synthetic arithmetic task's exact-answer reward: correct, incorrect and garbled answers."""

import pytest

from aligner.data.synthetic import ArithmeticProblem, all_problems, rl_prompt_rows
from aligner.rewards import FunctionReward, RewardInputs
from aligner.rewards.arithmetic import exact_answer

PROBLEM = ArithmeticProblem(7, "*", 6)  # 42


def score(response, extra=None, prompt=PROBLEM.question):
    (value,) = exact_answer([prompt], [response], [extra or {}])
    return value


@pytest.mark.parametrize("extra", [{}, {"answer": 42}, {"answer": "42"}, {"answer": 42.0}])
@pytest.mark.parametrize("style", ["terse", "short", "verbose"])
def test_the_right_answer_scores_1_in_every_style(style, extra):
    assert score(PROBLEM.response(42, style), extra) == 1.0


@pytest.mark.parametrize("extra", [{}, {"answer": 42}])
@pytest.mark.parametrize("response", ["41", "The answer is 43.", "The answer is 42 because 7 times 6 makes 41."])
def test_a_wrong_answer_scores_0(response, extra):
    assert score(response, extra) == 0.0


@pytest.mark.parametrize("response", ["", "The answer is forty-two.", "???", "<|eos|>", "4 2"])
def test_a_garbled_answer_scores_0(response):
    assert score(response) == 0.0
    assert score(response, {"answer": 42}) == 0.0


def test_the_answer_field_is_the_truth_when_present():
    # The record's answer wins over the prompt's question (a prompt without one needs the field).
    assert score("5", {"answer": 5}) == 1.0
    assert score("42", {"answer": 5}) == 0.0
    assert score("5", {"answer": 5}, prompt="Add two and three.") == 1.0


def test_a_chat_prompt_is_read_at_its_last_user_turn():
    messages = [
        {"role": "system", "content": "What is 1 + 1?"},
        {"role": "user", "content": PROBLEM.question},
    ]
    assert score("42", prompt=messages) == 1.0
    assert score("2", prompt=messages) == 0.0


def test_a_prompt_without_question_or_answer_is_an_error():
    with pytest.raises(ValueError, match="no arithmetic question"):
        score("42", prompt="Tell me a joke.")
    with pytest.raises(ValueError, match="row 0: the 'answer' field must be an integer, got 'forty-two'"):
        score("42", {"answer": "forty-two"})
    with pytest.raises(ValueError, match="must be an integer, got True"):
        score("42", {"answer": True})


def test_the_synthetic_prompt_rows_carry_their_answer():
    rows = rl_prompt_rows(all_problems(5, ("+", "-", "*")), 20, seed=3)
    prompts = [row["prompt"] for row in rows]
    extras = [{name: value for name, value in row.items() if name != "prompt"} for row in rows]
    assert all(isinstance(extra["answer"], int) for extra in extras)
    right = [str(extra["answer"]) for extra in extras]
    wrong = [str(extra["answer"] + 1) for extra in extras]
    reward = FunctionReward.from_spec("aligner.rewards.arithmetic:exact_answer")
    assert reward(RewardInputs(prompts, right, extras)).tolist() == [1.0] * 20
    assert reward(RewardInputs(prompts, wrong, extras)).tolist() == [0.0] * 20
    # Without the field, the question in the prompt gives the same verdicts.
    assert reward(RewardInputs(prompts, right, [{}] * 20)).tolist() == [1.0] * 20
