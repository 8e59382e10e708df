"""The tiny byte-level BPE tokenizer: build, save, load with AutoTokenizer, chat template, determinism."""

import time
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from aligner.data.tokenizer import (
    BOS_TOKEN,
    CHAT_TEMPLATE,
    EOS_TOKEN,
    PAD_TOKEN,
    ROLE_TOKENS,
    build_tokenizer,
    load_tokenizer,
)

BUILD_SECONDS = 5.0  # the brief's budget for one build, imports included

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 3 + 5?"},
    {"role": "assistant", "content": "The answer is 8."},
]


def test_auto_tokenizer_round_trip(tokenizer_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)
    assert len({tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}) == 3
    for token in ROLE_TOKENS.values():
        (token_id,) = tokenizer.encode(token, add_special_tokens=False)
        assert tokenizer.convert_ids_to_tokens(token_id) == token
    # Byte-level: any text, unseen characters included, decodes back exactly.
    text = "What is 12 * 7? Héllo wörld ✓ 漢字\n\ttabs"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert max(ids) < len(tokenizer) <= 384


def test_chat_template_renders_and_tokenizes(tokenizer):
    text = tokenizer.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True)
    assert text == "<|bos|><|system|>Be brief.<|eos|><|user|>What is 3 + 5?<|eos|><|assistant|>"
    prompt_ids = tokenizer.apply_chat_template(
        MESSAGES[:2], tokenize=True, add_generation_prompt=True, return_dict=False
    )
    full_ids = tokenizer.apply_chat_template(MESSAGES, tokenize=True, return_dict=False)
    assert full_ids[: len(prompt_ids)] == prompt_ids
    assert full_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(full_ids[len(prompt_ids) : -1]) == "The answer is 8."
    with pytest.raises(Exception, match="unknown role: tool"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_build_is_deterministic_and_fast(tmp_path: Path):
    start = time.perf_counter()
    build_tokenizer(tmp_path / "a")
    assert time.perf_counter() - start < BUILD_SECONDS
    build_tokenizer(tmp_path / "b")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_build_from_custom_texts(tmp_path: Path):
    tokenizer = build_tokenizer(tmp_path, texts=["hello world"] * 10, vocab_size=300)
    assert len(tokenizer.encode("hello world", add_special_tokens=False)) == 2  # "hello", " world" merged
    assert len(tokenizer) <= 300
    assert tokenizer.chat_template == CHAT_TEMPLATE


def test_vocab_size_too_small(tmp_path: Path):
    with pytest.raises(ValueError, match="vocab_size must be >= 262"):
        build_tokenizer(tmp_path, vocab_size=100)


def _save_plain_tokenizer(path: Path, **special_tokens: str) -> None:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.add_special_tokens(["</s>"])
    PreTrainedTokenizerFast(tokenizer_object=bpe, **special_tokens).save_pretrained(path)


def test_load_sets_missing_pad_to_eos(tmp_path: Path):
    _save_plain_tokenizer(tmp_path, eos_token="</s>")
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.pad_token == "</s>"
    assert tokenizer.pad_token_id == tokenizer.eos_token_id


def test_load_requires_eos(tmp_path: Path):
    _save_plain_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="has no eos_token"):
        load_tokenizer(tmp_path)


def test_load_never_downloads(tmp_path: Path):
    with pytest.raises(OSError):
        load_tokenizer(tmp_path / "missing")


@pytest.mark.parametrize("relative", [False, True])
def test_missing_path_says_it_does_not_exist(tmp_path: Path, monkeypatch, relative: bool):
    monkeypatch.chdir(tmp_path)
    path = Path("runs/tok") if relative else tmp_path / "x" / "y"
    with pytest.raises(FileNotFoundError) as raised:
        load_tokenizer(path)
    assert str(raised.value) == f"tokenizer path {path} does not exist"  # not a Hub repo id complaint


def test_file_instead_of_folder(tmp_path: Path):
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(NotADirectoryError, match="is a file; give the folder"):
        load_tokenizer(tmp_path / "tokenizer.json")


@pytest.mark.parametrize("files", [(), ("tokenizer_config.json", "config.json")])
def test_folder_without_tokenizer_files_names_what_is_expected(tmp_path: Path, files: tuple[str, ...]):
    for name in files:
        (tmp_path / name).write_text("{}")
    with pytest.raises(FileNotFoundError) as raised:
        load_tokenizer(tmp_path)
    message = str(raised.value)
    assert message.startswith(f"tokenizer path {tmp_path} has no tokenizer files")
    assert f"(found: {', '.join(sorted(files)) or 'nothing'})" in message
    for expected in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json"):
        assert expected in message


def test_unreadable_tokenizer_names_the_folder(tmp_path: Path, tokenizer_dir: Path):
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        (tmp_path / name).write_bytes((tokenizer_dir / name).read_bytes())
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=f"cannot load the tokenizer in {tmp_path}: "):
        load_tokenizer(tmp_path)
