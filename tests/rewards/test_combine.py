"""Weighted sums of rewards, their metrics (also over two gloo processes), and the reward config section."""

from dataclasses import dataclass, field

import pytest
import torch
from distributed import run_distributed

from aligner.config import ConfigError, describe_keys, load_config
from aligner.rewards import (
    CombinedReward,
    RewardConfig,
    RewardInputs,
    RewardTerm,
    WeightedReward,
    build_rewards,
    reward_metrics,
)

ROWS = 12
# Sums of a dozen float32 scores in float64, then cast: within a float32 rounding of the reference.
RTOL, ATOL = 1e-6, 1e-6


@dataclass
class OnlineConfig:
    """A config with a reward section, as an online recipe's would have.

    Attributes:
        reward: the rewards.
    """

    reward: RewardConfig = field(default_factory=RewardConfig)


def constant_inputs(rows: int = ROWS) -> RewardInputs:
    return RewardInputs(["What is 1 + 1?"] * rows, ["2"] * rows, [{}] * rows)


def fixed(values: torch.Tensor):
    return lambda inputs: values


def test_the_total_is_the_weighted_sum_of_the_terms():
    first, second, third = torch.randn(ROWS), torch.randn(ROWS) * 5, torch.rand(ROWS)
    combined = CombinedReward(
        [
            WeightedReward("first", 1.0, fixed(first)),
            WeightedReward("second", -0.25, fixed(second)),
            WeightedReward("third", 3.0, fixed(third)),
        ]
    )
    scored = combined.score(constant_inputs())
    expected = first.double() - 0.25 * second.double() + 3.0 * third.double()
    torch.testing.assert_close(scored.total, expected.float(), rtol=RTOL, atol=ATOL)
    assert scored.total.dtype == torch.float32
    assert list(scored.terms) == ["first", "second", "third"]
    assert torch.equal(scored.terms["second"], second)  # terms are reported before weighting


def test_metrics_are_the_mean_and_population_std_of_each_term_and_the_total():
    first, second = torch.randn(ROWS), torch.randn(ROWS) + 2
    scored = CombinedReward(
        [WeightedReward("first", 2.0, fixed(first)), WeightedReward("second", 1.0, fixed(second))]
    ).score(constant_inputs())
    total = 2.0 * first.double() + second.double()
    expected = {
        "reward_mean": total.mean(),
        "reward_std": total.std(correction=0),
        "reward_first_mean": first.double().mean(),
        "reward_first_std": first.double().std(correction=0),
        "reward_second_mean": second.double().mean(),
        "reward_second_std": second.double().std(correction=0),
    }
    assert set(scored.metrics) == set(expected)
    for name, value in expected.items():
        assert scored.metrics[name] == pytest.approx(value.item(), rel=1e-9, abs=1e-9), name


def test_empty_inputs_give_zero_metrics():
    combined = CombinedReward([WeightedReward("first", 1.0, fixed(torch.zeros(0)))])
    scored = combined.score(constant_inputs(0))
    assert scored.total.shape == (0,)
    assert scored.metrics == {"reward_mean": 0.0, "reward_std": 0.0, "reward_first_mean": 0.0, "reward_first_std": 0.0}


def test_a_term_with_the_wrong_number_of_scores_is_an_error_naming_it():
    combined = CombinedReward([WeightedReward("short", 1.0, fixed(torch.zeros(ROWS - 1)))])
    with pytest.raises(ValueError, match=r"reward short gave scores of shape \(11,\) for 12 rollouts"):
        combined.score(constant_inputs())
    with pytest.raises(ValueError, match="distinct names"):
        CombinedReward(
            [WeightedReward("a", 1.0, fixed(torch.zeros(1))), WeightedReward("a", 1.0, fixed(torch.zeros(1)))]
        )
    with pytest.raises(ValueError, match="at least one term"):
        CombinedReward([])


def metrics_worker(values_by_rank: list[list[float]]) -> dict[str, float]:
    """This rank's share of the rollouts, scored with the metrics reduced over both ranks."""
    import os

    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        scores = torch.tensor(values_by_rank[int(os.environ["RANK"])])
        return reward_metrics(2.0 * scores, {"term": scores}, group=dist.group.WORLD)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_metrics_over_a_group_cover_every_rank():
    # Two ranks with different numbers of rollouts: the statistics are those of all of them together.
    rank0, rank1 = torch.randn(5) * 3, torch.randn(3) + 1
    per_rank = run_distributed(metrics_worker, 2, args=([rank0.tolist(), rank1.tolist()],))
    everything = torch.cat([rank0, rank1]).double()
    expected = reward_metrics(2.0 * everything, {"term": everything})
    for metrics in per_rank:
        assert metrics == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert expected["reward_term_mean"] == pytest.approx(everything.mean().item())


# --- the config section --------------------------------------------------------------------------------


