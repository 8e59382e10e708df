"""Hugging Face Llama-family checkpoints <-> megatron-core GPTModel shards.

``import_hf`` builds this rank's shard of a GPTModel from a ``LlamaForCausalLM``
(also ``MistralForCausalLM`` without sliding window, ``Qwen2ForCausalLM``, whose
query/key/value projections carry a bias, and ``Qwen3ForCausalLM``, which
RMS-normalizes each head's query and key): a checkpoint directory
(safetensors), a loaded model, or a state dict with its config. Each rank
reads only the tensors of its pipeline stage. ``export_hf`` gathers the shards
and writes ``config.json``, ``generation_config.json`` and safetensors (one
file per pipeline stage) that ``transformers.AutoModelForCausalLM.from_pretrained``
loads; given the source folder and the tokenizer, the export keeps the source's
architecture class, token ids and dtype, holds the tokenizer's files, and lists
the chat template's end-of-turn token among the eos ids, so ``generate`` stops
where aligner's engine does.

Gemma (1, 2 and 3) is refused: megatron-core's GPTModel cannot express it
exactly (see :data:`GEMMA_GAPS`).

Weight mapping (Hugging Face -> megatron, full tensors; see
:mod:`aligner.models.sharding` for how they are split over ranks):

================================  ===============================================
``model.embed_tokens``            ``embedding.word_embeddings``
``layers.i.input_layernorm``      ``decoder.layers.i.input_layernorm``
``layers.i.self_attn.{q,k,v}``    ``decoder.layers.i.self_attention.linear_qkv``,
                                  per key/value group ``[q_heads_of_group; k; v]``
``layers.i.self_attn.{q,k}_norm``  ``decoder.layers.i.self_attention.{q,k}_layernorm``
                                  (Qwen3; ``[head_dim]``, replicated over ranks)
``layers.i.self_attn.o_proj``     ``decoder.layers.i.self_attention.linear_proj``
``post_attention_layernorm``      ``decoder.layers.i.pre_mlp_layernorm``
``mlp.{gate,up}_proj``            ``decoder.layers.i.mlp.linear_fc1`` = ``[gate; up]``
``mlp.down_proj``                 ``decoder.layers.i.mlp.linear_fc2``
``model.norm``                    ``decoder.final_layernorm``
``lm_head``                       ``output_layer`` (absent when tied)
================================  ===============================================
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaConfig, PretrainedConfig, PreTrainedModel, Qwen2Config, Qwen3Config

from aligner.data.tokenizer import stop_token_ids
from aligner.models.config import ModelConfig
from aligner.models.gpt import build_model
from aligner.models.sharding import gather_full_state_dict, load_full_state_dict

# Megatron-core's Llama-3.1 RoPE scaling has these fixed; other values cannot be represented.
_LLAMA3_ROPE_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

HFSource = str | Path | PreTrainedModel | dict[str, torch.Tensor]

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

# What each Gemma generation computes that megatron-core's GPTModel (0.16, local
# layer spec) cannot, so that an import would change the model's outputs. The rest of
# Gemma it has: a gelu-tanh gated MLP (activation_func), head_dim (kv_channels),
# query_pre_attn_scalar (softmax_scale), sliding windows (window_size, window_attn_skip_freq).
_GEMMA_EMBEDDING = (
    "the input embedding multiplied by sqrt(hidden_size) while the output layer reuses the unscaled tied "
    "embedding (GPTModel's embedding has no multiplier, and folding it into the tied weight would scale the "
    "logits too)"
)
_GEMMA_NORM = (
    "RMSNorm applied as x_normed * (1 + weight) (megatron's zero-centred gamma exists only in Transformer "
    "Engine's norm, which the local spec does not use; adding 1 to the weights at import is not exact "
    "for bf16 checkpoints)"
)
_GEMMA_SANDWICH = (
    "the extra RMSNorms on the attention and MLP outputs before the residual add "
    "(post_attention_layernorm / post_feedforward_layernorm; TransformerLayer has no place for them)"
)
GEMMA_GAPS = {
    "gemma": (_GEMMA_EMBEDDING, _GEMMA_NORM),
    "gemma2": (
        _GEMMA_EMBEDDING,
        _GEMMA_NORM,
        _GEMMA_SANDWICH,
        "tanh soft-capping of the attention scores (attn_logit_softcapping) and of the final logits "
        "(final_logit_softcapping)",
    ),
    "gemma3_text": (
        _GEMMA_EMBEDDING,
        _GEMMA_NORM,
        _GEMMA_SANDWICH,
        "a different RoPE base for sliding-window and global layers (GPTModel has one rotary embedding)",
    ),
}
GEMMA_GAPS["gemma3"] = GEMMA_GAPS["gemma3_text"]


def _refuse_unsupported(model_type: str) -> None:
    if model_type in GEMMA_GAPS:
        gaps = "; ".join(f"({n}) {gap}" for n, gap in enumerate(GEMMA_GAPS[model_type], 1))
        raise ValueError(
            f"Hugging Face model_type {model_type!r} (Gemma) is not supported: megatron-core's GPTModel cannot "
            f"express {gaps}. An approximate import would not reproduce the checkpoint's logits."
        )
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"unsupported Hugging Face model_type {model_type!r}; expected one of {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def config_from_hf(hf_config: PretrainedConfig) -> ModelConfig:
    """The :class:`ModelConfig` of a Llama / Mistral / Qwen2 / Qwen3 Hugging Face config.

    Raises:
        ValueError: for another architecture (for Gemma, naming what megatron-core's
            GPTModel lacks, see :data:`GEMMA_GAPS`) or a feature megatron's local spec
            does not have (MLP or output-projection bias, sliding-window
            attention, a RoPE scaling other than Llama-3.1's).
    """
    model_type = hf_config.model_type
    _refuse_unsupported(model_type)
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act must be 'silu' (SwiGLU), got {hf_config.hidden_act!r}")
    if getattr(hf_config, "mlp_bias", False) or getattr(hf_config, "attention_bias", False):
        raise ValueError("mlp_bias / attention_bias (on every projection) are not supported")
    if getattr(hf_config, "use_sliding_window", False) or (
        model_type == "mistral" and getattr(hf_config, "sliding_window", None) is not None
    ):
        raise ValueError("sliding-window attention is not supported")
    rope = dict(getattr(hf_config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    rope_scaling_factor = None
    if rope_type == "llama3":
        fixed = {key: rope.get(key) for key in _LLAMA3_ROPE_FIXED}
        if fixed != _LLAMA3_ROPE_FIXED:
            raise ValueError(f"llama3 RoPE scaling needs {_LLAMA3_ROPE_FIXED}, got {fixed}")
        rope_scaling_factor = float(rope["factor"])
    elif rope_type != "default":
        raise ValueError(f"RoPE type {rope_type!r} is not supported (default and llama3 are)")
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    return ModelConfig(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        num_attention_heads=hf_config.num_attention_heads,
        num_query_groups=hf_config.num_key_value_heads or hf_config.num_attention_heads,
        head_dim=head_dim,
        ffn_hidden_size=hf_config.intermediate_size,
        vocab_size=hf_config.vocab_size,
        max_position_embeddings=hf_config.max_position_embeddings,
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        rope_scaling_factor=rope_scaling_factor,
        norm_eps=hf_config.rms_norm_eps,
        tie_word_embeddings=bool(hf_config.tie_word_embeddings),
        qkv_bias=model_type == "qwen2",
        qk_layernorm=model_type == "qwen3",
    )


def config_to_hf(config: ModelConfig, **extra: Any) -> PretrainedConfig:
    """``LlamaConfig`` for ``config`` (``Qwen2Config`` when ``config.qkv_bias``, ``Qwen3Config`` when
    ``config.qk_layernorm``); ``extra`` is passed on (e.g. ``bos_token_id``, ``eos_token_id``).

    Raises:
        ValueError: the model has both a query/key/value bias and query/key norms (no
            Hugging Face family has both), or a query/key/value bias with a head_dim other
            than ``hidden_size // num_attention_heads`` (Qwen2 derives it).
    """
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling_factor is not None:
        rope = {**rope, "rope_type": "llama3", "factor": config.rope_scaling_factor, **_LLAMA3_ROPE_FIXED}
    common = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.ffn_hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_query_groups,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.norm_eps,
        tie_word_embeddings=config.tie_word_embeddings,
        rope_parameters=rope,
        dtype=config.params_dtype,
    )
    if config.qkv_bias and config.qk_layernorm:
        raise ValueError(
            "no Hugging Face architecture has both a query/key/value bias (Qwen2) and query/key norms (Qwen3)"
        )
    if config.qk_layernorm:
        return Qwen3Config(architectures=["Qwen3ForCausalLM"], head_dim=config.head_dim, **common, **extra)
    if config.qkv_bias:
        if config.head_dim != config.hidden_size // config.num_attention_heads:
            raise ValueError("Qwen2 checkpoints need head_dim == hidden_size // num_attention_heads")
        return Qwen2Config(architectures=["Qwen2ForCausalLM"], **common, **extra)
    return LlamaConfig(architectures=["LlamaForCausalLM"], head_dim=config.head_dim, **common, **extra)


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """``[q; k; v]`` projections (weights ``[rows, hidden]`` or biases ``[rows]``) -> megatron's per-group layout."""
    trailing = q.shape[1:]  # (hidden,) for weights, () for biases
    per_group = [t.reshape(config.num_query_groups, -1, *trailing) for t in (q, k, v)]
    return torch.cat(per_group, dim=1).reshape(-1, *trailing)


def _split_qkv(qkv: torch.Tensor, config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`_fuse_qkv`."""
    groups, head_dim = config.num_query_groups, config.head_dim
    q_rows = config.num_attention_heads // groups * head_dim
    per_group = qkv.reshape(groups, q_rows + 2 * head_dim, *qkv.shape[1:])
    q, k, v = per_group.split([q_rows, head_dim, head_dim], dim=1)
    return tuple(t.reshape(-1, *qkv.shape[1:]) for t in (q, k, v))


def hf_to_megatron(
    get: Callable[[str], torch.Tensor],
    config: ModelConfig,
    layers: Iterable[int],
    first_stage: bool = True,
    last_stage: bool = True,
) -> dict[str, torch.Tensor]:
    """Full megatron state dict of the given layers (and the embedding / head on the
    first / last stage), reading Hugging Face tensors by name with ``get``."""
    full = {}
    if first_stage or (last_stage and config.tie_word_embeddings):
        full["embedding.word_embeddings.weight"] = get("model.embed_tokens.weight")
    for i in layers:
        hf, mg = f"model.layers.{i}.", f"decoder.layers.{i}."
        attn = hf + "self_attn."
        full[mg + "input_layernorm.weight"] = get(hf + "input_layernorm.weight")
        full[mg + "self_attention.linear_qkv.weight"] = _fuse_qkv(
            get(attn + "q_proj.weight"), get(attn + "k_proj.weight"), get(attn + "v_proj.weight"), config
        )
        if config.qkv_bias:
            full[mg + "self_attention.linear_qkv.bias"] = _fuse_qkv(
                get(attn + "q_proj.bias"), get(attn + "k_proj.bias"), get(attn + "v_proj.bias"), config
            )
        if config.qk_layernorm:
            full[mg + "self_attention.q_layernorm.weight"] = get(attn + "q_norm.weight")
            full[mg + "self_attention.k_layernorm.weight"] = get(attn + "k_norm.weight")
        full[mg + "self_attention.linear_proj.weight"] = get(attn + "o_proj.weight")
        full[mg + "pre_mlp_layernorm.weight"] = get(hf + "post_attention_layernorm.weight")
        full[mg + "mlp.linear_fc1.weight"] = torch.cat(
            [get(hf + "mlp.gate_proj.weight"), get(hf + "mlp.up_proj.weight")], dim=0
        )
        full[mg + "mlp.linear_fc2.weight"] = get(hf + "mlp.down_proj.weight")
    if last_stage:
        full["decoder.final_layernorm.weight"] = get("model.norm.weight")
        if not config.tie_word_embeddings:
            full["output_layer.weight"] = get("lm_head.weight")
    return full


def megatron_to_hf(full: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face state dict of a full megatron state dict (any subset of stages)."""
    hf = {}
    for name, tensor in full.items():
        if name == "embedding.word_embeddings.weight":
            hf["model.embed_tokens.weight"] = tensor
        elif name == "decoder.final_layernorm.weight":
            hf["model.norm.weight"] = tensor
        elif name == "output_layer.weight":
            hf["lm_head.weight"] = tensor
        elif name.startswith("decoder.layers."):
            index, rest = name[len("decoder.layers.") :].split(".", 1)
            prefix = f"model.layers.{index}."
            if rest == "input_layernorm.weight":
                hf[prefix + rest] = tensor
            elif rest == "pre_mlp_layernorm.weight":
                hf[prefix + "post_attention_layernorm.weight"] = tensor
            elif rest.startswith("self_attention.linear_qkv."):
                kind = rest.rsplit(".", 1)[1]
                for proj, part in zip("qkv", _split_qkv(tensor, config), strict=True):
                    hf[f"{prefix}self_attn.{proj}_proj.{kind}"] = part
            elif rest == "self_attention.q_layernorm.weight":
                hf[prefix + "self_attn.q_norm.weight"] = tensor
            elif rest == "self_attention.k_layernorm.weight":
                hf[prefix + "self_attn.k_norm.weight"] = tensor
            elif rest == "self_attention.linear_proj.weight":
                hf[prefix + "self_attn.o_proj.weight"] = tensor
            elif rest == "mlp.linear_fc1.weight":
                gate, up = tensor.chunk(2, dim=0)
                hf[prefix + "mlp.gate_proj.weight"], hf[prefix + "mlp.up_proj.weight"] = gate, up
            elif rest == "mlp.linear_fc2.weight":
                hf[prefix + "mlp.down_proj.weight"] = tensor
            else:
                raise ValueError(f"no Hugging Face name for {name}")
        else:
            raise ValueError(f"no Hugging Face name for {name}")
    return {name: tensor.contiguous() for name, tensor in hf.items()}


def _open_source(
    source: HFSource, config: PretrainedConfig | ModelConfig | None
) -> tuple[ModelConfig, Callable[[str], torch.Tensor]]:
    """(config, tensor getter) for a checkpoint directory, a loaded model or a state dict."""
    if isinstance(source, PreTrainedModel):
        state = source.state_dict()
        return config_from_hf(source.config), lambda name: state[name].detach()
    if isinstance(source, dict):
        if config is None:
            raise ValueError("import_hf: a state dict needs config= (a ModelConfig or Hugging Face config)")
        model_config = config if isinstance(config, ModelConfig) else config_from_hf(config)
        return model_config, lambda name: source[name]
    directory = Path(source)
    if not (directory / "config.json").is_file():
        raise ValueError(f"import_hf: {directory} is not a checkpoint directory with config.json (no downloads here)")
    from transformers import AutoConfig

    model_config = config_from_hf(AutoConfig.from_pretrained(directory, local_files_only=True))
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
    elif (directory / "model.safetensors").is_file():
        with safe_open(directory / "model.safetensors", "pt") as f:
            weight_map = dict.fromkeys(f.keys(), "model.safetensors")
    else:
        raise ValueError(f"import_hf: no model.safetensors(.index.json) in {directory}")

    def get(name: str) -> torch.Tensor:
        with safe_open(directory / weight_map[name], "pt") as f:
            return f.get_tensor(name)

    return model_config, get


def _check_parallel(tp: int | None, pp: int | None) -> None:
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("call aligner.parallel.initialize(tp=..., pp=...) before import_hf")
    actual = (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
    )
    for name, wanted, have in (("tp", tp, actual[0]), ("pp", pp, actual[1])):
        if wanted is not None and wanted != have:
            raise ValueError(f"import_hf: {name}={wanted} but the process groups were initialized with {name}={have}")


def import_hf(
    source: HFSource,
    tp: int | None = None,
    pp: int | None = None,
    config: PretrainedConfig | ModelConfig | None = None,
    num_value_outputs: int | None = None,
    parallel_output: bool = True,
) -> GPTModel:
    """This rank's GPTModel shard holding a Hugging Face checkpoint's weights.

    Args:
        source: a local checkpoint directory (``config.json`` + safetensors), a
            ``LlamaForCausalLM``-like model, or its state dict (then ``config``).
        tp, pp: expected tensor / pipeline sizes; checked against the process
            groups set up by :func:`aligner.parallel.initialize`.
        config: the architecture when ``source`` is a state dict.
        num_value_outputs: build a value/reward model instead: the backbone gets
            the checkpoint's weights, the :class:`~aligner.models.gpt.ScalarHead` a
            fresh init, and ``lm_head`` is not read.
        parallel_output: see :func:`aligner.models.gpt.build_model`.

    Raises:
        RuntimeError: if the process groups are not initialized.
        ValueError: on a size mismatch or an unsupported architecture.
        KeyError: if the checkpoint lacks a tensor this shard needs.
    """
    _check_parallel(tp, pp)
    model_config, get = _open_source(source, config)
    model = build_model(model_config, num_value_outputs, init_weights=False, parallel_output=parallel_output)
    first_layer = model.decoder.layers[0].layer_number - 1  # megatron numbers layers from 1
    layers = range(first_layer, first_layer + len(model.decoder.layers))
    full = hf_to_megatron(
        get, model_config, layers, model.pre_process, model.post_process and num_value_outputs is None
    )
    if model.post_process and num_value_outputs is not None:
        full["decoder.final_layernorm.weight"] = get("model.norm.weight")
        # The head is new: it keeps the weights ScalarHead drew.
        full.update({f"output_layer.{n}": p.detach() for n, p in model.output_layer.named_parameters()})
    load_full_state_dict(model, full)
    return model


TokenizerSource = str | Path | Any

# Fields of a Hugging Face config that describe the architecture; an export with a
# ``source`` takes these from the model and every other field from the source.
_ARCHITECTURE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "rms_norm_eps",
    "tie_word_embeddings",
    "rope_parameters",
    "head_dim",
)


def _load_source_config(source: str | Path | PretrainedConfig) -> PretrainedConfig:
    if isinstance(source, PretrainedConfig):
        return source
    from transformers import AutoConfig

    directory = Path(source).expanduser()
    if not (directory / "config.json").is_file():
        raise ValueError(f"export_hf: source {directory} is not a checkpoint directory with config.json")
    return AutoConfig.from_pretrained(directory, local_files_only=True)


def _dtype_name(dtype: str | torch.dtype) -> str:
    from aligner.models.config import DTYPES

    if isinstance(dtype, torch.dtype):
        names = [name for name, value in DTYPES.items() if value == dtype]
        if not names:
            raise ValueError(f"export_hf: dtype {dtype} is not one of {sorted(DTYPES)}")
        return names[0]
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"export_hf: dtype {dtype!r} is not one of {sorted(DTYPES)}")
    return name


