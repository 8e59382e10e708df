"""Python reward functions named as module:function: resolving the spec and checking what they return."""

import numpy as np
import pytest
import torch
from distributed import run_distributed

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


def model_parallel_worker(tp: int, pp: int) -> dict:
    """Score two rollouts with the fixtures that differ by rank, at this layout."""
    import reward_fixtures

    from aligner.parallel import initialize
    from aligner.rewards import RewardConfig, RewardTerm, build_rewards

    initialize(tp=tp, pp=pp)
    two = RewardInputs(PROMPTS[:2], RESPONSES[:2], EXTRAS[:2])

    def score(spec: str):
        try:
            return build_rewards(RewardConfig(terms=[RewardTerm(function=spec)])).score(two).total.tolist()
        except Exception as error:
            return f"{type(error).__name__}: {error}"

    scores = score("reward_fixtures:rank_dependent")
    return {
        "scores": scores,
        "calls": list(reward_fixtures.CALLS),
        "raises": score("reward_fixtures:fails_on_rank_zero"),
        "nan": score("reward_fixtures:nan_on_rank_zero"),
        "after": score("reward_fixtures:response_length"),  # the group is still usable after the errors
    }


@pytest.mark.slow
@pytest.mark.parametrize("layout", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_a_model_parallel_group_runs_the_function_once_and_shares_its_scores(layout):
    rank0, rank1 = run_distributed(model_parallel_worker, 2, args=layout)
    # both ranks hold the same rollouts: rank 0 scores them, rank 1 gets rank 0's scores without calling
    assert rank0["scores"] == rank1["scores"] == [0.0, 1.0]
    assert (rank0["calls"], rank1["calls"]) == ([0], [])
    # an error on the scoring rank fails both: its own error there, named with its message on the other
    assert rank0["raises"] == "ConnectionError: judge unreachable"
    assert rank1["raises"] == (
        "RewardFunctionError: reward function fails_on_rank_zero failed on rank 0: ConnectionError: judge unreachable"
    )
    assert rank0["nan"].startswith("ValueError: reward function nan_on_rank_zero returned non-finite values")
    assert rank1["nan"].startswith("RewardFunctionError: reward function nan_on_rank_zero failed on rank 0: ValueError")
    assert rank0["after"] == rank1["after"] == [1.0, 16.0]


@pytest.mark.slow
def test_data_parallel_ranks_score_their_own_rollouts():
    rank0, rank1 = run_distributed(model_parallel_worker, 2, args=(1, 1))
    assert (rank0["scores"], rank1["scores"]) == ([0.0, 1.0], [10.0, 11.0])
    assert (rank0["calls"], rank1["calls"]) == ([0], [1])
    assert rank0["raises"] == "ConnectionError: judge unreachable"
    assert rank1["raises"] == [0.0, 0.0]
