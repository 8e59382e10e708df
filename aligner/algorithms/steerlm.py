"""SteerLM: condition a policy on attribute values written into its prompt.

The recipe (Dong et al., 2023; NeMo-Aligner): train a multi-attribute
regression reward model (:func:`aligner.algorithms.reward.regression_loss`),
label the SFT data with its predictions (:func:`attribute_value` turns a
prediction into a value; the model-running part is
:func:`aligner.recipes.steerlm.annotate`), fine-tune with each example's
attribute string in the prompt (:func:`conditioned_prompt`, plain SFT loss),
then ask for the attributes you want at inference
(:func:`aligner.generation.steerlm.generate_with_attributes`).

The attribute string is NeMo-Aligner's canonical form, ``name:value`` pairs in
a fixed order joined by commas, values integers ``0..4``::

    quality:4,toxicity:0,humor:0,creativity:0,helpfulness:4,correctness:4,coherence:4,complexity:4,verbosity:4

Where it goes (one place, for training and inference alike): the line
``<attributes>...</attributes>`` is the first line of the system turn. A chat
prompt (list of messages) gets it prepended to its system message, or a new
system message at the front when it has none; a plain-text prompt gets it as
its first line. The chat template then renders it wherever it puts the system
turn.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

# NeMo-Aligner's SteerLM attributes (OpenAssistant + HelpSteer), in its canonical order.
DEFAULT_ATTRIBUTES: tuple[str, ...] = (
    "quality",
    "toxicity",
    "humor",
    "creativity",
    "helpfulness",
    "correctness",
    "coherence",
    "complexity",
    "verbosity",
)
MIN_VALUE, MAX_VALUE = 0, 4
ATTRIBUTE_OPEN, ATTRIBUTE_CLOSE = "<attributes>", "</attributes>"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

Prompt = str | list[dict[str, str]]


def check_attribute_names(names: Sequence[str]) -> None:
    """``names`` must be a non-empty list of distinct identifiers.

    Raises:
        ValueError: a string instead of a list, an empty list, a name that is
            not an identifier, or a repeated name.
    """
    if isinstance(names, str) or not names:
        raise ValueError(f"attribute names must be a non-empty list of names, got {names!r}")
    bad = [name for name in names if not isinstance(name, str) or not _NAME.match(name)]
    if bad:
        raise ValueError(f"attribute names must be identifiers (letters, digits, '_'), got {bad}")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"attribute names are repeated: {duplicates}")


def _check_same_names(found: Sequence[str], names: Sequence[str], what: str) -> None:
    missing = [name for name in names if name not in found]
    unknown = [name for name in found if name not in names]
    if missing or unknown:
        raise ValueError(
            f"{what}: missing attribute(s) {missing}, unknown attribute(s) {unknown}; expected exactly {list(names)}"
        )


def attribute_value(value: float) -> int:
    """A score as an attribute value: clamped to ``[0, 4]``, then rounded half up.

    Raises:
        ValueError: ``value`` is not a finite number.
    """
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"attribute values must be finite numbers, got {value!r}")
    return math.floor(min(max(number, MIN_VALUE), MAX_VALUE) + 0.5)


def format_attributes(values: Mapping[str, float], names: Sequence[str] = DEFAULT_ATTRIBUTES) -> str:
    """The canonical attribute string: ``name:value`` for each of ``names`` in order, comma-joined.

    Values go through :func:`attribute_value` (clamped to ``0..4``, rounded half up).

    Args:
        values: a value for every name (ints, floats or 0-dim tensors).
        names: the attributes and their order.

    Returns:
        e.g. ``"helpfulness:4,correctness:3"``.

    Raises:
        ValueError: bad ``names``, ``values`` missing a name or holding an unknown
            one, a value that is not a finite number.
    """
    check_attribute_names(names)
    _check_same_names(list(values), names, "format_attributes")
    return ",".join(f"{name}:{attribute_value(values[name])}" for name in names)


def parse_attributes(text: str, names: Sequence[str] | None = DEFAULT_ATTRIBUTES) -> dict[str, int]:
    """The attribute values in a string written by :func:`format_attributes`.

    Strict: whitespace around items is allowed, anything else malformed is an
    error (values are integer literals in ``0..4``, no clamping here).

    Args:
        text: ``"name:value,name:value,..."``.
        names: the attributes it must hold, exactly (any order); None accepts any names.

    Returns:
        ``{name: value}`` in the order of ``names`` (of ``text`` when ``names`` is None).

    Raises:
        ValueError: an empty string, an item without exactly one ``:``, an empty
            or invalid name, a value that is not an integer in ``0..4``, a repeated
            name, or (with ``names``) a missing or unknown attribute; the message
            quotes the offending item.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"attribute string is empty; expected 'name:value,...', got {text!r}")
    parsed: dict[str, int] = {}
    for item in text.split(","):
        parts = item.split(":")
        if len(parts) != 2:
            raise ValueError(f"attribute item {item.strip()!r} in {text!r} is not 'name:value'")
        name, raw = parts[0].strip(), parts[1].strip()
        if not _NAME.match(name):
            raise ValueError(f"attribute item {item.strip()!r} in {text!r} has an invalid name {name!r}")
        if not re.fullmatch(r"[+-]?\d+", raw) or not MIN_VALUE <= int(raw) <= MAX_VALUE:
            raise ValueError(
                f"attribute {name!r} in {text!r} has value {raw!r}; expected an integer in {MIN_VALUE}..{MAX_VALUE}"
            )
        if name in parsed:
            raise ValueError(f"attribute {name!r} appears twice in {text!r}")
        parsed[name] = int(raw)
    if names is None:
        return parsed
    check_attribute_names(names)
    _check_same_names(list(parsed), names, f"parse_attributes({text!r})")
    return {name: parsed[name] for name in names}


def attribute_line(values: Mapping[str, float], names: Sequence[str] = DEFAULT_ATTRIBUTES) -> str:
    """``<attributes>`` + :func:`format_attributes` + ``</attributes>``: the line a prompt carries."""
    return f"{ATTRIBUTE_OPEN}{format_attributes(values, names)}{ATTRIBUTE_CLOSE}"


def conditioned_prompt(
    prompt: Prompt, attributes: Mapping[str, float], names: Sequence[str] = DEFAULT_ATTRIBUTES
) -> Prompt:
    """The prompt with its attribute line as the first line of the system turn.

    Args:
        prompt: plain text, or chat messages ``[{"role": ..., "content": ...}, ...]``.
        attributes: a value for every name (see :func:`format_attributes`).
        names: the attributes and their order.

    Returns:
        For text: ``"<attributes>...</attributes>\\n" + prompt``. For messages: a
        new list (the input is not modified) whose first message is the system
        turn, its content the attribute line, then a newline and the former
        system content when there was a system message.

    Raises:
        ValueError: see :func:`format_attributes`; messages that are not dicts
            with ``role`` and ``content``.
    """
    line = attribute_line(attributes, names)
    if isinstance(prompt, str):
        return f"{line}\n{prompt}"
    if not all(isinstance(message, Mapping) and {"role", "content"} <= set(message) for message in prompt):
        raise ValueError("a chat prompt must be a list of {'role': ..., 'content': ...} messages")
    messages = [dict(message) for message in prompt]
    if messages and messages[0]["role"] == "system":
        system = messages[0]["content"]
        messages[0]["content"] = f"{line}\n{system}" if system else line
        return messages
    return [{"role": "system", "content": line}, *messages]
