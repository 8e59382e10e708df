"""The model configuration: a Llama-family decoder described by one dataclass.

It is the single source the builder (:mod:`aligner.models.gpt`) and the Hugging
Face converter (:mod:`aligner.models.hf`) read. Load it from a dict or a YAML
file; an unknown key is an error that names it::

    num_layers: 32
    hidden_size: 4096
    num_attention_heads: 32
    num_query_groups: 8
    ffn_hidden_size: 14336
    vocab_size: 128256
    rope_theta: 500000.0
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelConfig:
    """A decoder-only transformer with RMSNorm, SwiGLU and RoPE (Llama, Mistral, Qwen2, Qwen3 layouts).

    Attributes:
        num_layers: transformer layers.
        hidden_size: model width.
        num_attention_heads: query heads.
        ffn_hidden_size: width of the SwiGLU MLP (each of gate and up).
        vocab_size: the tokenizer's vocabulary; the embedding and output layer are
            padded beyond it (see :func:`padded_vocab_size`).
        num_query_groups: key/value heads (grouped-query attention); None means
            one per query head.
        head_dim: per-head width; None means ``hidden_size // num_attention_heads``.
        max_position_embeddings: longest sequence the model is meant for.
        rope_theta: RoPE base.
        rope_scaling_factor: Llama-3.1 RoPE frequency scaling with this factor
            (megatron-core's fixed low/high frequency factors 1 and 4 and original
            context 8192); None for plain RoPE.
        norm_eps: RMSNorm epsilon.
        tie_word_embeddings: the output layer reuses the input embedding.
        qkv_bias: bias on the query/key/value projection (Qwen2).
        qk_layernorm: RMSNorm over each head's query and key (over ``head_dim``, one
            weight shared by all heads, before RoPE), as Qwen3 has.
        vocab_pad_multiple: the padded vocabulary is a multiple of
            ``vocab_pad_multiple * tp`` (Megatron-LM uses 128 for GPU efficiency).
        params_dtype: "float32", "bfloat16" or "float16".
        hidden_dropout: dropout after attention and MLP.
        attention_dropout: dropout on attention probabilities.
        init_std: standard deviation of the normal initialization.
    """

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    vocab_size: int
    num_query_groups: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling_factor: float | None = None
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_layernorm: bool = False
    vocab_pad_multiple: int = 1
    params_dtype: str = "float32"
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"model config: {name} must be >= 1, got {getattr(self, name)}")
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"model config: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_query_groups ({self.num_query_groups})"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"model config: hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                    f"({self.num_attention_heads}); set head_dim"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.params_dtype not in DTYPES:
            raise ValueError(f"model config: params_dtype must be one of {sorted(DTYPES)}, got {self.params_dtype!r}")
        if self.vocab_pad_multiple < 1:
            raise ValueError(f"model config: vocab_pad_multiple must be >= 1, got {self.vocab_pad_multiple}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.params_dtype]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Build from a mapping; raises ValueError naming any unknown or missing key."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"model config: unknown key(s) {unknown}; known keys are {sorted(known)}")
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        missing = sorted(required - set(values))
        if missing:
            raise ValueError(f"model config: missing required key(s) {missing}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path) -> ModelConfig:
        """Build from a YAML file holding one mapping (see :meth:`from_dict`)."""
        values = yaml.safe_load(Path(path).read_text())
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of model config keys, got {type(values).__name__}")
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def padded_vocab_size(vocab_size: int, tp: int, multiple: int = 1) -> int:
    """Smallest multiple of ``multiple * tp`` that is >= ``vocab_size``.

    Megatron splits the embedding and the output layer by vocabulary rows over
    the tensor-parallel ranks, so the row count must divide evenly. The extra
    rows are padding: their logits must be masked (see
    :func:`aligner.models.gpt.mask_padded_vocab`) or sliced off before any
    softmax, since a zero (or trained) padding logit can otherwise win it.
    """
    step = multiple * tp
    return -(-vocab_size // step) * step
