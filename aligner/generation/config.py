"""The ``generation`` section of an online recipe's config: which engine draws the rollouts, and how.

YAML::

    generation:
      backend: torch           # torch: the built-in engine (CPU and GPU); megatron: megatron-core's inference
                               # forward and KV cache (CUDA only)
      max_new_tokens: 64
      temperature: 1.0
      top_k: 0
      top_p: 1.0
      stop_strings: []
      megatron_max_batch_size: 64        # megatron backend only: rows per forward (its KV cache's rows)
      megatron_max_sequence_length: null # megatron backend only: KV-cache tokens per row (null: the model's)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aligner.config import ConfigError
from aligner.generation.base import SamplingParams

BACKENDS = ("torch", "megatron")


@dataclass
class GenerationConfig:
    """How rollouts are drawn.

    Attributes:
        backend: the engine: torch (the built-in engine, any machine; it generates with the trainer's own
            weights, or with a full-depth copy refit after every update under pipeline parallelism) or megatron
            (megatron-core's inference forward and KV cache over the trainer's own weights; CUDA only, tensor
            parallelism only; see aligner.generation.megatron_engine).
        max_new_tokens: most response tokens per rollout; a response that reaches it is unfinished (is_end false).
        temperature: sampling temperature; the trainer's log-probs (ratio, KL, entropy) use the same one.
        top_k: keep the k most likely tokens (0: all). The trainer cannot reproduce the filter: engine and
            trainer log-probs then differ (see token_mult_prob_error).
        top_p: nucleus mass (1: all); same caveat as top_k.
        stop_token_ids: ids that end a response besides the tokenizer's eos and end-of-turn ids.
        stop_strings: texts that end a response (at the token that completes one).
        val_greedy: validation rollouts are greedy (else drawn as in training, seeded).
        megatron_max_batch_size: megatron backend: rows per forward; its KV cache is allocated for this many rows
            (larger batches run in chunks). Ignored by the torch backend.
        megatron_max_sequence_length: megatron backend: prompt + response tokens per row of its KV cache (null: the
            model's max_position_embeddings); KV-cache bytes = 2 x layers x rows x this x kv_channels x query_groups
            x dtype bytes / tensor-parallel size. Ignored by the torch backend.
    """

    backend: str = "torch"
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_token_ids: list[int] = field(default_factory=list)
    stop_strings: list[str] = field(default_factory=list)
    val_greedy: bool = True
    megatron_max_batch_size: int = 64
    megatron_max_sequence_length: int | None = None

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(
                f"generation.backend must be one of {BACKENDS}, got {self.backend!r} (other engines, e.g. "
                "TensorRT-LLM, plug in behind aligner.generation.base.Engine)"
            )
        if self.megatron_max_batch_size < 1:
            raise ConfigError(f"generation.megatron_max_batch_size must be >= 1, got {self.megatron_max_batch_size}")
        if self.megatron_max_sequence_length is not None and self.megatron_max_sequence_length <= self.max_new_tokens:
            raise ConfigError(
                f"generation.megatron_max_sequence_length ({self.megatron_max_sequence_length}, prompt + response "
                f"tokens) must exceed generation.max_new_tokens ({self.max_new_tokens}), or be null (the model's "
                "max_position_embeddings)"
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
