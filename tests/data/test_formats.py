"""Record formats: every accepted field layout and alias, and errors that name file and line or row."""

import json
import re
from pathlib import Path

import datasets
import pytest

from aligner.data.formats import (
    KTORecord,
    PreferenceRecord,
    RegressionRecord,
    RLPromptRecord,
    SFTRecord,
    load_json_dataset,
    read_jsonl,
    read_records,
    read_rows,
)

USER = {"role": "user", "content": "What is 1 + 2?"}


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def one(row: dict, kind: str):
    (record,) = read_rows([row], kind)
    return record


# --- sft ---------------------------------------------------------------------------------------------


def test_sft_input_output():
    record = one({"input": "What is 1 + 2?", "output": "3"}, "sft")
    assert record == SFTRecord(messages=[USER, {"role": "assistant", "content": "3"}], origin="dataset row 0")


def test_sft_prompt_completion_alias():
    record = one({"prompt": "What is 1 + 2?", "completion": "3"}, "sft")
    assert record.messages == [USER, {"role": "assistant", "content": "3"}]


def test_sft_messages_multi_turn():
    messages = [
        {"role": "system", "content": "Be brief."},
        USER,
        {"role": "assistant", "content": "3"},
        {"role": "user", "content": "And 2 + 2?"},
        {"role": "assistant", "content": "4"},
    ]
    assert one({"messages": messages}, "sft").messages == messages


def test_sft_nemo_conversations():
    row = {
        "system": "Be brief.",
        "conversations": [{"from": "User", "value": "What is 1 + 2?"}, {"from": "Assistant", "value": "3"}],
        "mask": "User",
    }
    assert one(row, "sft").messages == [
        {"role": "system", "content": "Be brief."},
        USER,
        {"role": "assistant", "content": "3"},
    ]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"messages": [USER]}, "no assistant turn"),
        ({"messages": [USER, {"role": "assistant", "content": " "}]}, "empty response in assistant turn 1"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0] has role 'robot'"),
        ({"input": "q", "output": ""}, "empty response in field 'output'"),
        ({"input": "q"}, "missing field 'output' or 'completion'"),
    ],
)
def test_sft_errors(row, message):
    with pytest.raises(ValueError, match=rf"^dataset row 0: .*{re.escape(message)}"):
        one(row, "sft")


# --- preference --------------------------------------------------------------------------------------


def test_preference_plain_with_rewards():
    row = {"prompt": "What is 1 + 2?", "chosen": "3", "rejected": "4", "chosen_reward": 1, "rejected_reward": 0.5}
    assert one(row, "preference") == PreferenceRecord(
        prompt=[USER], chosen="3", rejected="4", chosen_reward=1.0, rejected_reward=0.5, origin="dataset row 0"
    )


def test_preference_nemo_aliases():
    record = one({"prompt": "What is 1 + 2?", "chosen_response": "3", "rejected_response": "4"}, "preference")
    assert (record.prompt, record.chosen, record.rejected, record.chosen_reward) == ([USER], "3", "4", None)


def test_preference_trl_implicit_prompt():
    row = {
        "chosen": [USER, {"role": "assistant", "content": "3"}],
        "rejected": [USER, {"role": "assistant", "content": "4"}],
    }
    record = one(row, "preference")
    assert (record.prompt, record.chosen, record.rejected) == ([USER], "3", "4")


def test_preference_trl_explicit_prompt_messages():
    row = {
        "prompt": [{"role": "system", "content": "Be brief."}, USER],
        "chosen": [{"role": "assistant", "content": "3"}],
        "rejected": [{"role": "assistant", "content": "4"}],
    }
    record = one(row, "preference")
    assert record.prompt == [{"role": "system", "content": "Be brief."}, USER]
    assert (record.chosen, record.rejected) == ("3", "4")


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "q", "rejected": "4"}, "missing field 'chosen' or 'chosen_response'"),
        ({"chosen": "3", "rejected": "4"}, "missing field 'prompt'"),
        ({"prompt": "q", "chosen": "", "rejected": "4"}, "empty response in field 'chosen'"),
        ({"prompt": "q", "chosen": "3", "rejected": "4", "chosen_reward": 1}, "must be given together"),
        ({"prompt": "q", "chosen": "3", "rejected": "4", "chosen_reward": "a", "rejected_reward": 0}, "a number"),
        (
            {
                "chosen": [USER, {"role": "assistant", "content": "3"}],
                "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "4"}],
            },
            "share their prompt turns",
        ),
        ({"prompt": [USER, {"role": "assistant", "content": "3"}], "chosen": "3", "rejected": "4"}, "ends with an"),
    ],
)
def test_preference_errors(row, message):
    with pytest.raises(ValueError, match=rf"^dataset row 0: .*{re.escape(message)}"):
        one(row, "preference")


