"""Dataset records: read jsonl files, lists of dicts or Hugging Face datasets into small dataclasses.

One record kind per training family (README.md's "Training recipes" table says which recipe
reads which):

============  =====================================================================
kind          accepted fields
============  =====================================================================
sft           ``{"input", "output"}`` (also TRL's ``{"prompt", "completion"}``);
              ``{"messages": [...]}`` (every assistant turn is trained);
              NeMo-Aligner's ``{"system", "conversations": [{"from", "value"}]}``
preference    ``{"prompt", "chosen", "rejected"}``; NeMo-Aligner's
              ``chosen_response`` / ``rejected_response``; optional
              ``chosen_reward`` / ``rejected_reward``; TRL's conversational form
              (``chosen`` / ``rejected`` as message lists, with the prompt turns
              inside them when ``prompt`` is absent)
regression    ``{"prompt", "response", "attributes": {name: number}}`` or the
              HelpSteer2 columns (helpfulness, correctness, ...) at top level
kto           ``{"prompt", "response" (or TRL's "completion"), "label": bool}``
rl_prompt     ``{"prompt", ...}``; every other field is kept in ``extra`` for the
              reward function
============  =====================================================================

A prompt is a string (one user turn) or a list of ``{"role", "content"}``
messages. Every error names where the bad row came from: ``data/train.jsonl:17:
missing field 'chosen'`` for files read line by line, ``dataset row 17: ...``
for in-memory rows and Hugging Face datasets.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

if TYPE_CHECKING:
    import datasets

RecordKind = Literal["sft", "preference", "regression", "kto", "rl_prompt"]
RECORD_KINDS: tuple[str, ...] = get_args(RecordKind)
ROLES = ("system", "user", "assistant")
# HelpSteer2 ships its labels as top-level columns; NeMo-Aligner's regression RM reads them so.
HELPSTEER2_ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")

Message = dict[str, str]


@dataclass(frozen=True)
class SFTRecord:
    """A conversation whose assistant turns are trained.

    Attributes:
        messages: ``{"role", "content"}`` turns; at least one is an assistant turn.
        origin: where the record came from (``file:line`` or ``dataset row i``), for error messages.
    """

    messages: list[Message]
    origin: str = ""


@dataclass(frozen=True)
class PreferenceRecord:
    """A prompt with a preferred and a dispreferred final assistant response.

    Attributes:
        prompt: the turns before the response (ends with a user or system turn).
        chosen: the preferred response text.
        rejected: the dispreferred response text.
        chosen_reward: optional scalar reward of ``chosen`` (RPO); set together with ``rejected_reward``.
        rejected_reward: optional scalar reward of ``rejected``.
        origin: where the record came from.
    """

    prompt: list[Message]
    chosen: str
    rejected: str
    chosen_reward: float | None = None
    rejected_reward: float | None = None
    origin: str = ""


@dataclass(frozen=True)
class RegressionRecord:
    """A prompt/response pair labelled with numeric attributes (multi-attribute RM, SteerLM).

    Attributes:
        prompt: the turns before the response.
        response: the assistant response text.
        attributes: attribute name -> value; attributes absent here are missing labels.
        origin: where the record came from.
    """

    prompt: list[Message]
    response: str
    attributes: dict[str, float]
    origin: str = ""


@dataclass(frozen=True)
class KTORecord:
    """A prompt/response pair labelled desirable or undesirable (KTO).

    Attributes:
        prompt: the turns before the response.
        response: the assistant response text.
        desirable: the ``label`` field.
        origin: where the record came from.
    """

    prompt: list[Message]
    response: str
    desirable: bool
    origin: str = ""


@dataclass(frozen=True)
class RLPromptRecord:
    """A prompt for online RL, with the extra fields its reward function needs.

    Attributes:
        prompt: the turns the policy answers.
        extra: every other field of the row (e.g. a reference answer), unchanged.
        origin: where the record came from.
    """

    prompt: list[Message]
    extra: dict[str, Any] = field(default_factory=dict)
    origin: str = ""


Record = SFTRecord | PreferenceRecord | RegressionRecord | KTORecord | RLPromptRecord


def read_records(
    source: str | Path | Sequence[Mapping[str, Any]] | datasets.Dataset,
    kind: RecordKind,
    *,
    reader: Literal["lines", "datasets"] = "lines",
    cache_dir: str | Path | None = None,
    split: str = "train",
) -> list[Record]:
    """Read every record of one kind from a file, a saved dataset, a list of dicts or a Hugging Face dataset.

    Args:
        source: a ``.jsonl`` / ``.json`` path, a ``.parquet`` file, a folder written by
            ``datasets``' ``save_to_disk`` (a ``Dataset``, or a ``DatasetDict`` read at
            ``split``), a Hugging Face hub dataset name (``owner/name``, read at ``split`` from
            the local ``datasets`` cache, never downloaded), a list of row dicts, or a ``datasets.Dataset``.
        kind: one of :data:`RECORD_KINDS`.
        reader: for a path, ``"lines"`` parses it line by line (errors name ``file:line``);
            ``"datasets"`` goes through ``datasets.load_dataset("json", ...)`` (errors name the row).
        cache_dir: the ``datasets`` cache: for ``reader="datasets"`` (a temporary folder when None)
            and for hub names (``datasets``' own cache, ``HF_DATASETS_CACHE``, when None).
        split: the split of a saved ``DatasetDict`` or a hub dataset.

    Raises:
        ValueError: an unknown kind or reader, a file of another format, or a malformed row (the message
            names file and line or row).
        FileNotFoundError: a path that does not exist, or a hub name not in the local cache.
        TypeError: a source of another type.
    """
    _check_kind(kind)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            return load_saved_dataset(path, kind, split=split)
        if not path.exists() and is_hub_name(str(source)):
            return load_cached_hub_dataset(str(source), kind, split=split, cache_dir=cache_dir)
        if not path.exists():
            raise FileNotFoundError(
                f"data file {path} does not exist (expected a .jsonl / .json / .parquet file or a folder written by "
                "datasets' save_to_disk)"
            )
        if path.suffix == ".parquet":
            return read_parquet(path, kind)
        if path.suffix not in (".jsonl", ".json"):
            raise ValueError(
                f"{path}: unknown data format {path.suffix or '(no extension)'!r}; expected .jsonl (one JSON object "
                "per line), .json, .parquet, or a folder written by datasets' save_to_disk"
            )
        if reader == "lines":
            return read_jsonl(source, kind)
        if reader == "datasets":
            return load_json_dataset(source, kind, cache_dir=cache_dir)
        raise ValueError(f"unknown reader {reader!r}; expected 'lines' or 'datasets'")
    if isinstance(source, Sequence):
        return read_rows(source, kind)
    import datasets

    if isinstance(source, datasets.Dataset):
        return read_rows(source, kind)
    raise TypeError(f"cannot read records from {type(source).__name__}; pass a path, a list of dicts or a Dataset")


def read_jsonl(path: str | Path, kind: RecordKind) -> list[Record]:
    """Parse a jsonl file, one JSON object per line; blank lines are skipped.

    Raises:
        ValueError: malformed JSON, a line that is not an object, or a bad row; the message starts
            with ``path:line:`` (1-based line number).
    """
    _check_kind(kind)
    parse = _PARSERS[kind]
    records: list[Record] = []
    with open(path, "rb") as lines:
        for line_number, raw in enumerate(lines, start=1):
            origin = f"{path}:{line_number}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{origin}: not valid UTF-8 ({error.reason})") from None
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as error:
                raise ValueError(f"{origin}: malformed JSON: {error.msg} (column {error.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{origin}: expected a JSON object, got {type(row).__name__}")
            records.append(parse(row, origin))
    if not records:
        raise ValueError(f"{path}: no records (the file is empty or holds only blank lines)")
    return records


def read_rows(rows: Iterable[Mapping[str, Any]], kind: RecordKind, *, name: str = "dataset") -> list[Record]:
    """Parse in-memory rows (a list of dicts or a ``datasets.Dataset``); errors name ``<name> row <i>``.

    A field set to None counts as missing, as Hugging Face datasets fill absent columns with None.

    Raises:
        ValueError: a bad row (0-based row index in the message).
    """
    _check_kind(kind)
    parse = _PARSERS[kind]
    records: list[Record] = []
    for index, row in enumerate(rows):
        origin = f"{name} row {index}"
        if not isinstance(row, Mapping):
            raise ValueError(f"{origin}: expected a mapping of fields, got {type(row).__name__}")
        records.append(parse(row, origin))
    return records


def read_parquet(path: str | Path, kind: RecordKind) -> list[Record]:
    """Read a parquet file's rows (columns as fields); errors name ``<path> row <i>`` (0-based).

    Raises:
        ValueError: not a parquet file, or a bad row.
    """
    import pyarrow
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(path)
    except (pyarrow.ArrowException, OSError) as error:
        raise ValueError(f"{path}: not a readable parquet file ({error})") from None
    records = read_rows(table.to_pylist(), kind, name=str(path))
    if not records:
        raise ValueError(f"{path}: no records (the table is empty)")
    return records


def load_saved_dataset(path: str | Path, kind: RecordKind, *, split: str = "train") -> list[Record]:
    """Read a folder written by ``datasets``' ``save_to_disk``; errors name ``<path>[/<split>] row <i>``.

    Raises:
        ValueError: the folder is not a saved dataset, or a ``DatasetDict`` without ``split``, or a bad row.
    """
    import datasets

    path = Path(path)
    if not any((path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
        raise ValueError(
            f"{path} is a folder but not a dataset saved with datasets' save_to_disk (no dataset_info.json, "
            "state.json or dataset_dict.json); give a .jsonl or .parquet file, or such a folder"
        )
    loaded = datasets.load_from_disk(str(path))
    name = str(path)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"{path} holds the splits {sorted(loaded)}, not {split!r}; set data.split")
        loaded, name = loaded[split], f"{path}/{split}"
    records = read_rows(loaded, kind, name=name)
    if not records:
        raise ValueError(f"{name}: no records (the dataset is empty)")
    return records


_HUB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")
_DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt", ".arrow")


def is_hub_name(source: str) -> bool:
    """Whether ``source`` reads as a hub dataset id (``name`` or ``owner/name``) rather than a file path."""
    return bool(_HUB_NAME.fullmatch(source)) and not source.lower().endswith(_DATA_SUFFIXES)


def load_cached_hub_dataset(
    name: str, kind: RecordKind, *, split: str = "train", cache_dir: str | Path | None = None
) -> list[Record]:
    """Read split ``split`` of hub dataset ``name`` from the local ``datasets`` cache; errors name ``name/split row i``.

    Offline by design: the hub is not contacted (runs never download), so the dataset
    must have been loaded once on a machine with access (``datasets.load_dataset(name)``),
    or its cache copied here. ``cache_dir`` is that cache (``HF_DATASETS_CACHE`` when None).

    Raises:
        FileNotFoundError: ``name`` is neither a file nor in the cache (the message says how to get it there).
        ValueError: the cached dataset has no split ``split``, or a bad row.
    """
    import datasets
    import datasets.config

    cache = Path(cache_dir or datasets.config.HF_DATASETS_CACHE).expanduser()
    was_offline = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True  # read the cache, never the network
    try:
        with _quiet_datasets():
            loaded = datasets.load_dataset(name, cache_dir=str(cache))
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError):
        raise FileNotFoundError(
            f"data source {name!r} is not a file, and no dataset of that name is in the datasets cache at {cache} "
            "(aligner does not download at run time): load it once where the hub is reachable "
            f"(python -c \"import datasets; datasets.load_dataset('{name}')\"), copy that cache here and set "
            "data.cache_dir (or HF_DATASETS_CACHE) to it, or save it as a .jsonl / .parquet / save_to_disk folder"
        ) from None
    finally:
        datasets.config.HF_HUB_OFFLINE = was_offline
    if split not in loaded:
        raise ValueError(f"{name} (cached at {cache}) holds the splits {sorted(loaded)}, not {split!r}; set data.split")
    records = read_rows(loaded[split], kind, name=f"{name}/{split}")
    if not records:
        raise ValueError(f"{name}/{split}: no records (the dataset is empty)")
    return records


@contextlib.contextmanager
def _quiet_datasets():
    """``datasets``' "using the latest cached version" warning and progress bars off for one call."""
    import datasets

    verbosity = datasets.logging.get_verbosity()
    bars = datasets.utils.are_progress_bars_disabled()
    datasets.logging.set_verbosity_error()
    datasets.utils.disable_progress_bars()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if not bars:
            datasets.utils.enable_progress_bars()


def load_json_dataset(path: str | Path, kind: RecordKind, *, cache_dir: str | Path | None = None) -> list[Record]:
    """Read a json/jsonl file through ``datasets.load_dataset("json", data_files=path)``.

    Works offline: the json builder ships with ``datasets``. Errors name ``<path> row <i>`` (0-based).
    Without ``cache_dir`` the Arrow cache goes to a temporary folder removed when the
    process exits, so nothing is left in ``~/.cache`` unless asked.

    Raises:
        ValueError: a bad row.
    """
    import atexit
    import shutil
    import tempfile

    import datasets

    if cache_dir is None:
        cache_dir = tempfile.mkdtemp(prefix="aligner-datasets-")
        atexit.register(shutil.rmtree, cache_dir, True)
    dataset = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(cache_dir))
    return read_rows(dataset, kind, name=str(path))


