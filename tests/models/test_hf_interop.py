"""Hugging Face checkpoints -> megatron shards -> Hugging Face checkpoints.

Tiny random models built from configs (no downloads) are saved with
``save_pretrained``, imported at TP=1, TP=2 and PP=2 (gloo processes), compared
with transformers' own forward, exported, and loaded back by
``AutoModelForCausalLM.from_pretrained``. Gemma configs are refused with the
features megatron-core's GPTModel lacks.
"""

import re

import pytest
import torch
from distributed import run_distributed
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3Config,
    Gemma3TextConfig,
    GemmaConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from aligner.models.config import ModelConfig
from aligner.models.hf import config_from_hf, config_to_hf, export_config

# fp32; megatron and transformers order a few sums differently (attention,
# RoPE tables), which costs ~1e-7 at this size. The bound:
LOGITS_ATOL = 1e-4
VALUE_OUTPUTS = 2
BATCH, SEQ = 2, 12

_COMMON = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=127,  # odd: padded to 128 at TP=2
    max_position_embeddings=64,
)
VARIANTS = {
    "llama": (LlamaForCausalLM, LlamaConfig(**_COMMON, rope_theta=500000.0)),
    "llama_tied": (LlamaForCausalLM, LlamaConfig(**_COMMON, tie_word_embeddings=True)),
    "qwen2_qkv_bias": (Qwen2ForCausalLM, Qwen2Config(**_COMMON, rope_theta=1000000.0)),
    # Per-head query/key RMSNorm; head_dim 32 != hidden 64 / 4 heads (megatron's kv_channels); tied like Qwen3-0.6B.
    "qwen3_qk_norm_tied": (
        Qwen3ForCausalLM,
        Qwen3Config(**_COMMON, head_dim=32, tie_word_embeddings=True, rope_theta=1000000.0),
    ),
    "llama3_rope_scaling": (
        LlamaForCausalLM,
        LlamaConfig(
            **{**_COMMON, "max_position_embeddings": 16384},
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        ),
    ),
}
LAYOUTS = [
    pytest.param((1, 1), id="tp1"),
    pytest.param((2, 1), id="tp2", marks=pytest.mark.slow),
    pytest.param((1, 2), id="pp2", marks=pytest.mark.slow),
]


def _forward(model, tokens):
    """Gathered last-stage output of one forward pass (None on other stages)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    outputs = []

    def forward_step(data_iterator, model):
        output = model(next(data_iterator), None, None, runtime_gather_output=True)
        return output, lambda out: (outputs.append(out) or out.sum(), {})

    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter([tokens]),
            model=model,
            num_microbatches=1,
            seq_length=tokens.shape[1],
            micro_batch_size=tokens.shape[0],
            forward_only=True,
        )
    return outputs[0] if outputs else None


def worker(tp: int, pp: int, checkpoints: dict, out_root: str, tokens: torch.Tensor):
    from aligner.models.hf import export_hf, import_hf
    from aligner.parallel import destroy, initialize

    initialize(tp=tp, pp=pp)
    results = {}
    for name, path in checkpoints.items():
        model = import_hf(path, tp=tp, pp=pp).eval()
        logits = _forward(model, tokens)
        export_hf(model, f"{out_root}/{name}", eos_token_id=3)
        critic = import_hf(path, num_value_outputs=VALUE_OUTPUTS).eval()
        head = (
            {n: p.detach().clone() for n, p in critic.output_layer.named_parameters()} if critic.post_process else None
        )
        results[name] = {
            "logits": logits,
            "values": _forward(critic, tokens),
            "head": head,
            "rope_inv_freq": model.rotary_pos_emb.inv_freq,
        }
    if tp == pp == 1:
        # The other two sources: a loaded model and a state dict with its config.
        name = "qwen2_qkv_bias"
        hf_model = AutoModelForCausalLM.from_pretrained(checkpoints[name])
        from_model = import_hf(hf_model).eval()
        from_state = import_hf(hf_model.state_dict(), config=hf_model.config).eval()
        results["sources"] = [_forward(from_model, tokens), _forward(from_state, tokens)]
    destroy()
    return results


def _last_stage_output(results: list[dict], name: str, key: str):
    return next(r[name][key] for r in reversed(results) if r[name][key] is not None)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Random models (every weight, biases and norms included, perturbed) saved as checkpoints."""
    root = tmp_path_factory.mktemp("hf")
    models, paths = {}, {}
    for name, (cls, config) in VARIANTS.items():
        model = cls(config).eval()
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param) * 0.05)
        model.save_pretrained(root / name)
        models[name], paths[name] = model, str(root / name)
    return models, paths


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, _COMMON["vocab_size"], (BATCH, SEQ))


@pytest.fixture(scope="module", params=LAYOUTS)
def layout_run(request, checkpoints, tokens, tmp_path_factory):
    tp, pp = request.param
    _, paths = checkpoints
    if (tp, pp) != (1, 1):  # RoPE scaling does not interact with sharding.
        paths = {k: v for k, v in paths.items() if k != "llama3_rope_scaling"}
    out_root = tmp_path_factory.mktemp(f"export_tp{tp}_pp{pp}")
    results = run_distributed(worker, tp * pp, args=(tp, pp, paths, str(out_root), tokens))
    return {"tp": tp, "results": results, "out_root": out_root, "names": list(paths)}