# --- regression --------------------------------------------------------------------------------------


def test_regression_attributes_dict():
    row = {"prompt": "What is 1 + 2?", "response": "3", "attributes": {"helpfulness": 3, "verbosity": 0}}
    assert one(row, "regression") == RegressionRecord(
        prompt=[USER], response="3", attributes={"helpfulness": 3.0, "verbosity": 0.0}, origin="dataset row 0"
    )


def test_regression_helpsteer2_columns():
    row = {"prompt": "What is 1 + 2?", "response": "3", "helpfulness": 4, "correctness": 4, "coherence": 4}
    row.update({"complexity": 1, "verbosity": None})  # None: a missing label, as datasets fills absent columns
    assert one(row, "regression").attributes == {
        "helpfulness": 4.0,
        "correctness": 4.0,
        "coherence": 4.0,
        "complexity": 1.0,
    }


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "q", "response": "3"}, "missing field 'attributes'"),
        ({"prompt": "q", "response": "3", "attributes": {"helpfulness": "high"}}, "must be a number"),
        ({"prompt": "q", "response": "", "helpfulness": 1}, "empty response"),
    ],
)
def test_regression_errors(row, message):
    with pytest.raises(ValueError, match=rf"^dataset row 0: .*{re.escape(message)}"):
        one(row, "regression")


# --- kto / rl_prompt ---------------------------------------------------------------------------------


def test_kto_response_and_trl_completion():
    assert one({"prompt": "What is 1 + 2?", "response": "3", "label": True}, "kto") == KTORecord(
        prompt=[USER], response="3", desirable=True, origin="dataset row 0"
    )
    row = {"prompt": [USER], "completion": [{"role": "assistant", "content": "4"}], "label": False}
    record = one(row, "kto")
    assert (record.response, record.desirable) == ("4", False)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "q", "response": "3", "label": 1}, "'label' must be true or false"),
        ({"prompt": "q", "response": "3"}, "missing field 'label'"),
        ({"prompt": "q", "response": "  ", "label": True}, "empty response"),
    ],
)
def test_kto_errors(row, message):
    with pytest.raises(ValueError, match=rf"^dataset row 0: .*{re.escape(message)}"):
        one(row, "kto")


def test_rl_prompt_keeps_extra_fields():
    record = one({"prompt": "What is 1 + 2?", "answer": 3, "source": "synthetic"}, "rl_prompt")
    assert record == RLPromptRecord(prompt=[USER], extra={"answer": 3, "source": "synthetic"}, origin="dataset row 0")


# --- sources and error locations ---------------------------------------------------------------------


def test_jsonl_errors_name_file_and_line(tmp_path: Path):
    good = json.dumps({"prompt": "q", "chosen": "3", "rejected": "4"})
    lines = [good] * 16 + [json.dumps({"prompt": "q", "rejected": "4"})]
    path = write_lines(tmp_path / "train.jsonl", lines)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:17: missing field 'chosen'"):
        read_jsonl(path, "preference")

    path = write_lines(tmp_path / "bad.jsonl", [good, '{"prompt": "q", "chosen": '])
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:2: malformed JSON"):
        read_jsonl(path, "preference")

    path = write_lines(tmp_path / "list.jsonl", ["[1, 2]"])
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:1: expected a JSON object, got list"):
        read_jsonl(path, "preference")

    sft_rows = [json.dumps({"input": "q", "output": "a"}), json.dumps({"input": "q", "output": ""})]
    path = write_lines(tmp_path / "empty.jsonl", sft_rows)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:2: empty response in field 'output'"):
        read_jsonl(path, "sft")