def _check_kind(kind: str) -> None:
    if kind not in RECORD_KINDS:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {', '.join(RECORD_KINDS)}")


def _get(row: Mapping[str, Any], names: tuple[str, ...]) -> Any:
    """The value of the first of ``names`` present (and not None) in ``row``, else None."""
    for name in names:
        value = row.get(name)
        if value is not None:
            return value
    return None


def _missing(names: tuple[str, ...], origin: str) -> ValueError:
    alternatives = " or ".join(f"'{name}'" for name in names)
    return ValueError(f"{origin}: missing field {alternatives}")


def _require(row: Mapping[str, Any], names: tuple[str, ...], origin: str) -> Any:
    value = _get(row, names)
    if value is None:
        raise _missing(names, origin)
    return value


def _describe_value(value: Any) -> str:
    """What a JSON value is, for messages: ``a number (3)``, ``null``, ``an object``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, str):
        return "a string"
    return "an empty list" if isinstance(value, Sequence) and not value else type(value).__name__


def _messages(value: Any, name: str, origin: str) -> list[Message]:
    """Validate a list of ``{"role", "content"}`` dicts and copy it into plain dicts."""
    if isinstance(value, str):
        raise ValueError(f"{origin}: field '{name}' must be a non-empty list of messages, got a string")
    if not isinstance(value, Sequence) or not value:
        raise ValueError(
            f"{origin}: field '{name}' must be text or a non-empty list of messages, got {_describe_value(value)}"
        )
    messages: list[Message] = []
    for position, message in enumerate(value):
        where = f"{origin}: {name}[{position}]"
        if not isinstance(message, Mapping):
            raise ValueError(f"{where} must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"{where} has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"{where} must have a string 'content'")
        messages.append({"role": role, "content": content})
    return messages


def _prompt(value: Any, name: str, origin: str) -> list[Message]:
    """A string prompt becomes one user turn; a message list must not end with an assistant turn."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    messages = _messages(value, name, origin)
    if messages[-1]["role"] == "assistant":
        raise ValueError(f"{origin}: field '{name}' ends with an assistant turn; a prompt ends with a user turn")
    return messages


