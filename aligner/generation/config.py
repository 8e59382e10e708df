"""The ``generation`` section of an online recipe's config: which engine draws the rollouts, and how.

YAML::

    generation:
      backend: torch           # the built-in engine (CPU and GPU)
      max_new_tokens: 64
      temperature: 1.0
      top_k: 0
      top_p: 1.0
      stop_strings: []
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aligner.config import ConfigError
from aligner.generation.base import SamplingParams

BACKENDS = ("torch",)


@dataclass
class GenerationConfig:
    """How rollouts are drawn.

    Attributes:
        backend: the engine: torch (the built-in engine, any machine; it generates with the trainer's own
            weights, or with a full-depth copy refit after every update under pipeline parallelism).
        max_new_tokens: most response tokens per rollout; a response that reaches it is unfinished (is_end false).
        temperature: sampling temperature; the trainer's log-probs (ratio, KL, entropy) use the same one.
        top_k: keep the k most likely tokens (0: all). The trainer cannot reproduce the filter: engine and
            trainer log-probs then differ (see token_mult_prob_error).
        top_p: nucleus mass (1: all); same caveat as top_k.
        stop_token_ids: ids that end a response besides the tokenizer's eos and end-of-turn ids.
        stop_strings: texts that end a response (at the token that completes one).
        val_greedy: validation rollouts are greedy (else drawn as in training, seeded).
    """

    backend: str = "torch"
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_token_ids: list[int] = field(default_factory=list)
    stop_strings: list[str] = field(default_factory=list)
    val_greedy: bool = True

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(
                f"generation.backend must be one of {BACKENDS}, got {self.backend!r} (megatron-core's inference "
                "engine and TensorRT-LLM plug in behind aligner.generation.base.Engine)"
            )
        try:
            self.sampling()
        except ValueError as error:
            raise ConfigError(f"generation: {error}") from None

    def sampling(self, *, greedy: bool = False, seed: int | None = None) -> SamplingParams:
        """The engine's :class:`~aligner.generation.base.SamplingParams` for these settings."""
        return SamplingParams(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            greedy=greedy,
            stop_token_ids=tuple(self.stop_token_ids),
            stop_strings=tuple(self.stop_strings),
            seed=seed,
        )
