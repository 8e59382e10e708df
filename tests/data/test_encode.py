"""Encoding through the chat template: prompt/response split, trained-token masks, over-length policies."""

import json
import re

import pytest

from aligner.data.encode import (
    MISSING_ATTRIBUTE,
    ChatEncoder,
    KTOExample,
    PreferenceExample,
    PromptExample,
    RegressionExample,
    SFTExample,
    encode_records,
)
from aligner.data.formats import read_jsonl, read_rows
from aligner.data.tokenizer import load_tokenizer

QUESTION = "What is 3 + 5?"
LONG_ANSWER = "The answer is 8 because 3 plus 5 makes 8."


def template_ids(tokenizer, messages, add_generation_prompt=False):
    """Token ids straight from transformers' own apply_chat_template (independent of ChatEncoder)."""
    return tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
    )


def trained_spans(sequence):
    """Maximal runs of trained positions as (start, end) pairs."""
    spans, start = [], None
    for position, trained in enumerate([*sequence.loss_mask, False]):
        if trained and start is None:
            start = position
        elif not trained and start is not None:
            spans.append((start, position))
            start = None
    return spans


def encode(tokenizer, rows, kind, **options):
    options.setdefault("max_length", 64)
    return encode_records(read_rows(rows, kind), tokenizer, **options)


def test_prompt_is_the_templates_generation_prompt(tokenizer):
    (example,), report = encode(tokenizer, [{"input": QUESTION, "output": LONG_ANSWER}], "sft")
    assert isinstance(example, SFTExample) and example.index == 0
    sequence = example.sequence
    user = [{"role": "user", "content": QUESTION}]
    prompt = template_ids(tokenizer, user, add_generation_prompt=True)
    full = template_ids(tokenizer, [*user, {"role": "assistant", "content": LONG_ANSWER}])
    assert sequence.input_ids == full
    assert sequence.prompt_length == len(prompt)
    assert sequence.input_ids[: len(prompt)] == prompt
    assert sequence.loss_mask == [False] * len(prompt) + [True] * (len(full) - len(prompt))
    assert sequence.input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(sequence.input_ids[len(prompt) :], skip_special_tokens=True) == LONG_ANSWER
    assert (report.kept, report.truncated, report.dropped) == (1, 0, 0)


def test_multi_turn_trains_every_assistant_turn(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": "8"},
        {"role": "user", "content": "And 2 + 2?"},
        {"role": "assistant", "content": "4"},
    ]
    (example,), _ = encode(tokenizer, [{"messages": messages}], "sft")
    sequence = example.sequence
    assert sequence.input_ids == template_ids(tokenizer, messages)
    spans = trained_spans(sequence)
    assert len(spans) == 2
    for (start, end), turn in zip(spans, (2, 4), strict=True):
        assert start == len(template_ids(tokenizer, messages[:turn], add_generation_prompt=True))
        assert tokenizer.decode(sequence.input_ids[start:end]) == messages[turn]["content"] + tokenizer.eos_token
    assert sequence.prompt_length == spans[0][0]


def test_preference_pair_shares_prompt_tokens(tokenizer):
    row = {"prompt": QUESTION, "chosen": "8", "rejected": "31", "chosen_reward": 2.0, "rejected_reward": 0.0}
    (example,), _ = encode(tokenizer, [row], "preference")
    assert isinstance(example, PreferenceExample)
    chosen, rejected = example.chosen, example.rejected
    assert chosen.prompt_length == rejected.prompt_length
    assert chosen.input_ids[: chosen.prompt_length] == rejected.input_ids[: rejected.prompt_length]
    assert tokenizer.decode(chosen.input_ids[chosen.prompt_length :], skip_special_tokens=True) == "8"
    assert tokenizer.decode(rejected.input_ids[rejected.prompt_length :], skip_special_tokens=True) == "31"
    assert (example.chosen_reward, example.rejected_reward) == (2.0, 0.0)


def test_regression_attribute_order_and_missing(tokenizer):
    row = {"prompt": QUESTION, "response": "8", "attributes": {"verbosity": 0, "correctness": 4, "extra": 1}}
    (example,), _ = encode(tokenizer, [row], "regression", attribute_names=("correctness", "helpfulness", "verbosity"))
    assert isinstance(example, RegressionExample)
    assert example.attributes == [4.0, MISSING_ATTRIBUTE, 0.0]
    with pytest.raises(ValueError, match="need attribute_names"):
        encode(tokenizer, [row], "regression")


def test_kto_and_rl_prompt(tokenizer):
    (kto,), _ = encode(tokenizer, [{"prompt": QUESTION, "response": "8", "label": False}], "kto")
    assert isinstance(kto, KTOExample) and kto.desirable is False
    (prompt,), _ = encode(tokenizer, [{"prompt": QUESTION, "answer": 8}], "rl_prompt")
    assert isinstance(prompt, PromptExample)
    user = [{"role": "user", "content": QUESTION}]
    assert prompt.prompt_ids == template_ids(tokenizer, user, add_generation_prompt=True)
    assert prompt.extra == {"answer": 8}


# --- over-length policies ----------------------------------------------------------------------------


def lengths_of(tokenizer, answer):
    (example,), _ = encode(tokenizer, [{"input": QUESTION, "output": answer}], "sft")
    return example.sequence.prompt_length, len(example.sequence)