def _response_text(value: Any, name: str, origin: str) -> str:
    """A response given as a string or as TRL's one-message list ``[{"role": "assistant", ...}]``."""
    if isinstance(value, str):
        text = value
    else:
        messages = _messages(value, name, origin)
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            raise ValueError(f"{origin}: field '{name}' as a message list must hold exactly one assistant turn")
        text = messages[0]["content"]
    if not text.strip():
        raise ValueError(f"{origin}: empty response in field '{name}'")
    return text


def _number(value: Any, name: str, origin: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{origin}: field '{name}' must be a number, got {value!r}")
    return float(value)


def _parse_sft(row: Mapping[str, Any], origin: str) -> SFTRecord:
    if row.get("messages") is not None:
        messages = _messages(row["messages"], "messages", origin)
    elif row.get("conversations") is not None:
        messages = _nemo_conversation(row, origin)
    elif _get(row, ("input", "prompt")) is None and isinstance(row.get("text"), str):
        raise ValueError(
            f'{origin}: TRL\'s language-modeling format ({{"text": ...}}) has no prompt / response split, and SFT '
            'trains responses: convert each row to {"input": prompt, "output": response} or {"messages": [...]}'
        )
    else:
        prompt = _prompt(_require(row, ("input", "prompt"), origin), "input", origin)
        output = _response_text(_require(row, ("output", "completion"), origin), "output", origin)
        messages = [*prompt, {"role": "assistant", "content": output}]
    if not any(message["role"] == "assistant" for message in messages):
        raise ValueError(f"{origin}: the conversation has no assistant turn to train on")
    for position, message in enumerate(messages):
        if message["role"] == "assistant" and not message["content"].strip():
            raise ValueError(f"{origin}: empty response in assistant turn {position}")
    return SFTRecord(messages=messages, origin=origin)


def _nemo_conversation(row: Mapping[str, Any], origin: str) -> list[Message]:
    """NeMo-Aligner's ``{"system": str, "conversations": [{"from": "User", "value": str}, ...]}``."""
    turns = row["conversations"]
    if not isinstance(turns, Sequence) or isinstance(turns, str) or not turns:
        raise ValueError(f"{origin}: field 'conversations' must be a non-empty list of turns")
    messages: list[Message] = []
    system = row.get("system")
    if system:
        messages.append({"role": "system", "content": _text(system, "system", origin)})
    for position, turn in enumerate(turns):
        # NeMo-Aligner names speakers "User" / "Assistant"; roles are their lower-case forms.
        speaker = str(turn.get("from", "")).lower() if isinstance(turn, Mapping) else ""
        if speaker not in ROLES or not isinstance(turn.get("value"), str):
            raise ValueError(f"{origin}: conversations[{position}] must have 'from' (User/Assistant) and 'value'")
        messages.append({"role": speaker, "content": turn["value"]})
    return messages


def _text(value: Any, name: str, origin: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{origin}: field '{name}' must be a string, got {_describe_value(value)}")
    return value


def _parse_preference(row: Mapping[str, Any], origin: str) -> PreferenceRecord:
    chosen_names, rejected_names = ("chosen", "chosen_response"), ("rejected", "rejected_response")
    chosen, rejected = _require(row, chosen_names, origin), _require(row, rejected_names, origin)
    if row.get("prompt") is not None:
        prompt = _prompt(row["prompt"], "prompt", origin)
    elif isinstance(chosen, str) and isinstance(rejected, str) and _HH_ASSISTANT in chosen:
        prompt, chosen, rejected = _split_hh_transcripts(chosen, rejected, origin)
    elif isinstance(chosen, str) or isinstance(rejected, str):
        raise ValueError(
            f"{origin}: missing field 'prompt': 'chosen' and 'rejected' are plain text, so the prompt cannot be "
            "split off (give a 'prompt' field, Anthropic-HH transcripts with '\\n\\nHuman:' / '\\n\\nAssistant:' "
            "turns, or TRL's conversational lists)"
        )
    else:
        prompt, chosen, rejected = _split_implicit_prompt(chosen, rejected, origin)
    rewards = [_get(row, ("chosen_reward",)), _get(row, ("rejected_reward",))]
    if (rewards[0] is None) != (rewards[1] is None):
        raise ValueError(f"{origin}: 'chosen_reward' and 'rejected_reward' must be given together")
    return PreferenceRecord(
        prompt=prompt,
        chosen=_response_text(chosen, "chosen", origin),
        rejected=_response_text(rejected, "rejected", origin),
        chosen_reward=None if rewards[0] is None else _number(rewards[0], "chosen_reward", origin),
        rejected_reward=None if rewards[1] is None else _number(rewards[1], "rejected_reward", origin),
        origin=origin,
    )


_HH_ASSISTANT = "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


def _hh_turns(text: str, name: str, origin: str) -> list[Message]:
    """An Anthropic-HH transcript (``\\n\\nHuman: ...\\n\\nAssistant: ...``) as messages."""
    pieces = _HH_TURN.split(text)
    if pieces[0].strip() or len(pieces) < 3:
        raise ValueError(
            f"{origin}: field '{name}' is not an Anthropic-HH transcript: it must start with '\\n\\nHuman:' and "
            "alternate '\\n\\nHuman:' / '\\n\\nAssistant:' turns"
        )
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[role], "content": content} for role, content in zip(pieces[1::2], pieces[2::2], strict=True)]


