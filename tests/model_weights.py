"""Random weights for a ModelConfig in the full (tensor-parallel size 1) megatron layout.

Drawn here, independently of the model code, so that any tensor/pipeline layout
can load the same weights (``aligner.models.sharding.load_full_state_dict``).
"""

import torch

from aligner.models.config import ModelConfig


def random_full_state_dict(config: ModelConfig, seed: int, value_outputs: int | None = None) -> dict[str, torch.Tensor]:
    """Normal weights (norm weights around 1); with ``value_outputs``, also a scalar head's weight and bias."""
    gen = torch.Generator().manual_seed(seed)
    h, d = config.hidden_size, config.head_dim
    qkv_rows = (config.num_attention_heads + 2 * config.num_query_groups) * d

    def normal(*shape, mean=0.0, std=0.1):
        return torch.randn(*shape, generator=gen) * std + mean

    sd = {
        "embedding.word_embeddings.weight": normal(config.vocab_size, h, std=0.5),
        "decoder.final_layernorm.weight": normal(h, mean=1.0),
        "output_layer.weight": normal(config.vocab_size, h, std=0.2),
    }
    for i in range(config.num_layers):
        p = f"decoder.layers.{i}."
        sd[p + "input_layernorm.weight"] = normal(h, mean=1.0)
        sd[p + "self_attention.linear_qkv.weight"] = normal(qkv_rows, h, std=0.15)
        sd[p + "self_attention.linear_proj.weight"] = normal(h, config.num_attention_heads * d, std=0.15)
        sd[p + "pre_mlp_layernorm.weight"] = normal(h, mean=1.0)
        sd[p + "mlp.linear_fc1.weight"] = normal(2 * config.ffn_hidden_size, h, std=0.15)
        sd[p + "mlp.linear_fc2.weight"] = normal(h, config.ffn_hidden_size, std=0.15)
    if value_outputs is not None:
        sd["output_layer.weight"] = normal(value_outputs, h, std=0.2)
        sd["output_layer.bias"] = normal(value_outputs, std=0.05)
    return sd
