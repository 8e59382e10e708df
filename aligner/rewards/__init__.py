"""Rewards for online RL: one interface over Python reward functions and frozen reward models.

- :mod:`~aligner.rewards.inputs`: :class:`RewardInputs`, what every reward sees of a batch of rollouts.
- :mod:`~aligner.rewards.functions`: ``module:function`` reward functions, resolved and their outputs checked.
- :mod:`~aligner.rewards.arithmetic`: ``exact_answer``, the synthetic arithmetic task's checker.
- :mod:`~aligner.rewards.model`: :class:`~aligner.rewards.model.RewardModelScorer`, an rm recipe checkpoint
  scoring token sequences forward-only at the trainer's parallel layout (imported on use: megatron-core
  takes seconds to import).
- :mod:`~aligner.rewards.combine`: :class:`CombinedReward`, the weighted sum with per-term metrics, and
  :func:`build_rewards` from the config.
- :mod:`~aligner.rewards.config`: :class:`RewardConfig`, the ``reward`` section of an online recipe.
"""

from aligner.rewards.combine import CombinedReward, RewardScores, WeightedReward, build_rewards, reward_metrics
from aligner.rewards.config import RewardConfig, RewardTerm
from aligner.rewards.functions import (
    FunctionReward,
    RewardFunctionError,
    check_reward_values,
    resolve_reward_function,
)
from aligner.rewards.inputs import Prompt, RewardInputs

__all__ = [
    "CombinedReward",
    "FunctionReward",
    "Prompt",
    "RewardConfig",
    "RewardFunctionError",
    "RewardInputs",
    "RewardScores",
    "RewardTerm",
    "WeightedReward",
    "build_rewards",
    "check_reward_values",
    "reward_metrics",
    "resolve_reward_function",
]
