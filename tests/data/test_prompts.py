"""RL prompts: loading with extra fields, tokenizing as SFT prompts, over-length prompts, grouped resumable steps."""

import json
from pathlib import Path

import pytest

from aligner.config import DataConfig
from aligner.data.encode import encode_records, make_encoder
from aligner.data.formats import read_rows
from aligner.data.prompts import PromptDataset, PromptLoader, load_prompts, repeat_each
from aligner.data.synthetic import all_problems, rl_prompt_rows

CHAT = [
    {"role": "system", "content": "Answer the question."},
    {"role": "user", "content": "What is 2 + 2?"},
]
ROWS = [
    {"prompt": "What is 1 + 2?", "answer": 3, "source": "synthetic"},
    {"prompt": CHAT, "answer": 4, "tags": ["chat"]},
    {"prompt": "What is 5 + 5?", "answer": 10},
]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def data_config(path: Path, tokenizer_dir: Path, **options) -> DataConfig:
    return DataConfig(train=str(path), tokenizer=str(tokenizer_dir), **options)


def sft_prompt_ids(tokenizer, prompt, **encoder_options) -> list[int]:
    """The prompt part of the SFT encoding of ``prompt`` with a response (the reference for RL prompts)."""
    row = {"messages": [*prompt, {"role": "assistant", "content": "The answer is 4."}]}
    ((example,), _) = encode_records(
        read_rows([row], "sft"), tokenizer, max_length=256, encoder=make_encoder(tokenizer, **encoder_options)
    )
    return example.sequence.input_ids[: example.sequence.prompt_length]


def test_prompts_load_with_their_extra_fields(tmp_path, tokenizer, tokenizer_dir):
    path = write_jsonl(tmp_path / "prompts.jsonl", ROWS)
    dataset = load_prompts(path, tokenizer, data_config(path, tokenizer_dir))
    assert len(dataset) == 3 and dataset.report.kept == 3
    assert [example.extra for example in dataset] == [
        {"answer": 3, "source": "synthetic"},
        {"answer": 4, "tags": ["chat"]},
        {"answer": 10},
    ]
    assert [record.prompt for record in dataset.records] == [
        [{"role": "user", "content": "What is 1 + 2?"}],
        CHAT,
        [{"role": "user", "content": "What is 5 + 5?"}],
    ]
    assert [example.index for example in dataset] == [0, 1, 2]
    assert [example.origin for example in dataset] == [f"{path}:{line}" for line in (1, 2, 3)]


@pytest.mark.parametrize(
    "encoder_options",
    [{}, {"chat_template": False}, {"chat_template": False, "prompt_template": "Q: {prompt}\nA:"}],
    ids=["chat_template", "plain_text", "prompt_template"],
)
def test_prompts_are_tokenized_as_the_sft_path_tokenizes_its_prompts(
    tmp_path, tokenizer, tokenizer_dir, encoder_options
):
    rows = [{"prompt": "What is 1 + 2?"}, {"prompt": [CHAT[1]]}, {"prompt": CHAT}]
    path = write_jsonl(tmp_path / "prompts.jsonl", rows)
    dataset = load_prompts(path, tokenizer, data_config(path, tokenizer_dir, **encoder_options))
    for example, record in zip(dataset, dataset.records, strict=True):
        assert example.prompt_ids == sft_prompt_ids(tokenizer, record.prompt, **encoder_options)
    if not encoder_options:
        # with the chat template: the generation prompt ends the prompt
        assert dataset[0].prompt_ids[-1] == tokenizer.convert_tokens_to_ids("<|assistant|>")


def test_parquet_and_saved_datasets_load(tmp_path, tokenizer, tokenizer_dir):
    import datasets

    rows = [{"prompt": f"What is {n} + 1?", "answer": n + 1} for n in range(4)]
    parquet = tmp_path / "prompts.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    saved = tmp_path / "saved"
    splits = {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:1])}
    datasets.DatasetDict(splits).save_to_disk(str(saved))
    for source in (parquet, saved):
        dataset = load_prompts(source, tokenizer, data_config(source, tokenizer_dir))
        assert [example.extra for example in dataset] == [{"answer": n + 1} for n in range(4)]
    held_out = load_prompts(saved, tokenizer, data_config(saved, tokenizer_dir), split="test")
    assert [example.origin for example in held_out] == [f"{saved}/test row 0"]
    jsonl = write_jsonl(tmp_path / "prompts.jsonl", rows)
    through_datasets = load_prompts(jsonl, tokenizer, data_config(jsonl, tokenizer_dir, reader="datasets"))
    assert [example.extra for example in through_datasets] == [{"answer": n + 1} for n in range(4)]
    # in-memory rows too
    assert len(load_prompts(rows, tokenizer, data_config(parquet, tokenizer_dir))) == 4


def test_over_length_prompts_follow_the_policy(tmp_path, tokenizer, tokenizer_dir):
    rows = [
        {"prompt": "What is 1 + 2?", "answer": 3},
        {"prompt": "What is 1 + 2? " * 20, "answer": "long"},
        {"prompt": "What is 2 + 2?", "answer": 4},
    ]
    path = write_jsonl(tmp_path / "prompts.jsonl", rows)
    limit = 16
    for policy in ("truncate", "drop"):
        dataset = load_prompts(
            path, tokenizer, data_config(path, tokenizer_dir, over_length=policy), max_prompt_length=limit
        )
        # never cut: dropped, and the records stay paired with their examples
        assert [example.extra["answer"] for example in dataset] == [3, 4]
        assert [record.extra["answer"] for record in dataset.records] == [3, 4]
        assert [example.index for example in dataset] == [0, 1]
        assert all(length <= limit for length in dataset.lengths)
        assert (dataset.report.kept, dataset.report.dropped) == (2, 1)
        assert dataset.report.dropped_origins == [f"{path}:2"]
    with pytest.raises(ValueError, match=rf"{path}:2: prompt of \d+ tokens exceeds max_length 16"):
        load_prompts(path, tokenizer, data_config(path, tokenizer_dir, over_length="error"), max_prompt_length=limit)
    with pytest.raises(ValueError, match="every prompt was dropped"):
        load_prompts(path, tokenizer, data_config(path, tokenizer_dir), max_prompt_length=2)


