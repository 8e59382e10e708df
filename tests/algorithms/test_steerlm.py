"""SteerLM: the attribute string, its place in the prompt, reward-model annotation, conditioned generation.

The string helpers are pure and tested here. ``annotate`` and
``generate_with_attributes`` need megatron (initialized once per process), so
one spawned world runs them and returns raw outputs next to direct forwards of
the same models; the tests compare them here.
"""

import math
import random
import re
from decimal import ROUND_HALF_UP, Decimal

import pytest
import torch
from distributed import run_distributed

from aligner.algorithms.steerlm import (
    DEFAULT_ATTRIBUTES,
    annotate,
    attribute_value,
    conditioned_prompt,
    format_attributes,
    generate_with_attributes,
    parse_attributes,
)
from aligner.models.config import ModelConfig

NEMO_STRING = (
    "quality:4,toxicity:0,humor:0,creativity:0,helpfulness:4,correctness:4,coherence:4,complexity:4,verbosity:4"
)
NEMO_VALUES = dict(quality=4, toxicity=0, humor=0, creativity=0, helpfulness=4, correctness=4, coherence=4,
                   complexity=4, verbosity=4)  # fmt: skip
HELPSTEER = ("helpfulness", "correctness", "verbosity")


# ---------------------------------------------------------------- attribute strings


def test_canonical_string_is_nemo_aligners():
    assert format_attributes(NEMO_VALUES) == NEMO_STRING
    assert format_attributes(NEMO_VALUES, DEFAULT_ATTRIBUTES) == NEMO_STRING
    assert parse_attributes(NEMO_STRING) == NEMO_VALUES
    assert list(parse_attributes(NEMO_STRING)) == list(DEFAULT_ATTRIBUTES)


def test_round_trip_in_configured_order():
    count = int(torch.randint(1, len(DEFAULT_ATTRIBUTES) + 1, ()))
    names = [DEFAULT_ATTRIBUTES[i] for i in torch.randperm(len(DEFAULT_ATTRIBUTES))[:count]]
    values = {name: int(torch.randint(0, 5, ())) for name in reversed(names)}
    text = format_attributes(values, names)
    assert [item.split(":")[0] for item in text.split(",")] == names
    parsed = parse_attributes(text, names)
    assert parsed == values and list(parsed) == names
    assert parse_attributes(text, None) == values


@pytest.mark.parametrize(
    "value,expected", [(4.6, 4), (100, 4), (-1, 0), (-0.4, 0), (2.5, 3), (1.49, 1), (3.5, 4), (0.5, 1), (2, 2)]
)
def test_values_are_clamped_then_rounded_half_up(value, expected):
    assert attribute_value(value) == expected
    assert format_attributes({"helpfulness": value}, ["helpfulness"]) == f"helpfulness:{expected}"
    assert attribute_value(torch.tensor(value, dtype=torch.float32)) == expected


def test_parse_tolerates_whitespace_and_any_order():
    assert parse_attributes(" verbosity: 1 , helpfulness:3,correctness :0 ", HELPSTEER) == {
        "helpfulness": 3,
        "correctness": 0,
        "verbosity": 1,
    }


@pytest.mark.parametrize(
    "values,names,match",
    [
        ({"helpfulness": 3}, HELPSTEER, r"missing attribute\(s\) \['correctness', 'verbosity'\]"),
        ({"helpfulness": 3, "humour": 1}, ["helpfulness"], r"unknown attribute\(s\) \['humour'\]"),
        ({"helpfulness": float("nan")}, ["helpfulness"], "finite"),
        ({"a": 1}, ["a", "a"], "repeated"),
        ({"a:b": 1}, ["a:b"], "identifiers"),
        ({}, [], "non-empty"),
    ],
)
def test_format_errors(values, names, match):
    with pytest.raises(ValueError, match=match):
        format_attributes(values, names)