def _split_hh_transcripts(chosen: str, rejected: str, origin: str) -> tuple[list[Message], Any, Any]:
    """Anthropic-HH's ``chosen`` / ``rejected`` transcripts: shared turns, then one final assistant turn each."""
    chosen_turns, rejected_turns = _hh_turns(chosen, "chosen", origin), _hh_turns(rejected, "rejected", origin)
    prompt = chosen_turns[:-1]
    if chosen_turns[-1]["role"] != "assistant" or rejected_turns[-1]["role"] != "assistant":
        raise ValueError(f"{origin}: an Anthropic-HH transcript must end with an Assistant turn")
    if not prompt or rejected_turns[:-1] != prompt:
        raise ValueError(
            f"{origin}: the Anthropic-HH 'chosen' and 'rejected' transcripts must share every turn but the last"
        )
    return prompt, chosen_turns[-1]["content"], rejected_turns[-1]["content"]


def _split_implicit_prompt(chosen: Any, rejected: Any, origin: str) -> tuple[list[Message], Any, Any]:
    """TRL's implicit prompt: ``chosen`` and ``rejected`` are full conversations sharing every turn but the last."""
    chosen_messages = _messages(chosen, "chosen", origin)
    rejected_messages = _messages(rejected, "rejected", origin)
    prompt = chosen_messages[:-1]
    if not prompt or rejected_messages[:-1] != prompt:
        raise ValueError(
            f"{origin}: without a 'prompt' field, 'chosen' and 'rejected' must be conversations that share "
            "their prompt turns and differ only in the final assistant turn"
        )
    if prompt[-1]["role"] == "assistant":
        raise ValueError(f"{origin}: the shared prompt turns end with an assistant turn")
    return prompt, chosen_messages[-1:], rejected_messages[-1:]


