"""Several rewards summed with weights into one reward per rollout, with each term's mean and std.

rewards = build_rewards(config.reward, pad_token_id=tokenizer.pad_token_id)   # every rank: a collective
scored = rewards.score(RewardInputs(prompts, responses, extras, tokens, lengths),
                       group=parallel_state.get_data_parallel_group())
scored.total          # [N] float32: sum_j weight_j * term_j
scored.terms["exact_answer"]   # [N] float32, unweighted
scored.metrics        # reward_mean, reward_std, reward_<name>_mean, reward_<name>_std

``reward.missing_eos_penalty`` joins the sum as one more term, ``missing_eos`` (1 for a response
that never ended), weighted by minus the penalty.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import Tensor

from aligner.rewards.config import MISSING_EOS, RewardConfig
from aligner.rewards.inputs import RewardInputs

Reward = Callable[[RewardInputs], Tensor]  # [N] float32 scores of N rollouts


@dataclass(frozen=True)
class WeightedReward:
    """One term of a :class:`CombinedReward`.

    Attributes:
        name: its metric name.
        weight: its weight in the sum.
        reward: a :class:`~aligner.rewards.functions.FunctionReward`, a
            :class:`~aligner.rewards.model.RewardModelScorer` or any callable from inputs to ``[N]`` scores.
    """

    name: str
    weight: float
    reward: Reward


@dataclass(frozen=True)
class RewardScores:
    """The rewards of ``N`` rollouts.

    Attributes:
        total: ``[N]`` float32, ``sum_j weight_j * terms[name_j]`` (summed in float64).
        terms: each term's ``[N]`` float32 scores by name, before weighting.
        metrics: ``reward_mean`` / ``reward_std`` of ``total`` and ``reward_<name>_mean`` /
            ``reward_<name>_std`` of each term (:func:`reward_metrics`).
    """

    total: Tensor
    terms: dict[str, Tensor]
    metrics: dict[str, float]


class CombinedReward:
    """A weighted sum of rewards.

    Args:
        terms: the rewards; their names must differ.

    Raises:
        ValueError: no term, or two terms of one name.
    """

    def __init__(self, terms: list[WeightedReward]) -> None:
        if not terms:
            raise ValueError("a combined reward needs at least one term")
        names = [term.name for term in terms]
        if len(set(names)) != len(names):
            raise ValueError(f"reward terms need distinct names, got {names}")
        self.terms = list(terms)

    def score(self, inputs: RewardInputs, *, group: dist.ProcessGroup | None = None) -> RewardScores:
        """Score ``inputs`` with every term and sum them; a collective with a reward model term or a ``group``.

        Args:
            inputs: the rollouts (with ``tokens`` and ``lengths`` when a term is a reward model).
            group: the process group whose rollouts the metrics cover (the data-parallel group);
                None: only these rollouts.

        Raises:
            ValueError: a term returns the wrong number of scores, or what the terms raise.
        """
        scores: dict[str, Tensor] = {}
        total = torch.zeros(len(inputs), dtype=torch.float64)
        for term in self.terms:
            values = term.reward(inputs).detach().float().cpu()
            if values.shape != (len(inputs),):
                raise ValueError(
                    f"reward {term.name} gave scores of shape {tuple(values.shape)} for {len(inputs)} rollouts"
                )
            scores[term.name] = values
            total += term.weight * values.double()
        return RewardScores(total=total.float(), terms=scores, metrics=reward_metrics(total, scores, group=group))


def reward_metrics(
    total: Tensor, terms: dict[str, Tensor], *, group: dist.ProcessGroup | None = None
) -> dict[str, float]:
    """Mean and (population) standard deviation of the total reward and of each term.

    ``reward_mean``, ``reward_std``, then ``reward_<name>_mean``, ``reward_<name>_std`` per term. With
    ``group`` the statistics cover the rollouts of every rank of the group (one all-reduce of
    ``3 * (terms + 1)`` numbers); empty inputs give 0.

    Args:
        total: ``[N]`` summed rewards.
        terms: ``[N]`` scores by term name.
        group: the process group to reduce over; None: these rollouts only.
    """
    series = {"reward": total, **{f"reward_{name}": values for name, values in terms.items()}}
    stats = torch.stack(
        [
            torch.stack(
                [
                    values.double().sum(),
                    values.double().square().sum(),
                    torch.tensor(values.numel(), dtype=torch.float64),
                ]
            )
            for values in series.values()
        ]
    )  # [series, (sum, sum of squares, count)]
    if group is not None:
        if dist.get_backend(group) == "nccl":
            stats = stats.cuda()
        dist.all_reduce(stats, group=group)
        stats = stats.cpu()
    metrics = {}
    for prefix, (total_sum, square_sum, count) in zip(series, stats.tolist(), strict=True):
        mean = total_sum / count if count else 0.0
        variance = max(square_sum / count - mean * mean, 0.0) if count else 0.0
        metrics[f"{prefix}_mean"] = mean
        metrics[f"{prefix}_std"] = variance**0.5
    return metrics


def missing_eos(inputs: RewardInputs) -> Tensor:
    """1.0 for each response that never ended (``inputs.is_end`` false), else 0.0: the missing-eos penalty's term.

    Raises:
        ValueError: inputs without ``is_end``.
    """
    if inputs.is_end is None:
        raise ValueError("the missing-eos penalty needs the rollouts' is_end (RewardInputs.is_end)")
    return (~inputs.is_end.bool()).float().cpu()


def build_rewards(config: RewardConfig, *, pad_token_id: int = 0) -> CombinedReward:
    """The rewards ``config`` describes: functions imported, reward models loaded frozen at the current layout.

    Call it on every rank after :func:`aligner.parallel.initialize` (loading a reward model is a collective).

    Args:
        config: the run's ``reward`` section.
        pad_token_id: the id reward-model batches are right-padded with.

    Raises:
        ConfigError: no term, a function that cannot be resolved, a reward model checkpoint that is not
            an rm recipe's or whose ``attribute_weights`` do not fit its outputs.
        FileNotFoundError: a reward model path without a checkpoint.
    """
    from aligner.rewards.functions import FunctionReward

    config.check()
    # the ranks that hold the same rollouts (tensor and pipeline parallel): a function runs on one of them
    initialized = parallel_state.model_parallel_is_initialized()
    same_rollouts = parallel_state.get_model_parallel_group() if initialized else None
    terms = []
    for term in config.terms:
        if term.function is not None:
            reward: Reward = FunctionReward.from_spec(term.function, term.metric_name, group=same_rollouts)
        else:
            from aligner.rewards.model import RewardModelScorer

            reward = RewardModelScorer.from_checkpoint(
                term.model,
                attribute_weights=term.attribute_weights,
                micro_batch_size=config.model_micro_batch_size,
                pad_token_id=pad_token_id,
                name=term.metric_name,
            )
        terms.append(WeightedReward(term.metric_name, term.weight, reward))
    if config.missing_eos_penalty:
        terms.append(WeightedReward(MISSING_EOS, -config.missing_eos_penalty, missing_eos))
    return CombinedReward(terms)
