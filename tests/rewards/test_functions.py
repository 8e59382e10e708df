"""Python reward functions named as module:function: resolving the spec and checking what they return."""

import numpy as np
import pytest
import torch

from aligner.config import ConfigError
from aligner.rewards import FunctionReward, RewardInputs, check_reward_values, resolve_reward_function
from aligner.rewards.arithmetic import exact_answer

PROMPTS = ["What is 1 + 2?", [{"role": "user", "content": "What is 3 + 4?"}], "What is 0 + 0?"]
RESPONSES = ["3", "The answer is 7.", "zero"]
EXTRAS = [{"answer": 3}, {}, {"answer": 0, "source": "synthetic"}]


def inputs() -> RewardInputs:
    return RewardInputs(PROMPTS, RESPONSES, EXTRAS)


def test_a_spec_resolves_to_its_function():
    assert resolve_reward_function("aligner.rewards.arithmetic:exact_answer") is exact_answer
    assert resolve_reward_function(" reward_fixtures : response_length ")(PROMPTS, RESPONSES, EXTRAS) == [
        1.0,
        16.0,
        4.0,
    ]
    assert resolve_reward_function("reward_fixtures:Scorers.constant")(PROMPTS, RESPONSES, EXTRAS) == [2.0] * 3


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("reward_fixtures.response_length", "must be written module:function"),
        ("reward_fixtures:", "must be written module:function"),
        (":response_length", "must be written module:function"),
        ("a:b:c", "must be written module:function"),
        ("no_such_reward_module:score", "no module named 'no_such_reward_module'"),
        ("aligner.no_such_module:score", "no module named 'aligner.no_such_module'"),
        ("broken_reward_module:score", "importing 'broken_reward_module' failed.*not_a_real_dependency_of_aligner"),
        ("reward_fixtures:no_such_function", "'reward_fixtures' has no attribute 'no_such_function'"),
        ("reward_fixtures:Scorers.missing", "'reward_fixtures.Scorers' has no attribute 'missing'"),
        ("reward_fixtures:NOT_CALLABLE", "is a int, not callable"),
    ],
)
def test_a_bad_spec_is_a_config_error_naming_it(spec, message):
    with pytest.raises(ConfigError, match=message) as error:
        resolve_reward_function(spec)
    assert repr(spec) in str(error.value)


def test_function_reward_returns_float32_scores_and_is_named_after_its_function():
    reward = FunctionReward.from_spec("reward_fixtures:response_length")
    assert reward.name == "response_length"
    scores = reward(inputs())
    assert scores.dtype == torch.float32
    assert scores.tolist() == [1.0, 16.0, 4.0]
    assert FunctionReward.from_spec("reward_fixtures:Scorers.constant").name == "constant"
    assert FunctionReward(exact_answer, name="arithmetic").name == "arithmetic"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("reward_fixtures:one_short", "one_short returned 2 values for 3 responses"),
        ("reward_fixtures:with_nan", r"with_nan returned non-finite values \[nan\] at row\(s\) \[1\]"),
        ("reward_fixtures:with_infinity", r"with_infinity returned non-finite values \[inf, inf, inf\]"),
        ("reward_fixtures:with_text", r"with_text returned a non-number at row\(s\) \[0, 1, 2\] \(row 0: '1.0'\)"),
        ("reward_fixtures:with_none", r"with_none returned a non-number .*row 0: None"),
        ("reward_fixtures:a_number", "a_number returned float; it must return a list of 3 floats"),
    ],
)
def test_bad_return_values_are_errors_naming_the_function(spec, message):
    with pytest.raises(ValueError, match=message):
        FunctionReward.from_spec(spec)(inputs())


def test_arrays_tensors_and_numpy_numbers_are_accepted():
    assert check_reward_values(np.array([1, 2.5]), 2, "f") == [1.0, 2.5]
    assert check_reward_values(torch.tensor([0.5, -1.0]), 2, "f") == [0.5, -1.0]
    assert check_reward_values((np.float32(0.25), 3, True), 3, "f") == [0.25, 3.0, 1.0]
    with pytest.raises(ValueError, match="f returned 3 values for 2 responses"):
        check_reward_values(torch.zeros(3), 2, "f")


def test_inputs_must_have_one_row_per_rollout():
    with pytest.raises(ValueError, match="one row per rollout"):
        RewardInputs(PROMPTS, RESPONSES[:2], EXTRAS)
    with pytest.raises(ValueError, match="one row per rollout"):
        RewardInputs(PROMPTS, RESPONSES, EXTRAS, torch.zeros(2, 4, dtype=torch.long), torch.ones(2, dtype=torch.long))
    with pytest.raises(ValueError, match="tokens and lengths together"):
        RewardInputs(PROMPTS, RESPONSES, EXTRAS, torch.zeros(3, 4, dtype=torch.long))