def _parse_regression(row: Mapping[str, Any], origin: str) -> RegressionRecord:
    prompt = _prompt(_require(row, ("prompt",), origin), "prompt", origin)
    response = _response_text(_require(row, ("response",), origin), "response", origin)
    labels = row.get("attributes")
    if labels is None:
        labels = {name: row[name] for name in HELPSTEER2_ATTRIBUTES if row.get(name) is not None}
        if not labels:
            raise ValueError(
                f"{origin}: missing field 'attributes' (or HelpSteer2 columns {', '.join(HELPSTEER2_ATTRIBUTES)})"
            )
    elif not isinstance(labels, Mapping):
        raise ValueError(f"{origin}: field 'attributes' must be an object of name -> number")
    attributes = {
        str(name): _number(value, f"attributes.{name}", origin) for name, value in labels.items() if value is not None
    }
    return RegressionRecord(prompt=prompt, response=response, attributes=attributes, origin=origin)


def _parse_kto(row: Mapping[str, Any], origin: str) -> KTORecord:
    prompt = _prompt(_require(row, ("prompt",), origin), "prompt", origin)
    response = _response_text(_require(row, ("response", "completion"), origin), "response", origin)
    label = _require(row, ("label",), origin)
    if not isinstance(label, bool):
        raise ValueError(f"{origin}: field 'label' must be true or false, got {label!r}")
    return KTORecord(prompt=prompt, response=response, desirable=label, origin=origin)


def _parse_rl_prompt(row: Mapping[str, Any], origin: str) -> RLPromptRecord:
    prompt = _prompt(_require(row, ("prompt",), origin), "prompt", origin)
    extra = {name: value for name, value in row.items() if name != "prompt"}
    return RLPromptRecord(prompt=prompt, extra=extra, origin=origin)


_PARSERS = {
    "sft": _parse_sft,
    "preference": _parse_preference,
    "regression": _parse_regression,
    "kto": _parse_kto,
    "rl_prompt": _parse_rl_prompt,
}
