"""Hugging Face exports that transformers' generate stops where aligner's engine stops.

A tiny ChatML-style tokenizer (eos ``<|endoftext|>``, end of turn ``<|im_end|>``)
and tiny random Llama (fp32), Mistral (bf16), Qwen2 (bf16) and Qwen3 (bf16)
checkpoints are built offline. Each is imported, exported with its source and tokenizer, and
checked: architecture class, token ids (the eos list holds ``<|im_end|>``),
dtype, tokenizer files and generation_config.json; then greedy generation with
aligner's engine and with ``transformers`` ``generate`` on the export stop at
the same ``<|im_end|>``. ``python -m aligner.export_hf`` exports a saved checkpoint.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed import run_distributed
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
WORDS = ["user", "assistant", "system", "hi", "\n", " "] + [f"w{i}" for i in range(30)]
VOCAB = 64
MAX_NEW_TOKENS = 8
_COMMON = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)
# name: (class, config, dtype of the saved weights)
VARIANTS = {
    "llama": (LlamaForCausalLM, LlamaConfig(**_COMMON, bos_token_id=1, eos_token_id=0), torch.float32),
    "mistral": (
        MistralForCausalLM,
        MistralConfig(**_COMMON, sliding_window=None, bos_token_id=1, eos_token_id=0),
        torch.bfloat16,
    ),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config(**_COMMON, bos_token_id=None, eos_token_id=0), torch.bfloat16),
    "qwen3": (
        Qwen3ForCausalLM,
        Qwen3Config(**_COMMON, head_dim=32, bos_token_id=None, eos_token_id=0),
        torch.bfloat16,
    ),
}


def build_chatml_tokenizer(out_dir: Path):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*SPECIALS, "<unk>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s"), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        extra_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=CHATML_TEMPLATE,
    )
    tokenizer.save_pretrained(str(out_dir))
    return AutoTokenizer.from_pretrained(str(out_dir))


def _greedy(model, ids, steps):
    out = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            out.append(int(model(torch.tensor([out])).logits[0, -1].float().argmax()))
    return out[len(ids) :]


def _rig_end_of_turn(model, tokenizer, prompt):
    """Make greedy decoding end the turn a few tokens in: hidden dim 0 carries only the
    embedding, which is 0 except for one token ``T`` the model produces early; ``<|im_end|>``'s
    head row reads dim 0 alone, so it wins right after ``T`` and never before."""
    im_end, eos = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id
    with torch.no_grad():
        inner = model.model
        inner.embed_tokens.weight[:, 0] = 0
        for layer in inner.layers:
            layer.self_attn.o_proj.weight[0] = 0
            layer.mlp.down_proj.weight[0] = 0
        inner.norm.weight[0] = 1.0
        model.lm_head.weight[im_end] = 0
        model.lm_head.weight[eos] = 0
        model.lm_head.weight[im_end, 0] = 100.0
        generated = _greedy(model, prompt, MAX_NEW_TOKENS - 2)
        trigger = next(t for t in generated if t not in prompt and t not in tokenizer.all_special_ids)
        inner.embed_tokens.weight[trigger, 0] = 100.0


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Tokenizer folder, prompt, and per variant the saved checkpoint folder (tokenizer included)."""
    root = tmp_path_factory.mktemp("hf_export")
    tokenizer = build_chatml_tokenizer(root / "tokenizer")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    prompt = list(prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt)
    torch.manual_seed(0)
    paths = {}
    for name, (cls, config, dtype) in VARIANTS.items():
        model = cls(config).eval()
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param) * 0.05)
        model.to(dtype).float()  # choose the trigger on the weights as saved
        _rig_end_of_turn(model, tokenizer, prompt)
        model.to(dtype).save_pretrained(root / name)
        tokenizer.save_pretrained(str(root / name))
        paths[name] = str(root / name)
    return {"root": root, "tokenizer": str(root / "tokenizer"), "prompt": prompt, "paths": paths}


def export_worker(paths: dict, tokenizer_dir: str, out_root: str, prompt: list):
    from aligner.data.tokenizer import load_tokenizer, stop_token_ids
    from aligner.generation.torch_engine import generate
    from aligner.models.hf import export_hf, import_hf
    from aligner.parallel import destroy, initialize

    initialize()
    tokenizer = load_tokenizer(tokenizer_dir)
    stops = stop_token_ids(tokenizer)
    results = {"stops": stops}
    for name, path in paths.items():
        model = import_hf(path).eval()
        export_hf(model, f"{out_root}/{name}", source=path, tokenizer=tokenizer_dir)
        out = generate(
            model,
            [prompt],
            max_new_tokens=MAX_NEW_TOKENS,
            eos_token_id=stops,
            pad_token_id=tokenizer.pad_token_id,
            greedy=True,
        )
        results[name] = {"tokens": out.tokens[0, : out.lengths[0]].tolist(), "is_end": bool(out.is_end[0])}
    destroy()
    return results


@pytest.fixture(scope="module")
def exported(sources, tmp_path_factory):
    out_root = tmp_path_factory.mktemp("exports")
    (results,) = run_distributed(
        export_worker, 1, args=(sources["paths"], sources["tokenizer"], str(out_root), sources["prompt"])
    )
    return out_root, results