def export_config(
    config: ModelConfig,
    *,
    source: str | Path | PretrainedConfig | None = None,
    tokenizer: Any = None,
    dtype: str | torch.dtype | None = None,
    **hf_config_extra: Any,
) -> PretrainedConfig:
    """The Hugging Face config an export of a model of ``config`` writes (see :func:`export_hf`)."""
    base = config_to_hf(config)
    source_config = None if source is None else _load_source_config(source)
    if source_config is None:
        hf_config = base
    else:
        source_type = source_config.model_type
        if source_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"export_hf: source model_type {source_type!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        for family, has_feature, feature in (
            ("qwen2", config.qkv_bias, "query/key/value bias"),
            ("qwen3", config.qk_layernorm, "query/key norms"),
        ):
            if (source_type == family) != has_feature:
                raise ValueError(
                    f"export_hf: the source is a {source_type} checkpoint but the model "
                    f"{'has' if has_feature else 'has no'} {feature}"
                )
        hf_config = copy.deepcopy(source_config)
        for name in _ARCHITECTURE_FIELDS:
            if hasattr(base, name):
                setattr(hf_config, name, getattr(base, name))
        if not getattr(hf_config, "architectures", None):
            hf_config.architectures = base.architectures
    if dtype is not None:
        hf_config.dtype = _dtype_name(dtype)
    elif source_config is not None and getattr(source_config, "dtype", None) is not None:
        hf_config.dtype = _dtype_name(source_config.dtype)
    else:
        hf_config.dtype = config.params_dtype
    if tokenizer is not None:
        stops = stop_token_ids(tokenizer)
        if stops:
            hf_config.eos_token_id = stops[0] if len(stops) == 1 else stops
        if tokenizer.bos_token_id is not None:
            hf_config.bos_token_id = int(tokenizer.bos_token_id)
        if tokenizer.pad_token_id is not None:
            hf_config.pad_token_id = int(tokenizer.pad_token_id)
    for name, value in hf_config_extra.items():
        setattr(hf_config, name, value)
    return hf_config


