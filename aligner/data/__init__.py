"""Data: jsonl / Hugging Face datasets -> records -> token ids -> padded batches, plus synthetic tasks.

The pipeline, one module per step:

- :mod:`~aligner.data.formats`: read rows of each kind into record dataclasses (errors name file:line).
- :mod:`~aligner.data.tokenizer`: load a tokenizer offline, or build a tiny one with a chat template.
- :mod:`~aligner.data.encode`: records -> token ids and trained-token masks, over-length policy.
- :mod:`~aligner.data.dataset`: encode once, cache lengths.
- :mod:`~aligner.data.sampler`: deterministic, resumable, data-parallel global/micro batches.
- :mod:`~aligner.data.collate`: examples -> the batch dicts of the batch contract.
- :mod:`~aligner.data.loader`: per global step, this rank's collated micro-batches.
- :mod:`~aligner.data.synthetic`: arithmetic tasks with known answers and a programmatic reward.
"""

from aligner.data.collate import (
    IGNORE_INDEX,
    Batch,
    collate,
    collate_kto,
    collate_preference,
    collate_prompts,
    collate_regression,
    collate_sft,
)
from aligner.data.dataset import EncodedDataset, example_length
from aligner.data.encode import (
    ChatEncoder,
    EncodedSequence,
    EncodeReport,
    Example,
    KTOExample,
    PreferenceExample,
    PromptExample,
    RegressionExample,
    SFTExample,
    TextEncoder,
    encode_records,
    make_encoder,
)
from aligner.data.formats import (
    HELPSTEER2_ATTRIBUTES,
    RECORD_KINDS,
    KTORecord,
    PreferenceRecord,
    Record,
    RecordKind,
    RegressionRecord,
    RLPromptRecord,
    SFTRecord,
    load_json_dataset,
    read_jsonl,
    read_records,
    read_rows,
)
from aligner.data.loader import GlobalBatchLoader
from aligner.data.sampler import GlobalBatchSampler
from aligner.data.synthetic import reward, write_demo_datasets
from aligner.data.tokenizer import build_tokenizer, load_tokenizer

__all__ = [
    "HELPSTEER2_ATTRIBUTES",
    "IGNORE_INDEX",
    "RECORD_KINDS",
    "Batch",
    "ChatEncoder",
    "TextEncoder",
    "EncodeReport",
    "EncodedDataset",
    "EncodedSequence",
    "Example",
    "GlobalBatchLoader",
    "GlobalBatchSampler",
    "KTOExample",
    "KTORecord",
    "PreferenceExample",
    "PreferenceRecord",
    "PromptExample",
    "RLPromptRecord",
    "Record",
    "RecordKind",
    "RegressionExample",
    "RegressionRecord",
    "SFTExample",
    "SFTRecord",
    "build_tokenizer",
    "collate",
    "collate_kto",
    "collate_preference",
    "collate_prompts",
    "collate_regression",
    "collate_sft",
    "encode_records",
    "make_encoder",
    "example_length",
    "load_json_dataset",
    "load_tokenizer",
    "read_jsonl",
    "read_records",
    "read_rows",
    "reward",
    "write_demo_datasets",
]