def test_imported_logits_match_transformers(layout_run, checkpoints, tokens):
    models, _ = checkpoints
    for name in layout_run["names"]:
        logits = _last_stage_output(layout_run["results"], name, "logits")
        with torch.no_grad():
            want = models[name](tokens).logits
        vocab = want.shape[-1]
        assert logits.shape[-1] == -(-vocab // layout_run["tp"]) * layout_run["tp"], name
        diff = (logits[..., :vocab] - want).abs().max().item()
        assert diff <= LOGITS_ATOL, f"{name}: max abs diff {diff:.2e}"
        assert torch.all(logits[..., vocab:] == 0), f"{name}: padded vocabulary rows must be zero"
        # RoPE frequencies directly: a short sequence barely shows low-frequency (scaled) terms in the logits.
        for rank_result in layout_run["results"]:
            torch.testing.assert_close(rank_result[name]["rope_inv_freq"], models[name].model.rotary_emb.inv_freq)
    if "sources" in layout_run["results"][0]:  # TP=1: a loaded model and a state dict import the same weights
        for logits in layout_run["results"][0]["sources"]:
            assert torch.equal(logits, layout_run["results"][0]["qwen2_qkv_bias"]["logits"])


def test_export_round_trips_and_loads_in_transformers(layout_run, checkpoints, tokens):
    models, paths = checkpoints
    for name in layout_run["names"]:
        original = models[name]
        exported = AutoModelForCausalLM.from_pretrained(layout_run["out_root"] / name).eval()
        assert type(exported) is type(original), name
        assert exported.config.eos_token_id == 3
        assert exported.config.tie_word_embeddings == original.config.tie_word_embeddings
        want, got = original.state_dict(), exported.state_dict()
        assert got.keys() == want.keys(), name
        for key in want:
            assert torch.equal(got[key], want[key]), f"{name}: {key} changed in the round trip"
        with torch.no_grad():
            assert torch.equal(exported(tokens).logits, original(tokens).logits), name
        files = sorted(p.name for p in (layout_run["out_root"] / name).glob("*.safetensors"))
        if len(files) > 1:  # one file per pipeline stage, each holding only its tensors
            assert sum(len(load_file(layout_run["out_root"] / name / f)) for f in files) == len(got) - (
                1 if original.config.tie_word_embeddings else 0
            )


def test_value_head_reads_final_hidden_states(layout_run, checkpoints, tokens):
    models, _ = checkpoints
    for name in layout_run["names"]:
        values = _last_stage_output(layout_run["results"], name, "values")
        head = _last_stage_output(layout_run["results"], name, "head")
        with torch.no_grad():
            hidden = models[name].model(tokens).last_hidden_state  # after the final RMSNorm
        want = hidden @ head["weight"].T + head["bias"]
        assert values.shape == (BATCH, SEQ, VALUE_OUTPUTS)
        torch.testing.assert_close(values, want, atol=LOGITS_ATOL, rtol=0)


def test_qwen3_config_maps_to_qk_layernorm_and_back():
    _, hf_config = VARIANTS["qwen3_qk_norm_tied"]
    config = config_from_hf(hf_config)
    assert config.qk_layernorm and not config.qkv_bias and config.tie_word_embeddings
    assert config.head_dim == 32 != config.hidden_size // config.num_attention_heads
    back = config_to_hf(config)
    assert isinstance(back, Qwen3Config) and back.architectures == ["Qwen3ForCausalLM"]
    assert (back.head_dim, back.attention_bias, back.tie_word_embeddings) == (32, False, True)


def test_export_refuses_a_model_without_the_sources_qk_norms_or_bias():
    qwen3 = config_from_hf(VARIANTS["qwen3_qk_norm_tied"][1])
    llama = config_from_hf(VARIANTS["llama"][1])
    with pytest.raises(ValueError, match="qwen3 checkpoint but the model has no query/key norms"):
        export_config(llama, source=VARIANTS["qwen3_qk_norm_tied"][1])
    with pytest.raises(ValueError, match="qwen2 checkpoint but the model has no query/key/value bias"):
        export_config(qwen3, source=VARIANTS["qwen2_qkv_bias"][1])
    with pytest.raises(ValueError, match="both a query/key/value bias"):
        config_to_hf(ModelConfig(**{**qwen3.to_dict(), "qkv_bias": True}))


# Gemma configs as released (sizes shrunk): the features that keep them out, per generation.
GEMMA_REFUSALS = [
    pytest.param(GemmaConfig(**_COMMON, head_dim=16), ["sqrt(hidden_size)", "(1 + weight)"], id="gemma"),
    pytest.param(
        Gemma2Config(**_COMMON, head_dim=16),
        ["sqrt(hidden_size)", "(1 + weight)", "post_feedforward_layernorm", "attn_logit_softcapping"],
        id="gemma2",
    ),
    pytest.param(
        Gemma3TextConfig(**_COMMON, head_dim=16),
        ["sqrt(hidden_size)", "(1 + weight)", "post_feedforward_layernorm", "RoPE base"],
        id="gemma3",
    ),
    pytest.param(Gemma3Config(), ["sqrt(hidden_size)", "RoPE base"], id="gemma3_multimodal"),
]


@pytest.mark.parametrize(("hf_config", "features"), GEMMA_REFUSALS)
def test_gemma_is_refused_naming_what_megatron_lacks(hf_config, features):
    with pytest.raises(
        ValueError, match=re.escape("(Gemma) is not supported: megatron-core's GPTModel cannot")
    ) as info:
        config_from_hf(hf_config)
    for feature in features:
        assert feature in str(info.value), f"{hf_config.model_type}: the message does not name {feature!r}"
    if hf_config.model_type != "gemma2":  # only Gemma 2 soft-caps: the message must not blame it for the others
        assert "softcapping" not in str(info.value)
