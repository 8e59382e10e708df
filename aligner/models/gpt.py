"""Build megatron-core's GPTModel from a :class:`~aligner.models.config.ModelConfig`.

The model is the current rank's shard: its pipeline stage's layers, and its
tensor-parallel slice of every split weight. Call
:func:`aligner.parallel.initialize` first.

Two flavours share the builder:

- a language model (``num_value_outputs=None``): ``model(input_ids, position_ids,
  attention_mask)`` returns logits ``[batch, seq, padded_vocab // tp]`` (the
  vocab-parallel shard; ``runtime_gather_output=True`` gathers the full padded
  vocabulary). Columns at or beyond ``config.vocab_size`` are padding: mask them
  with :func:`mask_padded_vocab` before any softmax or argmax.
- a value / reward model (``num_value_outputs=k``): the output layer is a
  :class:`ScalarHead` and the same call returns ``[batch, seq, k]`` scalars per
  token, read from the final hidden states (after the last RMSNorm). A critic
  uses every position; a reward model reads the last token of each sequence.

Megatron's RoPE uses positions ``0..seq-1`` whatever ``position_ids`` says, so
batches are right-padded (or packed with ``packed_seq_params``).
``attention_mask=None`` means causal attention.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig

from aligner.models.config import ModelConfig, padded_vocab_size


class ScalarHead(torch.nn.Module):
    """``num_outputs`` scalars per token from the final hidden states.

    Stands in for GPTModel's output layer, so its call signature matches
    megatron's ``ColumnParallelLinear``, and so do its parameter names
    (``output_layer.weight`` / ``.bias``, which megatron's sharded state dict
    of the model expects). The weights are replicated on every tensor-parallel
    rank (they see the same hidden states).
    """

    def __init__(self, hidden_size: int, num_outputs: int, init_std: float, dtype: torch.dtype):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(num_outputs, hidden_size, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.zeros(num_outputs, dtype=dtype))
        with torch.no_grad():
            self.weight.normal_(0.0, init_std)

    def forward(
        self,
        hidden_states: torch.Tensor,
        weight: torch.Tensor | None = None,
        runtime_gather_output: bool | None = None,
    ) -> tuple[torch.Tensor, None]:
        """``[seq, batch, hidden]`` -> ``([seq, batch, num_outputs], None)``."""
        return torch.nn.functional.linear(hidden_states, self.weight, self.bias), None


def transformer_config(config: ModelConfig, init_weights: bool = True) -> TransformerConfig:
    """megatron-core's TransformerConfig for ``config`` at the current parallel sizes."""
    dtype = config.torch_dtype
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    _check_divisible(config, tp, pp)
    return TransformerConfig(
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        num_query_groups=config.num_query_groups,
        kv_channels=config.head_dim,
        ffn_hidden_size=config.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=config.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=config.qkv_bias,
        qk_layernorm=config.qk_layernorm,
        hidden_dropout=config.hidden_dropout,
        attention_dropout=config.attention_dropout,
        init_method_std=config.init_std,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=parallel_state.get_context_parallel_world_size(),
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # On CPU every weight is created by megatron's CPU path; on GPU on the device.
        use_cpu_initialization=not torch.cuda.is_available(),
        perform_initialization=init_weights,
    )


def _check_divisible(config: ModelConfig, tp: int, pp: int) -> None:
    for name in ("num_attention_heads", "num_query_groups", "ffn_hidden_size"):
        if getattr(config, name) % tp:
            raise ValueError(f"{name}={getattr(config, name)} is not divisible by tensor-parallel size {tp}")
    if config.num_layers % pp:
        raise ValueError(f"num_layers={config.num_layers} is not divisible by pipeline-parallel size {pp}")