def test_jsonl_skips_blank_lines_but_keeps_numbering(tmp_path: Path):
    row = json.dumps({"input": "q", "output": "a"})
    path = write_lines(tmp_path / "train.jsonl", [row, "", "   ", row])
    records = read_jsonl(path, "sft")
    assert [record.origin for record in records] == [f"{path}:1", f"{path}:4"]


def test_hf_dataset_errors_name_the_row():
    dataset = datasets.Dataset.from_list(
        [{"prompt": "q", "response": "a", "label": True}, {"prompt": "q", "response": "", "label": False}]
    )
    with pytest.raises(ValueError, match=r"^dataset row 1: empty response"):
        read_records(dataset, "kto")
    records = read_records(dataset.select([0]), "kto")
    assert records == [
        KTORecord(prompt=[{"role": "user", "content": "q"}], response="a", desirable=True, origin="dataset row 0")
    ]


def test_load_dataset_json_matches_line_reader(tmp_path: Path):
    rows = [
        {"prompt": "What is 1 + 2?", "chosen": "3", "rejected": "4"},
        {
            "prompt": "What is 2 + 2?",
            "chosen_response": "4",
            "rejected_response": "5",
            "chosen_reward": 1.0,
            "rejected_reward": 0.0,
        },
    ]
    path = write_lines(tmp_path / "train.jsonl", [json.dumps(row) for row in rows])
    by_lines = read_records(path, "preference")
    by_datasets = read_records(path, "preference", reader="datasets", cache_dir=tmp_path / "cache")
    assert [record.origin for record in by_datasets] == [f"{path} row 0", f"{path} row 1"]

    def fields(record: PreferenceRecord) -> tuple:
        return record.prompt, record.chosen, record.rejected, record.chosen_reward, record.rejected_reward

    assert [fields(record) for record in by_lines] == [fields(record) for record in by_datasets]

    broken = write_lines(tmp_path / "broken.jsonl", [json.dumps(rows[0]), json.dumps({"prompt": "q"})])
    with pytest.raises(ValueError, match=rf"^{re.escape(str(broken))} row 1: missing field 'chosen'"):
        load_json_dataset(broken, "preference", cache_dir=tmp_path / "cache")


def test_bad_kind_reader_and_source(tmp_path: Path):
    with pytest.raises(ValueError, match="unknown record kind 'dpo'"):
        read_records([], "dpo")
    existing = write_lines(tmp_path / "x.jsonl", ['{"input": "a", "output": "b"}'])
    with pytest.raises(ValueError, match="unknown reader"):
        read_records(existing, "sft", reader="pandas")
    with pytest.raises(TypeError, match="cannot read records from int"):
        read_records(3, "sft")


# ------------------------------------------------------------------ errors that help (fail before, pass now)


def test_an_empty_file_names_the_file(tmp_path):
    for lines in ([], ["", "   "]):
        path = write_lines(tmp_path / "empty.jsonl", lines)
        with pytest.raises(ValueError, match=re.escape(f"{path}: no records")):
            read_records(path, "sft")


