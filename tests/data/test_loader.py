"""EncodedDataset + GlobalBatchLoader on the synthetic demo files: shapes per step, exact resume."""

from pathlib import Path

import pytest
import torch

from aligner.data.dataset import EncodedDataset
from aligner.data.formats import HELPSTEER2_ATTRIBUTES
from aligner.data.loader import GlobalBatchLoader
from aligner.data.sampler import GlobalBatchSampler
from aligner.data.synthetic import write_demo_datasets

MAX_LENGTH = 64


@pytest.fixture(scope="module")
def demo_paths(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return write_demo_datasets(tmp_path_factory.mktemp("demo"), seed=0, num_train=64, num_val=16)


def make_loader(dataset, *, dp_rank=0, dp_size=2, group_by_length=True):
    sampler = GlobalBatchSampler(
        len(dataset), global_batch_size=16, micro_batch_size=4, dp_rank=dp_rank, dp_size=dp_size,
        seed=1, lengths=dataset.lengths, group_by_length=group_by_length,
    )  # fmt: skip
    return GlobalBatchLoader(dataset, sampler, pad_to_multiple_of=8)


@pytest.mark.parametrize("kind", ["sft", "preference", "regression", "kto", "rl_prompt"])
def test_every_kind_loads_into_contract_batches(demo_paths, tokenizer, kind):
    dataset = EncodedDataset.from_source(
        demo_paths[kind]["train"], kind, tokenizer, max_length=MAX_LENGTH, attribute_names=HELPSTEER2_ATTRIBUTES
    )
    assert (dataset.report.kept, dataset.report.dropped) == (64, 0)
    assert len(dataset.lengths) == len(dataset) == 64
    loader = make_loader(dataset)
    steps = list(loader)
    assert len(steps) == len(loader) == 4
    for micro_batches in steps:
        assert len(micro_batches) == 2  # 16 / (4 * 2)
        for batch in micro_batches:
            rows = 8 if kind == "preference" else 4
            assert batch["input_ids"].shape[0] == rows and batch["input_ids"].shape[1] % 8 == 0
            assert batch["index"].shape == (4,)
            assert int(batch["lengths"].max()) <= batch["input_ids"].shape[1]


def test_ranks_cover_each_global_batch(demo_paths, tokenizer):
    dataset = EncodedDataset.from_source(demo_paths["sft"]["train"], "sft", tokenizer, max_length=MAX_LENGTH)
    rank0, rank1 = (make_loader(dataset, dp_rank=rank) for rank in (0, 1))
    for step0, step1 in zip(rank0, rank1, strict=True):
        indices = torch.cat([batch["index"] for batch in step0 + step1])
        assert len(set(indices.tolist())) == 16


def test_loader_resume(demo_paths, tokenizer):
    dataset = EncodedDataset.from_source(demo_paths["kto"]["train"], "kto", tokenizer, max_length=MAX_LENGTH)
    uninterrupted = list(make_loader(dataset))
    loader = make_loader(dataset)
    iterator = iter(loader)
    head = [next(iterator), next(iterator)]
    resumed = make_loader(dataset)
    resumed.load_state_dict(loader.state_dict())
    for expected, got in zip(uninterrupted, head + list(resumed), strict=True):
        for expected_batch, batch in zip(expected, got, strict=True):
            assert expected_batch.keys() == batch.keys()
            for name in batch:
                torch.testing.assert_close(batch[name], expected_batch[name])


def test_dataset_errors(tokenizer, tmp_path: Path):
    with pytest.raises(ValueError, match="no records"):
        EncodedDataset([], tokenizer, max_length=MAX_LENGTH)
    with pytest.raises(ValueError, match="every record was dropped"):
        EncodedDataset.from_source([{"input": "What is 1 + 1?", "output": "2"}], "sft", tokenizer, max_length=3)
    dataset = EncodedDataset.from_source([{"input": "q", "output": "a"}] * 4, "sft", tokenizer, max_length=16)
    sampler = GlobalBatchSampler(8, global_batch_size=4, micro_batch_size=2)
    with pytest.raises(ValueError, match="covers 8 samples but the dataset has 4"):
        GlobalBatchLoader(dataset, sampler)
