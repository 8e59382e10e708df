"""The ``reward`` section of an online recipe's config: the rewards summed into a rollout's reward.

YAML::

    reward:
      terms:
        - function: aligner.rewards.arithmetic:exact_answer    # a Python function, module:function
          weight: 1.0
        - model: runs/rm_regression                            # an rm recipe checkpoint (root or step folder)
          attribute_weights: {helpfulness: 1.0, verbosity: -0.3}
          weight: 0.5
      model_micro_batch_size: 8
      missing_eos_penalty: 1.0      # subtracted from the reward of a response that ran into max_new_tokens
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from aligner.config import ConfigError
from aligner.rewards.functions import split_spec

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MISSING_EOS = "missing_eos"  # the metric name of reward.missing_eos_penalty (reward_missing_eos_mean)


@dataclass
class RewardTerm:
    """One reward: a Python function or a reward model, and its weight in the sum.

    Attributes:
        function: a Python reward function as module:function, called as fn(prompts, responses, extras) and
            returning one float per response (e.g. aligner.rewards.arithmetic:exact_answer).
        model: a checkpoint of the rm recipe (a step folder, or its root whose latest step is read); its
            architecture and outputs come from the checkpoint's config.yaml. It must share the policy's tokenizer.
        attribute_weights: a reward model with several outputs (regression): the weight of each attribute by
            name, attributes left out weighing 0; null for a model with one output (pairwise).
        weight: the term's weight in the summed reward.
        name: the term's name in metrics (reward_<name>_mean); null: the function's name, or reward_model.
    """

    function: str | None = None
    model: str | None = None
    attribute_weights: dict[str, float] | None = None
    weight: float = 1.0
    name: str | None = None

    def __post_init__(self) -> None:
        what = f"reward term {self.function or self.model or '{}'}"
        if (self.function is None) == (self.model is None):
            raise ConfigError(
                f"{what}: set exactly one of function (a Python reward function, module:function) and model "
                "(an rm recipe checkpoint)"
            )
        if self.function is not None:
            split_spec(self.function)
            if self.attribute_weights is not None:
                raise ConfigError(f"{what}: attribute_weights applies to reward models, not functions")
        if not math.isfinite(self.weight):
            raise ConfigError(f"{what}: weight must be a finite number, got {self.weight}")
        if self.attribute_weights is not None:
            bad = {key: value for key, value in self.attribute_weights.items() if not math.isfinite(value)}
            if bad:
                raise ConfigError(f"{what}: attribute_weights must be finite numbers, got {bad}")
        if self.name is not None and not _NAME.fullmatch(self.name):
            raise ConfigError(
                f"{what}: name must be letters, digits and underscores (a metric name), got {self.name!r}"
            )

    @property
    def metric_name(self) -> str:
        """The name metrics use: ``name``, else the function's name, else ``reward_model``."""
        if self.name is not None:
            return self.name
        if self.function is not None:
            return self.function.partition(":")[2].strip().rsplit(".", 1)[-1]
        return "reward_model"


@dataclass
class RewardConfig:
    """The rewards of a rollout: a weighted sum of Python functions and reward models.

    Attributes:
        terms: the rewards, each {function: module:function} or {model: checkpoint, attribute_weights}, with a
            weight (default 1) and an optional metric name; a rollout's reward is sum(weight * term).
        model_micro_batch_size: rows per reward-model forward pass.
        missing_eos_penalty: subtracted from the summed reward of every response that never ended (it ran
            into ``generation.max_new_tokens`` without eos or a stop), as TRL's option of that name; its
            metrics are ``reward_missing_eos_mean`` (the fraction penalized) and ``_std``. A reward model
            scores a cut-off text as readily as a finished one, and pays most for long explanatory text,
            which a policy can reach by never stopping; 0 (default): no penalty.
    """

    terms: list[RewardTerm] = field(default_factory=list)
    model_micro_batch_size: int = 8
    missing_eos_penalty: float = 0.0

    def __post_init__(self) -> None:
        if self.model_micro_batch_size < 1:
            raise ConfigError(f"reward.model_micro_batch_size must be >= 1, got {self.model_micro_batch_size}")
        if not (math.isfinite(self.missing_eos_penalty) and self.missing_eos_penalty >= 0):
            raise ConfigError(
                f"reward.missing_eos_penalty must be a finite number >= 0 (it is subtracted), got "
                f"{self.missing_eos_penalty}"
            )
        names = [term.metric_name for term in self.terms]
        if self.missing_eos_penalty and MISSING_EOS in names:
            raise ConfigError(
                f"reward.terms: the name {MISSING_EOS!r} is the missing-eos penalty's metric; rename the term"
            )
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ConfigError(f"reward.terms: several terms are named {repeated} in metrics; give each a distinct name")

    def check(self) -> None:
        """Raise unless there is a term to score with (the empty default is only a placeholder).

        Raises:
            ConfigError: ``terms`` is empty.
        """
        if not self.terms:
            raise ConfigError(
                "reward.terms is empty: add a reward function ({function: module:function}) or a reward model "
                "({model: <rm checkpoint>})"
            )