@pytest.mark.slow
def test_export_keeps_class_ids_dtype_and_tokenizer(sources, exported):
    out_root, results = exported
    tokenizer = AutoTokenizer.from_pretrained(sources["tokenizer"])
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert results["stops"] == [tokenizer.eos_token_id, im_end]
    for name, (cls, _, dtype) in VARIANTS.items():
        folder = out_root / name
        config = json.loads((folder / "config.json").read_text())
        assert config["architectures"] == [cls.__name__], name
        assert config["eos_token_id"] == [tokenizer.eos_token_id, im_end], name
        assert config["pad_token_id"] == tokenizer.pad_token_id, name
        assert config.get("bos_token_id") == VARIANTS[name][1].bos_token_id, name
        assert config["dtype"] == str(dtype).removeprefix("torch."), name
        generation = json.loads((folder / "generation_config.json").read_text())
        assert generation["eos_token_id"] == [tokenizer.eos_token_id, im_end], name
        assert (folder / "tokenizer.json").is_file() and (folder / "tokenizer_config.json").is_file()
        loaded = AutoTokenizer.from_pretrained(str(folder))
        assert loaded.convert_tokens_to_ids("<|im_end|>") == im_end and loaded.chat_template == tokenizer.chat_template
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert type(model) is cls and model.dtype == dtype, name
        original = AutoModelForCausalLM.from_pretrained(sources["paths"][name])
        for key, tensor in original.state_dict().items():
            assert torch.equal(model.state_dict()[key], tensor), f"{name}: {key}"


@pytest.mark.slow
def test_transformers_generate_stops_where_the_engine_stops(sources, exported):
    out_root, results = exported
    prompt = sources["prompt"]
    for name in VARIANTS:
        ours = results[name]
        im_end = AutoTokenizer.from_pretrained(str(out_root / name)).convert_tokens_to_ids("<|im_end|>")
        assert ours["is_end"] and ours["tokens"][-1] == im_end, name
        assert len(ours["tokens"]) - len(prompt) < MAX_NEW_TOKENS, name
        # fp32 compute on both sides (bf16 weights upcast exactly), greedy, the export's generation_config.
        model = AutoModelForCausalLM.from_pretrained(out_root / name, dtype=torch.float32).eval()
        with torch.no_grad():
            theirs = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        assert theirs[0].tolist() == ours["tokens"], name


def checkpoint_worker(source: str, root: str):
    from aligner.checkpoint import save_checkpoint
    from aligner.config import DataConfig, ModelSourceConfig, OptimConfig, RunConfig
    from aligner.models.hf import import_hf, megatron_to_hf
    from aligner.models.sharding import gather_full_state_dict
    from aligner.parallel import destroy, initialize
    from aligner.trainers.state import build_train_state

    initialize()
    model = import_hf(source)
    with torch.no_grad():  # "trained": the export must hold these weights, not the source's
        for param in model.parameters():
            param.add_(0.01)
    state = build_train_state(model, OptimConfig(warmup_steps=0), total_steps=4)
    run_config = RunConfig(model=ModelSourceConfig(hf_path=source), data=DataConfig(train="unused.jsonl"))
    save_checkpoint(root, 1, {"policy": state}, {"step": 1}, keep_last=1, run_config=run_config)
    weights = megatron_to_hf(gather_full_state_dict(model), model.aligner_config)
    destroy()
    return weights


@pytest.mark.slow
def test_cli_exports_a_saved_checkpoint(sources, tmp_path):
    source = sources["paths"]["mistral"]
    (weights,) = run_distributed(checkpoint_worker, 1, args=(source, str(tmp_path / "ckpt")))
    out = tmp_path / "hf"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "aligner.export_hf", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, done.stderr
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model) is MistralForCausalLM and model.dtype == torch.bfloat16  # the source's class and dtype
    for key, tensor in weights.items():
        assert torch.equal(model.state_dict()[key], tensor.to(torch.bfloat16)), key
    # The tokenizer came from model.hf_path (data.tokenizer unset): a chained recipe finds it in the export.
    from aligner.config import DataConfig, ModelSourceConfig
    from aligner.data.splits import tokenizer_for

    chained = tokenizer_for(ModelSourceConfig(hf_path=str(out)), DataConfig(train="unused.jsonl"))
    assert chained.convert_tokens_to_ids("<|im_end|>") in model.generation_config.eos_token_id

    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=180)
    assert again.returncode != 0 and "not empty" in again.stderr


def test_cli_refuses_value_models(tmp_path):
    from aligner.console import UserError
    from aligner.export_hf import choose_state

    meta = {"states": {"critic": {"value_outputs": 1}, "policy": {"value_outputs": None}}}
    assert choose_state(meta, None, tmp_path) == "policy"
    with pytest.raises(UserError, match="value/reward model"):
        choose_state(meta, "critic", tmp_path)
    with pytest.raises(UserError, match="only value/reward models"):
        choose_state({"states": {"rm": {"value_outputs": 1}}}, None, tmp_path)