@pytest.mark.parametrize(
    "row, message",
    [
        (
            {"prompt": 3, "chosen": "a", "rejected": "b"},
            "field 'prompt' must be text or a non-empty list of messages, got a number (3)",
        ),
        (
            {"prompt": "p", "chosen": 4.5, "rejected": "b"},
            "field 'chosen' must be text or a non-empty list of messages, got a number (4.5)",
        ),
        ({"prompt": "p", "chosen": "a", "rejected": ["x"]}, "must be an object with"),
        ({"prompt": {"x": 1}, "chosen": "a", "rejected": "b"}, "got an object"),
    ],
)
def test_a_value_of_the_wrong_type_says_what_it_is(row, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        one(row, "preference")


def test_a_pair_whose_chosen_equals_rejected_is_dropped_and_counted(tokenizer):
    from aligner.data import EncodedDataset

    rows = [
        {"prompt": "1+1", "chosen": "2", "rejected": "3"},
        {"prompt": "2+2", "chosen": "4", "rejected": "4"},
        {"prompt": "3+3", "chosen": "6", "rejected": "7"},
    ]
    dataset = EncodedDataset(read_records(rows, "preference"), tokenizer, max_length=64)
    assert len(dataset) == 2
    assert dataset.report.identical_pairs == 1
    assert "1 pairs whose chosen equals rejected dropped (first: dataset row 1)" in str(dataset.report)
    assert str(dataset.report).startswith("kept 2 of 3 records")


def test_too_little_data_names_a_real_config_key():
    from aligner.data import GlobalBatchSampler

    with pytest.raises(ValueError, match=r"lower trainer\.global_batch_size"):
        GlobalBatchSampler(3, global_batch_size=4, micro_batch_size=2, seed=0)


# ------------------------------------------------------------------ data a user already has


PAIRS = [
    {"prompt": "1+1", "chosen": "2", "rejected": "3"},
    {"prompt": "2+2", "chosen": "4", "rejected": "5"},
]


def test_parquet_and_saved_datasets_load(tmp_path):
    import pyarrow
    import pyarrow.parquet

    parquet = tmp_path / "pairs.parquet"
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(PAIRS), parquet)
    assert [r.chosen for r in read_records(parquet, "preference")] == ["2", "4"]

    saved = tmp_path / "saved"
    datasets.Dataset.from_list(PAIRS).save_to_disk(str(saved))
    assert [r.rejected for r in read_records(saved, "preference")] == ["3", "5"]

    splits = tmp_path / "splits"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(PAIRS), "test": datasets.Dataset.from_list(PAIRS[:1])}
    ).save_to_disk(str(splits))
    assert len(read_records(splits, "preference", split="test")) == 1
    with pytest.raises(ValueError, match=r"holds the splits \['test', 'train'\], not 'validation'; set data.split"):
        read_records(splits, "preference", split="validation")

    bad = tmp_path / "bad.parquet"
    datasets.Dataset.from_list([{"prompt": "p", "chosen": 7, "rejected": "b"}]).to_parquet(str(bad))
    with pytest.raises(ValueError, match=re.escape(f"{bad} row 0: field 'chosen'")):
        read_records(bad, "preference")


def _cache_as_hub_dataset(cache: Path, name: str, splits: dict[str, list[dict]], work: Path) -> None:
    """Write ``splits`` into ``cache`` where ``datasets.load_dataset(name)`` leaves a hub dataset it fetched.

    That is ``<owner>___<name>/<config>/<version>/<commit>/`` holding the Arrow files and
    ``dataset_info.json`` of the packaged builder (json here) that read the repository's files.
    """
    import shutil

    from datasets.packaged_modules.json.json import Json

    files = {}
    for split, rows in splits.items():
        files[split] = str(write_lines(work / f"{split}.jsonl", [json.dumps(row) for row in rows]))
    builder = Json(data_files=files, cache_dir=str(work / "build"), dataset_name=name.split("/")[-1])
    builder.download_and_prepare()
    target = cache / name.replace("/", "___") / "default" / "0.0.0" / "0123456789abcdef0123456789abcdef01234567"
    target.parent.mkdir(parents=True)
    shutil.move(builder.cache_dir, target)


def test_hub_dataset_names_read_from_the_local_cache_only(tmp_path):
    import datasets.config

    offline = datasets.config.HF_HUB_OFFLINE
    cache = tmp_path / "hf-datasets"
    _cache_as_hub_dataset(cache, "someone/tiny-prefs", {"train": PAIRS, "test": PAIRS[:1]}, tmp_path)
    train = read_records("someone/tiny-prefs", "preference", cache_dir=cache)
    assert [(r.chosen, r.rejected) for r in train] == [("2", "3"), ("4", "5")]
    assert len(read_records("someone/tiny-prefs", "preference", split="test", cache_dir=cache)) == 1
    with pytest.raises(ValueError, match=r"someone/tiny-prefs \(cached at .*\) holds the splits \['test', 'train'\], "):
        read_records("someone/tiny-prefs", "preference", split="validation", cache_dir=cache)
    # not cached: an error that says the run never downloads and how to get the data there
    with pytest.raises(
        FileNotFoundError, match=r"'someone/elsewhere' is not a file, and no dataset .* does not download"
    ):
        read_records("someone/elsewhere", "preference", cache_dir=cache)
    # a file name that does not exist stays a missing file, not a hub name
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_records("pairs.jsonl", "preference", cache_dir=cache)
    assert offline == datasets.config.HF_HUB_OFFLINE  # the offline switch is the caller's again