@pytest.mark.parametrize(
    "text,names,match",
    [
        ("", HELPSTEER, "empty"),
        ("helpfulness", None, "'helpfulness' .* is not 'name:value'"),
        ("helpfulness:1:2", None, "not 'name:value'"),
        (":3", None, "invalid name"),
        ("helpfulness:5", None, "'helpfulness' .* value '5'.*0..4"),
        ("helpfulness:-1", None, "value '-1'"),
        ("helpfulness:2.5", None, "value '2.5'"),
        ("helpfulness:a", None, "value 'a'"),
        ("helpfulness:", None, "value ''"),
        ("helpfulness:1,helpfulness:2", None, "twice"),
        ("helpfulness:1,correctness:2", HELPSTEER, r"missing attribute\(s\) \['verbosity'\]"),
        ("helpfulness:1,correctness:2,verbosity:0,humor:1", HELPSTEER, r"unknown attribute\(s\) \['humor'\]"),
        (NEMO_STRING.replace("quality:4,", ""), DEFAULT_ATTRIBUTES, r"missing attribute\(s\) \['quality'\]"),
    ],
)
def test_parse_errors(text, names, match):
    with pytest.raises(ValueError, match=match):
        parse_attributes(text, names)


# ---------------------------------------------------------------- the attribute line in the prompt

VALUES = {"helpfulness": 4, "correctness": 3, "verbosity": 1}
LINE = "<attributes>helpfulness:4,correctness:3,verbosity:1</attributes>"


def test_text_prompt_gets_a_first_line():
    assert conditioned_prompt("What is 2+3?", VALUES, HELPSTEER) == f"{LINE}\nWhat is 2+3?"


def test_chat_prompt_gets_a_system_turn():
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    out = conditioned_prompt(messages, VALUES, HELPSTEER)
    assert out == [{"role": "system", "content": LINE}, *messages]
    assert messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def test_existing_system_turn_gets_the_line_first():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    out = conditioned_prompt(messages, VALUES, HELPSTEER)
    assert out == [{"role": "system", "content": f"{LINE}\nBe brief."}, {"role": "user", "content": "hi"}]
    assert messages[0]["content"] == "Be brief."
    empty_system = conditioned_prompt([{"role": "system", "content": ""}], VALUES, HELPSTEER)
    assert empty_system == [{"role": "system", "content": LINE}]


def test_bad_chat_prompt():
    with pytest.raises(ValueError, match="role"):
        conditioned_prompt([{"content": "hi"}], VALUES, HELPSTEER)


# ---------------------------------------------------------------- annotate and generate (spawned world)

MODEL = ModelConfig(
    num_layers=2,
    hidden_size=32,
    num_attention_heads=4,
    ffn_hidden_size=64,
    vocab_size=64,
    max_position_embeddings=128,  # the attribute line alone is 65 characters
    init_std=0.3,
)
# Head biases: attribute 0 always far above 4, attribute 1 far below 0, attribute 2 spread around 2.
HEAD_BIAS, HEAD_STD = (20.0, -20.0, 2.0), 0.3
BATCH_SIZE = 4
MAX_NEW = 6
CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789:,<>/ \n+?")


