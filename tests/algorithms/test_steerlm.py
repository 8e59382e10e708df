"""SteerLM's pure pieces: the attribute string and its place in the prompt.

Reward-model annotation and conditioned generation run models: see
tests/recipes/test_steerlm_annotate.py.
"""

import pytest
import torch

from aligner.algorithms.steerlm import (
    DEFAULT_ATTRIBUTES,
    attribute_value,
    conditioned_prompt,
    format_attributes,
    parse_attributes,
)

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