def _generation_config(hf_config: PretrainedConfig, source: str | Path | PretrainedConfig | None) -> Any:
    """The source's generation_config.json (sampling defaults) with the export's token ids."""
    from transformers import GenerationConfig

    generation = None
    if isinstance(source, str | Path) and (Path(source).expanduser() / "generation_config.json").is_file():
        generation = GenerationConfig.from_pretrained(Path(source).expanduser(), local_files_only=True)
    if generation is None:
        generation = GenerationConfig()
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(hf_config, name, None)
        if value is not None:
            setattr(generation, name, value)
    return generation


def export_hf(
    model: GPTModel,
    out_dir: str | Path,
    *,
    source: str | Path | PretrainedConfig | None = None,
    tokenizer: TokenizerSource | None = None,
    dtype: str | torch.dtype | None = None,
    **hf_config_extra: Any,
) -> None:
    """Write ``model`` (sharded over all ranks) as a Hugging Face checkpoint in ``out_dir``.

    A collective: every rank calls it. The tensor-parallel ranks of each stage
    gather their weights; the first data-parallel replica's tensor-rank-0 of each
    stage writes ``model-0000s-of-0000p.safetensors`` (``model.safetensors`` when
    pp == 1); global rank 0 writes ``config.json``, ``generation_config.json``,
    the tokenizer's files and the index. Returns when every file is written.

    Args:
        model: this rank's shard of a language model.
        out_dir: the folder to write (created if missing).
        source: the Hugging Face folder (or config) the model was imported from:
            its architecture class (Llama / Mistral / Qwen2 / Qwen3), token ids, dtype
            and other fields are kept; the model supplies the sizes. None: a
            ``LlamaForCausalLM`` (``Qwen2ForCausalLM`` when the model has a
            query/key/value bias, ``Qwen3ForCausalLM`` when it has query/key norms)
            with transformers' default token ids. A
            ``generation_config.json`` in the source supplies the sampling defaults.
        tokenizer: a tokenizer or its folder: its files are saved in ``out_dir``
            and its ids go into both configs: ``bos_token_id``, ``pad_token_id``,
            and ``eos_token_id`` = its eos plus the chat template's end-of-turn
            token when that differs (a list then, e.g. ``[<|endoftext|>, <|im_end|>]``),
            so that ``generate`` stops at the end of an assistant turn.
        dtype: the weights' dtype in the files; None: the source's, else the model's.
        hf_config_extra: further config.json fields, applied last (e.g. ``eos_token_id``).

    Raises:
        ValueError: for a value/reward model (no Hugging Face causal-LM layout), a
            source of another architecture, or an unknown dtype.
        FileNotFoundError: a tokenizer folder without tokenizer files.
    """
    if model.aligner_num_value_outputs is not None:
        raise ValueError("export_hf writes causal language models; this model has a value head")
    config = model.aligner_config
    if tokenizer is not None and isinstance(tokenizer, str | Path):
        from aligner.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    hf_config = export_config(config, source=source, tokenizer=tokenizer, dtype=dtype, **hf_config_extra)
    out_dtype = hf_config.dtype if isinstance(hf_config.dtype, torch.dtype) else getattr(torch, str(hf_config.dtype))
    out_dir = Path(out_dir)
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    stage = parallel_state.get_pipeline_model_parallel_rank()
    filename = "model.safetensors" if pp == 1 else f"model-{stage + 1:05d}-of-{pp:05d}.safetensors"
    written: dict[str, int] = {}
    if parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0:
        hf_state = megatron_to_hf(gather_full_state_dict(model), config)
        if parallel_state.get_tensor_model_parallel_rank() == 0:
            hf_state = {name: tensor.to(out_dtype) for name, tensor in hf_state.items()}
            out_dir.mkdir(parents=True, exist_ok=True)
            save_file(hf_state, out_dir / filename, metadata={"format": "pt"})
            written = {name: tensor.numel() * tensor.element_size() for name, tensor in hf_state.items()}
    every_rank: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every_rank, (filename, written))
    if dist.get_rank() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        hf_config.save_pretrained(out_dir)
        _generation_config(hf_config, source).save_pretrained(out_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out_dir))
        if pp > 1:
            weight_map = {name: file for file, sizes in every_rank for name in sizes}
            total = sum(size for _, sizes in every_rank for size in sizes.values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    dist.barrier()
