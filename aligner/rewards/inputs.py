"""What every reward sees of a batch of rollouts: prompts, response texts, extra fields and tokens."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from aligner.data.formats import Message

Prompt = str | list[Message]


@dataclass(frozen=True)
class RewardInputs:
    """``N`` rollouts to score, row ``i`` of every field belonging to rollout ``i``.

    Attributes:
        prompts: the prompts as the records hold them (a string, or ``{"role", "content"}`` messages).
        responses: the decoded response texts.
        extras: each record's extra fields (e.g. a reference ``answer``), passed to reward functions.
        tokens: ``[N, S]`` int64 right-padded prompt + response token ids, as the reward models read
            them (a response's end-of-turn token included when it was drawn); None when no reward model scores.
        lengths: ``[N]`` int64 real tokens per row of ``tokens``.
        is_end: ``[N]`` bool, whether each response ended (drew eos or a stop) rather than running into
            the token limit; None when not known (the missing-eos penalty needs it).

    Raises (at construction):
        ValueError: fields of different lengths, or only one of ``tokens`` and ``lengths``.
    """

    prompts: Sequence[Prompt]
    responses: Sequence[str]
    extras: Sequence[Mapping[str, Any]]
    tokens: Tensor | None = None
    lengths: Tensor | None = None
    is_end: Tensor | None = None

    def __post_init__(self) -> None:
        sizes = {"prompts": len(self.prompts), "responses": len(self.responses), "extras": len(self.extras)}
        if (self.tokens is None) != (self.lengths is None):
            raise ValueError("give tokens and lengths together (the reward models read both), or neither")
        if self.tokens is not None:
            sizes["tokens"] = self.tokens.shape[0] if self.tokens.dim() else -1
            sizes["lengths"] = self.lengths.shape[0] if self.lengths.dim() else -1
        if self.is_end is not None:
            sizes["is_end"] = self.is_end.shape[0] if self.is_end.dim() else -1
        if len(set(sizes.values())) > 1:
            raise ValueError(f"reward inputs must have one row per rollout in every field, got sizes {sizes}")

    def __len__(self) -> int:
        return len(self.responses)
