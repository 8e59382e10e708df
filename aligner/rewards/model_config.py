"""The configuration of a reward model's training run: what the rm recipe trains and saves with its checkpoints.

It lives beside the reward-model scorer (:mod:`aligner.rewards.model`), which reads it back from a
checkpoint's ``config.yaml`` to rebuild the model; the rm recipe (:mod:`aligner.recipes.rm`) trains with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aligner.config import ConfigError, RunConfig
from aligner.data import HELPSTEER2_ATTRIBUTES

KINDS = ("pairwise", "regression")


@dataclass
class RMConfig:
    """The reward model's objective.

    Attributes:
        kind: "pairwise" (Bradley-Terry on preference pairs) or "regression" (attributes).
        margin: pairwise only: a constant margin subtracted from ``r_c - r_r``.
        centering_coef: pairwise only: weight of ``(r_c + r_r)^2`` (keeps rewards centred at 0).
        attribute_names: regression only: the attributes, in the head's output order.
    """

    kind: str = "pairwise"
    margin: float = 0.0
    centering_coef: float = 0.0
    attribute_names: list[str] = field(default_factory=lambda: list(HELPSTEER2_ATTRIBUTES))

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"rm.kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "regression" and not self.attribute_names:
            raise ConfigError("rm.attribute_names must name at least one attribute for a regression reward model")

    @property
    def num_outputs(self) -> int:
        return 1 if self.kind == "pairwise" else len(self.attribute_names)


@dataclass
class RMRunConfig(RunConfig):
    """Reward model training.

    Attributes:
        rm: the reward model's objective.
    """

    rm: RMConfig = field(default_factory=RMConfig)
