"""Rejection sampling's selection: top-n per prompt, ties, the threshold, and the kept set's statistics."""

import math

import pytest
import torch

from aligner.algorithms.rejection import kept_set_metrics, select_top

# Rewards are float32: a hand-written decimal such as 0.7 is off by up to ~3e-8 once stored.
FLOAT32_TOL = 1e-6


def selected(rewards, group_size, **options):
    selection = select_top(torch.tensor(rewards), group_size, **options)
    return selection.rows.tolist(), selection.kept.tolist()


def test_top_one_per_prompt():
    # prompt 0: best is sample 1 (0.9); prompt 1: best is sample 4 (2.0)
    rewards = [0.1, 0.9, 0.5, 0.3, 2.0, -1.0, 0.0, 1.0]
    assert selected(rewards, 4) == ([1, 4], [True, True])


def test_ties_go_to_the_sample_drawn_first():
    # prompt 0: samples 0, 2, 3 tie at 1: the first two drawn (0, 2) win; prompt 1: all tie at 0: samples 4, 5
    rewards = [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert selected(rewards, 4, top_n=2) == ([0, 2, 4, 5], [True, True, True, True])
    assert selected(rewards, 4, top_n=1) == ([0, 4], [True, True])


def test_top_n_are_ordered_best_first():
    rewards = [0.3, -0.5, 0.8, 0.1]
    assert selected(rewards, 4, top_n=4) == ([2, 0, 3, 1], [True] * 4)
    assert selected(rewards, 4, top_n=3) == ([2, 0, 3], [True] * 3)


def test_threshold_keeps_at_least_min_reward_and_may_keep_nothing_of_a_prompt():
    # prompt 0 ranks 2 (0.9), 1 (0.7): both >= 0.5; prompt 1 ranks 5 (0.4), 4 (0.3): neither
    rewards = [0.2, 0.7, 0.9, 0.1, 0.3, 0.4]
    assert selected(rewards, 3, top_n=2, min_reward=0.5) == ([2, 1, 5, 4], [True, True, False, False])
    # prompt 0's second best (0.7) is below 0.8: a prompt may keep fewer than top_n
    assert selected(rewards, 3, top_n=2, min_reward=0.8) == ([2, 1, 5, 4], [True, False, False, False])


def test_threshold_is_inclusive():
    # a 0/1 reward with min_reward 1.0 keeps exactly the right answers
    rewards = [0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert selected(rewards, 3, min_reward=1.0) == ([1, 3], [True, False])


def test_selection_matches_a_plain_python_ranking():
    group_size, top_n, min_reward = 5, 3, 0.0
    # few distinct values, so that ties are common
    rewards = torch.randint(-2, 3, (40 * group_size,)).float() / 2
    selection = select_top(rewards, group_size, top_n=top_n, min_reward=min_reward)
    want_rows, want_kept = [], []
    for start in range(0, rewards.numel(), group_size):
        indices = range(start, start + group_size)
        ranked = sorted(indices, key=lambda index: (-rewards[index].item(), index))[:top_n]
        want_rows += ranked
        want_kept += [rewards[index].item() >= min_reward for index in ranked]
    assert selection.rows.tolist() == want_rows
    assert selection.kept.tolist() == want_kept


def test_kept_set_metrics_hand_worked():
    # the threshold case above: kept samples 2 (0.9, 7 tokens) and 1 (0.7, 5 tokens) of 6; prompt 1 keeps none
    rewards = torch.tensor([0.2, 0.7, 0.9, 0.1, 0.3, 0.4])
    lengths = torch.tensor([3, 5, 7, 2, 4, 6])
    metrics = kept_set_metrics(rewards, select_top(rewards, 3, top_n=2, min_reward=0.5), lengths)
    assert metrics == pytest.approx(
        {
            "kept_count": 2.0,
            "kept_fraction": 2 / 6,
            "kept_reward_mean": 0.8,
            "kept_reward_min": 0.7,
            "reward_min": 0.1,
            "prompts_without_kept": 1.0,
            "kept_response_length_mean": 6.0,
        },
        abs=FLOAT32_TOL,
    )


def test_kept_set_metrics_with_nothing_kept():
    rewards = torch.tensor([0.0, 0.0, 0.0, 0.0])
    metrics = kept_set_metrics(rewards, select_top(rewards, 2, min_reward=1.0), torch.tensor([1, 2, 3, 4]))
    assert metrics["kept_count"] == 0.0 and metrics["kept_fraction"] == 0.0
    assert metrics["prompts_without_kept"] == 2.0
    assert math.isnan(metrics["kept_reward_mean"]) and math.isnan(metrics["kept_reward_min"])
    assert math.isnan(metrics["kept_response_length_mean"])
    assert metrics["reward_min"] == 0.0


@pytest.mark.parametrize(
    ("rewards", "group_size", "options", "match"),
    [
        ([0.0] * 6, 4, {}, "multiple of group_size 4"),
        ([0.0] * 4, 4, {"top_n": 0}, "top_n"),
        ([0.0] * 4, 4, {"top_n": 5}, "top_n"),
        ([[0.0, 1.0]], 2, {}, r"\[prompts \* group_size\]"),
        ([0.0, float("nan"), 1.0, 0.0], 2, {}, r"finite.*\[1\]"),
    ],
)
def test_bad_inputs_are_refused(rewards, group_size, options, match):
    with pytest.raises(ValueError, match=match):
        select_top(torch.tensor(rewards), group_size, **options)