def test_the_reward_section_loads_from_yaml(tmp_path):
    path = tmp_path / "online.yaml"
    path.write_text(
        "reward:\n"
        "  terms:\n"
        "    - function: aligner.rewards.arithmetic:exact_answer\n"
        "    - model: runs/rm\n"
        "      attribute_weights: {helpfulness: 1.0, verbosity: -0.5}\n"
        "      weight: 0.5\n"
        "      name: helpful\n"
        "  model_micro_batch_size: 4\n"
    )
    config = load_config(OnlineConfig, path)
    assert config.reward.terms == [
        RewardTerm(function="aligner.rewards.arithmetic:exact_answer"),
        RewardTerm(
            model="runs/rm", attribute_weights={"helpfulness": 1.0, "verbosity": -0.5}, weight=0.5, name="helpful"
        ),
    ]
    assert [term.metric_name for term in config.reward.terms] == ["exact_answer", "helpful"]
    assert config.reward.model_micro_batch_size == 4
    assert config.reward.missing_eos_penalty == 0.0
    assert [key for key, _, _ in describe_keys(OnlineConfig)] == [
        "reward.terms",
        "reward.model_micro_batch_size",
        "reward.missing_eos_penalty",
    ]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["reward.terms=[{functon: 'a:b'}]"], "functon"),
        (["reward.terms=[{weight: 2.0}]"], "set exactly one of function"),
        (["reward.terms=[{function: 'a:b', model: runs/rm}]"], "set exactly one of function"),
        (["reward.terms=[{function: 'a.b'}]"], "must be written module:function"),
        (["reward.terms=[{function: 'a:b', attribute_weights: {x: 1.0}}]"], "applies to reward models"),
        (["reward.terms=[{model: runs/rm, weight: .nan}]"], "weight must be a finite number"),
        (["reward.terms=[{function: 'a:b', name: 'bad name'}]"], "name must be letters"),
        (["reward.terms=[{function: 'x:score'}, {function: 'y:score'}]"], r"several terms are named \['score'\]"),
        (["reward.terms=[{model: a}, {model: b}]"], r"named \['reward_model'\]"),
        (["reward.model_micro_batch_size=0"], "model_micro_batch_size must be >= 1"),
        (["reward.missing_eos_penalty=-1.0"], "missing_eos_penalty must be a finite number >= 0"),
        (["reward.missing_eos_penalty=.inf"], "missing_eos_penalty must be a finite number >= 0"),
        (
            ["reward.terms=[{function: 'a:b', name: missing_eos}]", "reward.missing_eos_penalty=1.0"],
            "the missing-eos penalty's metric",
        ),
    ],
)
def test_config_errors_name_the_problem(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(OnlineConfig, overrides=overrides)


def test_building_from_the_config_resolves_functions_and_needs_a_term():
    config = RewardConfig(
        terms=[
            RewardTerm(function="aligner.rewards.arithmetic:exact_answer", weight=2.0),
            RewardTerm(function="reward_fixtures:response_length", weight=-0.5, name="length"),
        ]
    )
    rewards = build_rewards(config)
    inputs = RewardInputs(["What is 2 + 2?", "What is 2 + 3?"], ["4", "The answer is 6."], [{}, {"answer": 5}])
    scored = rewards.score(inputs)
    assert scored.terms["exact_answer"].tolist() == [1.0, 0.0]
    assert scored.terms["length"].tolist() == [1.0, 16.0]
    assert scored.total.tolist() == [2.0 - 0.5, -8.0]
    with pytest.raises(ConfigError, match="reward.terms is empty"):
        build_rewards(RewardConfig())
    with pytest.raises(ConfigError, match="no module named 'no_such_reward_module'"):
        build_rewards(RewardConfig(terms=[RewardTerm(function="no_such_reward_module:score")]))


def test_the_missing_eos_penalty_is_subtracted_from_responses_that_never_ended():
    exact = RewardTerm(function="aligner.rewards.arithmetic:exact_answer")
    config = RewardConfig(terms=[exact], missing_eos_penalty=2.5)
    rewards = build_rewards(config)
    prompts, responses = ["What is 2 + 2?"] * 4, ["4", "The answer is 4 because", "5", "The answer is"]
    is_end = torch.tensor([True, False, True, False])
    scored = rewards.score(RewardInputs(prompts, responses, [{}] * 4, is_end=is_end))
    # exact answer [1, 1, 0, 0] (the cut-off one states 4 too), minus 2.5 where the response never ended
    assert scored.total.tolist() == [1.0, 1.0 - 2.5, 0.0, -2.5]
    assert scored.terms["missing_eos"].tolist() == [0.0, 1.0, 0.0, 1.0]
    assert scored.metrics["reward_missing_eos_mean"] == 0.5
    with pytest.raises(ValueError, match="needs the rollouts' is_end"):
        rewards.score(RewardInputs(prompts, responses, [{}] * 4))
    with pytest.raises(ValueError, match="one row per rollout"):
        RewardInputs(prompts, responses, [{}] * 4, is_end=is_end[:3])
    # no penalty: no term, and is_end is not needed
    plain = build_rewards(RewardConfig(terms=config.terms))
    assert [term.name for term in plain.terms] == ["exact_answer"]
    assert plain.score(RewardInputs(prompts, responses, [{}] * 4)).total.tolist() == [1.0, 1.0, 0.0, 0.0]