def test_train_and_val_read_their_own_splits_of_one_hub_dataset(tmp_path, tokenizer_dir):
    from aligner.config import DataConfig, ModelSourceConfig
    from aligner.data.splits import load_splits

    cache = tmp_path / "hf-datasets"
    rows = [{"prompt": f"{i}+1", "chosen": str(i + 1), "rejected": str(i + 2)} for i in range(5)]
    _cache_as_hub_dataset(cache, "someone/prefs", {"train": rows[:4], "test": rows[4:]}, tmp_path)
    data = DataConfig(
        train="someone/prefs", val="someone/prefs", val_split="test", cache_dir=str(cache), tokenizer=str(tokenizer_dir)
    )
    _, train, val = load_splits(ModelSourceConfig(), data, "preference")
    assert (len(train), len(val)) == (4, 1)
    assert (data.split_for("train"), data.split_for("val")) == ("train", "test")


def test_a_wrong_format_names_the_path_and_what_was_expected(tmp_path):
    csv = tmp_path / "pairs.csv"
    csv.write_text("prompt,chosen,rejected\n")
    with pytest.raises(ValueError, match=re.escape(f"{csv}: unknown data format '.csv'; expected .jsonl")):
        read_records(csv, "preference")
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(ValueError, match="not a dataset saved with datasets' save_to_disk"):
        read_records(folder, "preference")
    with pytest.raises(FileNotFoundError, match=re.escape(f"data file {tmp_path / 'nope.jsonl'} does not exist")):
        read_records(tmp_path / "nope.jsonl", "preference")
    fake = tmp_path / "fake.parquet"
    fake.write_text("not parquet")
    with pytest.raises(ValueError, match="not a readable parquet file"):
        read_records(fake, "preference")


def test_anthropic_hh_transcripts_split_into_prompt_and_responses():
    shared = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: what is 2 + 2?"
    record = one({"chosen": shared + "\n\nAssistant: 4", "rejected": shared + "\n\nAssistant: 5"}, "preference")
    assert record.prompt == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "what is 2 + 2?"},
    ]
    assert (record.chosen, record.rejected) == ("4", "5")
    with pytest.raises(ValueError, match="must share every turn but the last"):
        one({"chosen": shared + "\n\nAssistant: 4", "rejected": "\n\nHuman: other\n\nAssistant: 5"}, "preference")


def test_formats_that_cannot_load_say_how_to_convert():
    with pytest.raises(ValueError, match=r"TRL's language-modeling format .* convert each row to \{\"input\""):
        one({"text": "a whole document"}, "sft")
    with pytest.raises(ValueError, match="missing field 'prompt': 'chosen' and 'rejected' are plain text"):
        one({"chosen": "a", "rejected": "b"}, "preference")


def test_the_datasets_reader_names_the_row_and_leaves_no_cache_behind(tmp_path, monkeypatch):
    import subprocess
    import sys

    path = write_lines(tmp_path / "pairs.jsonl", [json.dumps(PAIRS[0]), json.dumps({"prompt": "p", "chosen": "c"})])
    with pytest.raises(ValueError, match=re.escape(f"{path} row 1: missing field 'rejected'")):
        read_records(path, "preference", reader="datasets", cache_dir=tmp_path / "cache")
    home = tmp_path / "home"
    ok = write_lines(tmp_path / "ok.jsonl", [json.dumps(pair) for pair in PAIRS])
    script = f"from aligner.data.formats import read_records as r; r({str(ok)!r}, 'preference', reader='datasets')"
    env = {
        **__import__("os").environ,
        "HOME": str(home),
        "HF_HOME": str(home / "hf"),
        "XDG_CACHE_HOME": str(home / "cache"),
    }
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=120)
    left = [p for p in home.rglob("*") if p.is_file()] if home.exists() else []
    assert not [p for p in left if "datasets" in str(p) and p.suffix == ".arrow"], left