def test_data_max_length_is_the_default_prompt_limit(tmp_path, tokenizer, tokenizer_dir):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "What is 1 + 2? " * 20}, {"prompt": "What is 1 + 2?"}])
    assert len(load_prompts(path, tokenizer, data_config(path, tokenizer_dir, max_length=16))) == 1


# --- steps: groups, data parallelism, resume ---------------------------------------------------------


@pytest.fixture(scope="module")
def arithmetic_prompts(tokenizer) -> PromptDataset:
    rows = rl_prompt_rows(all_problems(9), 37, seed=0)
    return PromptDataset(read_rows(rows, "rl_prompt"), tokenizer, max_length=64)


def test_repeat_each_keeps_a_groups_rows_adjacent():
    assert repeat_each(["a", "b"], 3) == ["a", "a", "a", "b", "b", "b"]
    assert repeat_each([1, 2], 1) == [1, 2]
    with pytest.raises(ValueError, match="times must be >= 1"):
        repeat_each([1], 0)


def test_each_prompt_is_repeated_group_size_times(arithmetic_prompts):
    loader = PromptLoader(arithmetic_prompts, prompts_per_step=4, group_size=3, seed=1)
    batch = next(iter(loader))
    assert len(batch) == 12 and batch.num_prompts == 4 and batch.group_size == 3
    groups = [batch.index[start : start + 3] for start in range(0, 12, 3)]
    assert all(len(set(group)) == 1 for group in groups)
    assert len({group[0] for group in groups}) == 4  # four distinct prompts
    for row, index in enumerate(batch.index):
        example, record = arithmetic_prompts[index], arithmetic_prompts.records[index]
        assert batch.prompt_ids[row] == example.prompt_ids
        assert batch.prompts[row] == record.prompt
        assert batch.extras[row] == example.extra == record.extra
    # every row owns its extras: a reward function that edits one edits no other row, nor the dataset
    batch.extras[0]["answer"] = -1
    assert batch.extras[1]["answer"] == arithmetic_prompts[batch.index[1]].extra["answer"] != -1


def test_data_parallel_ranks_share_out_each_steps_prompts(arithmetic_prompts):
    whole = list(PromptLoader(arithmetic_prompts, prompts_per_step=8, group_size=2, seed=5))
    ranks = [
        list(PromptLoader(arithmetic_prompts, prompts_per_step=8, group_size=2, seed=5, dp_rank=rank, dp_size=2))
        for rank in range(2)
    ]
    assert len(whole) == len(ranks[0]) == len(ranks[1]) == 37 // 8
    for step, first, second in zip(whole, *ranks, strict=True):
        assert len(first) == len(second) == 8  # 4 prompts x 2 samples per rank
        assert not set(first.index) & set(second.index)
        assert first.index + second.index == step.index


def test_every_prompt_is_seen_once_per_epoch_and_epochs_differ(arithmetic_prompts):
    loader = PromptLoader(arithmetic_prompts, prompts_per_step=6, group_size=1, seed=2, drop_last=False)
    first, second = [sum((batch.index for batch in loader), []) for _ in range(2)]
    assert set(first) == set(second) == set(range(37))
    assert len(first) == 42  # the last step is completed with prompts from the start of the epoch
    assert first != second


def test_resume_mid_epoch_gives_the_uninterrupted_steps(arithmetic_prompts):
    def loader():
        return PromptLoader(arithmetic_prompts, prompts_per_step=4, group_size=2, seed=7, dp_rank=1, dp_size=2)

    uninterrupted = loader()
    reference = [batch.index for _ in range(2) for batch in uninterrupted]  # two epochs of 9 steps
    interrupted = loader()
    seen = []
    for batch in interrupted:
        seen.append(batch.index)
        if len(seen) == 4:
            break
    state = interrupted.state_dict()
    assert state == {"consumed_samples": 16}
    resumed = loader()
    resumed.load_state_dict(state)
    seen += [batch.index for batch in resumed]  # the rest of the epoch
    seen += [batch.index for batch in resumed]  # and the next one
    assert seen == reference


def test_bad_step_shapes_are_errors(arithmetic_prompts):
    with pytest.raises(ValueError, match=r"prompts_per_step \(6\) must be a positive multiple of the data-parallel"):
        PromptLoader(arithmetic_prompts, prompts_per_step=6, dp_size=4)
    with pytest.raises(ValueError, match="group_size must be >= 1"):
        PromptLoader(arithmetic_prompts, prompts_per_step=4, group_size=0)
    with pytest.raises(ValueError, match="has 37 prompts, fewer than the 64 of one step"):
        PromptLoader(arithmetic_prompts, prompts_per_step=64)
    loader = PromptLoader(arithmetic_prompts, prompts_per_step=4)
    with pytest.raises(ValueError, match="not a multiple of global_batch_size 4"):
        loader.load_state_dict({"consumed_samples": 6})
