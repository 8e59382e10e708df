"""ModelConfig loading and validation; vocabulary padding and its mask."""

import pytest
import torch

from aligner.models.config import ModelConfig, padded_vocab_size
from aligner.models.gpt import mask_padded_vocab

TINY = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "ffn_hidden_size": 96, "vocab_size": 131}


def test_from_yaml_fills_defaults(tmp_path):
    path = tmp_path / "model.yaml"
    lines = ["num_layers: 2", "hidden_size: 64", "num_attention_heads: 4", "num_query_groups: 2"]
    lines += ["ffn_hidden_size: 96", "vocab_size: 131", "rope_theta: 500000.0"]
    path.write_text("\n".join(lines) + "\n")
    config = ModelConfig.from_yaml(path)
    assert config == ModelConfig(**TINY, num_query_groups=2, rope_theta=500000.0)
    assert config.head_dim == 16 and config.torch_dtype == torch.float32
    assert ModelConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({**TINY, "hidden": 64}, r"unknown key\(s\) \['hidden'\]"),
        ({k: v for k, v in TINY.items() if k != "vocab_size"}, r"missing required key\(s\) \['vocab_size'\]"),
        ({**TINY, "num_query_groups": 3}, "multiple of num_query_groups"),
        ({**TINY, "hidden_size": 66}, "set head_dim"),
        ({**TINY, "params_dtype": "fp8"}, "params_dtype must be one of"),
        ({**TINY, "num_layers": 0}, "num_layers must be >= 1"),
    ],
)
def test_rejects_bad_configs_with_the_key_named(values, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict(values)


@pytest.mark.parametrize(
    ("vocab", "tp", "multiple", "padded"),
    [(131, 1, 1, 131), (131, 2, 1, 132), (128, 4, 1, 128), (131, 2, 128, 256), (32000, 8, 128, 32768)],
)
def test_padded_vocab_size(vocab, tp, multiple, padded):
    assert padded_vocab_size(vocab, tp, multiple) == padded


def test_mask_padded_vocab_never_wins_a_softmax():
    vocab, shard = 131, 66  # TP=2 shards of a 132-row vocabulary
    # All real logits negative: a padding logit left at 0 would win.
    shards = [(torch.randn(2, 3, shard) - 50.0).requires_grad_() for _ in range(2)]
    first = mask_padded_vocab(shards[0], vocab, vocab_start=0)
    assert first is shards[0]  # no padding in the first shard
    second = mask_padded_vocab(shards[1], vocab, vocab_start=shard)
    assert torch.all(second[..., -1] == torch.finfo(torch.float32).min)
    full = torch.cat([first, second], dim=-1)
    probs = full.softmax(-1)
    assert torch.all(probs[..., vocab:] == 0) and probs.argmax(-1).lt(vocab).all()
    entropy = -(probs * full.log_softmax(-1)).sum(-1)  # p * logit stays finite at the padding
    assert torch.isfinite(entropy).all()
    entropy.sum().backward()
    assert torch.all(shards[1].grad[..., -1] == 0) and torch.all(shards[1].grad[..., :-1] != 0)