def test_truncate_cuts_the_response_from_the_right(tokenizer):
    prompt_length, full_length = lengths_of(tokenizer, LONG_ANSWER)
    rows = [{"input": QUESTION, "output": LONG_ANSWER}, {"input": QUESTION, "output": "8"}]
    max_length = prompt_length + 3
    examples, report = encode(tokenizer, rows, "sft", max_length=max_length, over_length="truncate")
    assert (report.kept, report.truncated, report.dropped) == (2, 1, 0)
    cut = examples[0].sequence
    (full,), _ = encode(tokenizer, rows[:1], "sft")
    assert len(cut) == max_length < full_length
    assert cut.input_ids == full.sequence.input_ids[:max_length]
    assert cut.loss_mask == full.sequence.loss_mask[:max_length]
    assert sum(cut.loss_mask) == 3


def test_truncate_keeps_one_response_token_or_drops(tokenizer):
    prompt_length, _ = lengths_of(tokenizer, LONG_ANSWER)
    rows = [{"input": QUESTION, "output": LONG_ANSWER}]
    examples, report = encode(tokenizer, rows, "sft", max_length=prompt_length + 1, over_length="truncate")
    assert sum(examples[0].sequence.loss_mask) == 1
    # The prompt alone fills max_length: no room for a response token, so the record is dropped.
    examples, report = encode(tokenizer, rows, "sft", max_length=prompt_length, over_length="truncate")
    assert examples == [] and (report.kept, report.dropped) == (0, 1)
    assert report.dropped_origins == ["dataset row 0"]


def test_drop_policy(tokenizer):
    _, full_length = lengths_of(tokenizer, LONG_ANSWER)
    rows = [{"input": QUESTION, "output": "8"}, {"input": QUESTION, "output": LONG_ANSWER}]
    examples, report = encode(tokenizer, rows, "sft", max_length=full_length - 1, over_length="drop")
    assert (report.kept, report.truncated, report.dropped) == (1, 0, 1)
    assert [example.index for example in examples] == [0]
    assert "kept 1 of 2 records (0 truncated), dropped 1" in str(report)


def test_error_policy_names_record_and_lengths(tokenizer, tmp_path):
    prompt_length, full_length = lengths_of(tokenizer, LONG_ANSWER)
    path = tmp_path / "train.jsonl"
    rows = [{"input": "What is 1 + 1?", "output": "2"}, {"input": QUESTION, "output": LONG_ANSWER}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    expected = (
        f"{path}:2: {full_length} tokens (prompt {prompt_length}, response {full_length - prompt_length}) "
        f"exceed max_length {full_length - 1}"
    )
    with pytest.raises(ValueError, match="^" + re.escape(expected)):
        encode_records(read_jsonl(path, "sft"), tokenizer, max_length=full_length - 1, over_length="error")


def test_preference_pair_dropped_when_either_side_is(tokenizer):
    prompt_length, _ = lengths_of(tokenizer, "8")
    row = {"prompt": QUESTION, "chosen": "8", "rejected": LONG_ANSWER}
    examples, report = encode(tokenizer, [row], "preference", max_length=prompt_length + 2, over_length="drop")
    assert examples == [] and report.dropped == 1
    examples, report = encode(tokenizer, [row], "preference", max_length=prompt_length + 2)
    assert report.truncated == 1 and len(examples[0].rejected) == prompt_length + 2
    with pytest.raises(ValueError, match=r"^dataset row 0 \(rejected\): "):
        encode(tokenizer, [row], "preference", max_length=prompt_length + 2, over_length="error")


def test_rl_prompts_are_never_cut(tokenizer):
    rows = [{"prompt": QUESTION}]
    (example,), _ = encode(tokenizer, rows, "rl_prompt")
    short = len(example.prompt_ids) - 1
    examples, report = encode(tokenizer, rows, "rl_prompt", max_length=short, over_length="truncate")
    assert examples == [] and report.dropped == 1
    with pytest.raises(ValueError, match=r"^dataset row 0: prompt of \d+ tokens exceeds max_length"):
        encode(tokenizer, rows, "rl_prompt", max_length=short, over_length="error")


def test_bad_policy_and_length(tokenizer):
    with pytest.raises(ValueError, match="unknown over_length 'clip'"):
        encode(tokenizer, [], "sft", over_length="clip")
    with pytest.raises(ValueError, match="max_length must be >= 2"):
        encode(tokenizer, [], "sft", max_length=1)


# --- templates the encoder must refuse ---------------------------------------------------------------


def test_template_checks(tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    messages = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "8"}]

    # The generation prompt adds a token the full conversation does not have: not a prefix.
    tokenizer.chat_template = tokenizer.chat_template.replace("{{ '<|assistant|>' }}", "{{ '<|assistant|>x' }}")
    with pytest.raises(ValueError, match="^r0: the chat template does not render turn 1 as a prefix"):
        ChatEncoder(tokenizer).conversation(messages, [1], "r0")

    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="^r0: the chat template does not end assistant turn 1 with eos_token"):
        ChatEncoder(tokenizer).conversation(messages, [1], "r0")

    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="has no chat_template"):
        ChatEncoder(tokenizer)
