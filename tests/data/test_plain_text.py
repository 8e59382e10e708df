"""Tokenizers without a chat template (base models) and templates whose end-of-turn token is not eos."""

import pytest

from aligner.data.encode import ChatEncoder, TextEncoder, encode_records, make_encoder
from aligner.data.formats import read_rows
from aligner.data.tokenizer import load_tokenizer

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture
def base_tokenizer(tokenizer_dir):
    """The data tests' tokenizer with its chat template removed: a base model's tokenizer."""
    tokenizer = load_tokenizer(tokenizer_dir)
    tokenizer.chat_template = None
    return tokenizer


@pytest.fixture
def chatml_tokenizer(tokenizer_dir):
    """A ChatML template on a base tokenizer: turns end with <|im_end|>, eos stays another token."""
    tokenizer = load_tokenizer(tokenizer_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    return tokenizer


def test_plain_text_concatenates_prompt_response_and_eos(base_tokenizer):
    encoder = make_encoder(base_tokenizer)
    assert isinstance(encoder, TextEncoder)
    (record,) = read_rows([{"input": "1 + 2 =", "output": " 3"}], "sft")
    (example,), _ = encode_records([record], base_tokenizer, max_length=64, encoder=encoder)
    prompt = base_tokenizer("1 + 2 =")["input_ids"]
    response = base_tokenizer(" 3", add_special_tokens=False)["input_ids"]
    sequence = example.sequence
    assert sequence.input_ids == [*prompt, *response, base_tokenizer.eos_token_id]
    assert sequence.loss_mask == [False] * len(prompt) + [True] * (len(response) + 1)
    assert sequence.prompt_length == len(prompt)


def test_prompt_template_formats_the_prompt_once(base_tokenizer):
    template = "<extra_id_1>User\n{prompt}\n<extra_id_1>Assistant\n"
    encoder = make_encoder(base_tokenizer, prompt_template=template)
    sequence = encoder.prompt_response([{"role": "user", "content": "hi"}], "yo", "r0")
    text = base_tokenizer.decode(sequence.input_ids[: sequence.prompt_length], skip_special_tokens=True)
    assert text.count("User") == 1 and "hi" in text
    with pytest.raises(ValueError, match=r"\{prompt\}"):
        make_encoder(base_tokenizer, prompt_template="no placeholder")


def test_plain_text_refuses_multi_turn_with_the_record_named(base_tokenizer):
    rows = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                          {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}]  # fmt: skip
    with pytest.raises(ValueError, match=r"dataset row 0: plain-text mode .* several"):
        encode_records(read_rows(rows, "sft"), base_tokenizer, max_length=64)


def test_chat_template_false_forces_plain_text_and_true_needs_a_template(tokenizer, base_tokenizer):
    assert isinstance(make_encoder(tokenizer, chat_template=False), TextEncoder)
    assert isinstance(make_encoder(tokenizer), ChatEncoder)
    with pytest.raises(ValueError, match="no chat_template"):
        make_encoder(base_tokenizer, chat_template=True)


def test_chatml_end_of_turn_is_detected_and_trained(chatml_tokenizer):
    encoder = make_encoder(chatml_tokenizer)
    im_end = chatml_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end != chatml_tokenizer.eos_token_id
    assert encoder.stop_token_ids == [chatml_tokenizer.eos_token_id, im_end]
    sequence = encoder.prompt_response([{"role": "user", "content": "2+2"}], "4", "r0")
    trained = [token for token, mask in zip(sequence.input_ids, sequence.loss_mask, strict=True) if mask]
    assert trained[-1] == im_end  # the model learns to stop with the template's end of turn
    assert sequence.input_ids[sequence.loss_mask.index(True) - 1] != im_end  # the prompt's turns stay untrained


def test_end_of_turn_token_must_be_a_token(chatml_tokenizer):
    assert make_encoder(chatml_tokenizer, end_of_turn_token="<|im_end|>").stop_token_ids
    with pytest.raises(ValueError, match="not a token"):
        make_encoder(chatml_tokenizer, end_of_turn_token="<|nope|>")


def test_the_data_section_picks_the_encoder(tmp_path, tokenizer):
    import json

    from aligner.config import ConfigError, DataConfig
    from aligner.data.splits import load_split

    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"input": "1 + 2 =", "output": " 3"}) + "\n")
    plain = load_split(str(path), "sft", tokenizer, DataConfig(train=str(path), chat_template=False))
    templated = load_split(str(path), "sft", tokenizer, DataConfig(train=str(path)))
    assert plain[0].sequence.input_ids != templated[0].sequence.input_ids
    assert plain[0].sequence.input_ids[-1] == tokenizer.eos_token_id
    with pytest.raises(ConfigError, match="prompt_template applies to plain text"):
        load_split(str(path), "sft", tokenizer, DataConfig(train=str(path), prompt_template="{prompt}"))


NEMO_PROMPT = "<extra_id_0>System\n\n<extra_id_1>User\nWhat is 2 + 2?\n<extra_id_1>Assistant\n"


def test_an_already_templated_prompt_is_not_templated_again(chatml_tokenizer, base_tokenizer):
    for tokenizer in (chatml_tokenizer, base_tokenizer):
        encoder = make_encoder(tokenizer, prompt_template=None)
        sequence = encoder.prompt_response([{"role": "user", "content": NEMO_PROMPT}], "4", "r0")
        raw = tokenizer(NEMO_PROMPT, add_special_tokens=False)["input_ids"]
        assert sequence.input_ids[: sequence.prompt_length][-len(raw) :] == raw
        prompt_text = tokenizer.decode(sequence.input_ids[: sequence.prompt_length])
        assert "<|im_start|>" not in prompt_text and prompt_text.count("User") == 1
        assert sequence.input_ids[-1] == tokenizer.eos_token_id
    plain = make_encoder(base_tokenizer, prompt_template="<extra_id_1>User\n{prompt}\n<extra_id_1>Assistant\n")
    text = base_tokenizer.decode(plain.prompt([{"role": "user", "content": NEMO_PROMPT}]))
    assert text.count("User") == 1