def build_model(
    config: ModelConfig,
    num_value_outputs: int | None = None,
    init_weights: bool = True,
    parallel_output: bool = True,
) -> GPTModel:
    """This rank's shard of the model described by ``config``.

    Args:
        config: the architecture.
        num_value_outputs: None for a language model; k >= 1 for a value/reward
            model with k scalars per token (k > 1: multi-attribute regression).
        init_weights: draw random weights; False skips it when a checkpoint is
            loaded right after.
        parallel_output: keep logits vocab-parallel (``[.., padded_vocab // tp]``);
            False gathers the full padded vocabulary on every call.

    Returns:
        megatron-core GPTModel; ``aligner_config`` and ``aligner_num_value_outputs``
        record the arguments (on every stage) for checkpoint conversion.

    Raises:
        ValueError: if a size does not divide over the parallel ranks or
            ``num_value_outputs < 1``.
    """
    if num_value_outputs is not None and num_value_outputs < 1:
        raise ValueError(f"num_value_outputs must be >= 1 or None, got {num_value_outputs}")
    tp = parallel_state.get_tensor_model_parallel_world_size()
    post_process = parallel_state.is_pipeline_last_stage()
    rope_scaling = {}
    if config.rope_scaling_factor is not None:
        rope_scaling = {"rope_scaling": True, "rope_scaling_factor": config.rope_scaling_factor}
    model = GPTModel(
        config=transformer_config(config, init_weights),
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=config.qk_layernorm),
        vocab_size=padded_vocab_size(config.vocab_size, tp, config.vocab_pad_multiple),
        max_sequence_length=config.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=post_process,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=config.tie_word_embeddings and num_value_outputs is None,
        position_embedding_type="rope",
        rotary_base=config.rope_theta,
        **rope_scaling,
    )
    if not init_weights:
        _mark_tensor_parallel_weights(model)
    if num_value_outputs is not None and post_process:
        head = ScalarHead(config.hidden_size, num_value_outputs, config.init_std, config.torch_dtype)
        model.output_layer = head.to(model.decoder.final_layernorm.weight.device)
        if tp > 1:  # replicated weights: make the tensor-parallel ranks agree whatever their RNG did
            for param in model.output_layer.parameters():
                dist.broadcast(
                    param.data,
                    src=parallel_state.get_tensor_model_parallel_src_rank(),
                    group=parallel_state.get_tensor_model_parallel_group(),
                )
    model.aligner_config = config
    model.aligner_num_value_outputs = num_value_outputs
    return model


def _mark_tensor_parallel_weights(model: GPTModel) -> None:
    """Give split weights megatron's tensor-parallel attributes, as its initializers would.

    megatron-core 0.16 sets ``tensor_model_parallel`` / ``partition_dim`` on a
    split weight only inside its weight initializers, which a model built for a
    checkpoint load skips; unmarked, the gradient norm (clipping) and distributed
    checkpoints would treat shards as replicated copies.
    """
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
        set_tensor_model_parallel_attributes,
    )

    for module in model.modules():
        if isinstance(module, (VocabParallelEmbedding, ColumnParallelLinear)):
            dim = 0
        elif isinstance(module, RowParallelLinear):
            dim = 1
        else:
            continue
        weight = getattr(module, "weight", None)
        if weight is not None and not hasattr(weight, "tensor_model_parallel"):
            set_tensor_model_parallel_attributes(weight, True, dim, 1)


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int, vocab_start: int = 0) -> torch.Tensor:
    """Fill the padding columns of a logits shard with the dtype's lowest value.

    Args:
        logits: ``[..., shard_vocab]``, the columns for vocabulary ids
            ``vocab_start .. vocab_start + shard_vocab - 1`` (a vocab-parallel
            shard has ``vocab_start = tp_rank * shard_vocab``; a gathered tensor 0).
        vocab_size: the real vocabulary size; ids at or beyond it are padding.
        vocab_start: the vocabulary id of column 0.

    Returns:
        A new tensor where padding columns hold ``torch.finfo(dtype).min``:
        ``exp`` of it is 0 after max-subtraction in float32, so it never wins a
        softmax and ``p * logit`` stays 0 (which ``-inf`` would turn into NaN).
        Gradients to those columns are zero.
    """
    shard_vocab = logits.shape[-1]
    if vocab_start + shard_vocab <= vocab_size:
        return logits
    ids = torch.arange(vocab_start, vocab_start + shard_vocab, device=logits.device)
    return logits.masked_fill(ids >= vocab_size, torch.finfo(logits.dtype).min)