def _tokenizer():
    """A character-level Hugging Face tokenizer with a chat template, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<pad>", "<eos>", "<unk>", *CHARS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    return tokenizer


def _records(seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    lengths = [5, 2, 9, 3, 7, 1]
    return [
        {
            "prompt": f"p{i}",
            "response": f"r{i}",
            "ids": torch.randint(3, 64, (n,), generator=gen).tolist(),
            "attributes": {"helpfulness": -100},
        }  # fmt: skip
        for i, n in enumerate(lengths)
    ]


def steerlm_worker(records):
    from aligner.generation.torch_engine import generate
    from aligner.models.gpt import build_model
    from aligner.parallel import destroy, initialize

    initialize()
    result = {}
    reward_model = build_model(MODEL, num_value_outputs=len(HELPSTEER))
    with torch.no_grad():
        reward_model.output_layer.weight.normal_(0.0, HEAD_STD)
        reward_model.output_layer.bias.copy_(torch.tensor(HEAD_BIAS))
    reward_model.train()
    result["by_encode"] = annotate(records, reward_model, lambda r: r["ids"], names=HELPSTEER, batch_size=BATCH_SIZE)
    result["training_after"] = reward_model.training
    result["by_ids"] = annotate(records, reward_model, [r["ids"] for r in records], names=HELPSTEER, batch_size=1)
    reward_model.eval()
    with torch.no_grad():
        result["direct"] = [reward_model(torch.tensor([r["ids"]]), None, None)[0, -1].tolist() for r in records]
    try:
        annotate(records, reward_model, lambda r: r["ids"], names=("helpfulness", "correctness"))
    except ValueError as err:
        result["wrong_count"] = str(err)

    tokenizer = _tokenizer()
    policy = build_model(MODEL)
    chat = [{"role": "user", "content": "add 2 3"}]
    attrs = {"helpfulness": 4, "correctness": 4, "verbosity": 1}
    result["chat"] = generate_with_attributes(
        policy, tokenizer, chat, attrs, names=HELPSTEER, max_new_tokens=MAX_NEW, greedy=True
    )
    result["text"] = generate_with_attributes(
        policy, tokenizer, "add 2 3", attrs, names=HELPSTEER, max_new_tokens=MAX_NEW, greedy=True
    )
    # The same by hand: the rendered prompt, its ids, the engine, the decode.
    line = "<attributes>helpfulness:4,correctness:4,verbosity:1</attributes>"
    rendered = {"chat": f"<system>{line}\n<user>add 2 3\n<assistant>", "text": f"{line}\nadd 2 3"}
    for kind, text in rendered.items():
        ids = tokenizer.encode(text, add_special_tokens=False)
        out = generate(policy, [ids], max_new_tokens=MAX_NEW, eos_token_id=1, pad_token_id=0, greedy=True)
        response = out.tokens[0, len(ids) : int(out.lengths[0])].tolist()
        result[f"expected_{kind}"] = tokenizer.decode(response, skip_special_tokens=True)
    destroy()
    return result


def _reference_value(score: float) -> int:
    return min(4, max(0, int(Decimal(repr(score)).quantize(Decimal(1), rounding=ROUND_HALF_UP))))


@pytest.fixture(scope="module")
def world():
    seed = random.randrange(2**31)  # fresh per run; printed for replaying a failure
    print(f"steerlm records seed {seed}")
    records = _records(seed)
    return records, run_distributed(steerlm_worker, 1, args=(records,))[0]


@pytest.mark.slow
def test_annotate_reads_the_last_real_token_and_rounds(world):
    records, result = world
    expected = [{n: _reference_value(s) for n, s in zip(HELPSTEER, scores, strict=True)} for scores in result["direct"]]
    assert [r["attributes"] for r in result["by_encode"]] == expected
    assert [r["attributes"] for r in result["by_ids"]] == expected
    assert all(e["helpfulness"] == 4 and e["correctness"] == 0 for e in expected), "clamping at both ends"
    for record, annotated in zip(records, result["by_encode"], strict=True):
        assert {k: v for k, v in annotated.items() if k != "attributes"} == {
            k: v for k, v in record.items() if k != "attributes"
        }
    assert result["training_after"]
    assert all(not math.isnan(s) for scores in result["direct"] for s in scores)


@pytest.mark.slow
def test_annotate_checks_the_output_count(world):
    _, result = world
    assert re.search(r"3 outputs but 2 attribute names", result["wrong_count"])


@pytest.mark.slow
def test_generate_with_attributes_puts_the_line_in_the_prompt(world):
    _, result = world
    assert result["chat"] == result["expected_chat"]
    assert result["text"] == result["expected_text"]


def test_annotate_argument_errors():
    with pytest.raises(ValueError, match="batch_size"):
        annotate([{}], torch.nn.Linear(1, 1), [[1]], names=HELPSTEER, batch_size=0)
    with pytest.raises(ValueError, match="2 token id lists for 1 records"):
        annotate([{}], torch.nn.Linear(1, 1), [[1], [2]], names=HELPSTEER)
    with pytest.raises(ValueError, match=r"record\(s\) \[1\] encode to no tokens"):
        annotate([{}, {}], torch.nn.Linear(1, 1), [[1], []], names=HELPSTEER)
