"""A dataset of encoded examples: records read once, tokenized once, lengths cached."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aligner.data.encode import Encoder, Example, OverLength, PreferenceExample, PromptExample, encode_records
from aligner.data.formats import Record, RecordKind, read_records

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class EncodedDataset:
    """Records of one kind, encoded with a tokenizer's chat template.

    Indexing gives the encoded example (its ``index`` equals its position); :attr:`lengths`
    holds each example's padded-size driver (the longer of chosen/rejected for pairs) for
    length-grouped sampling; :attr:`report` says how many records were kept, truncated and dropped.

    Args:
        records: records from :mod:`aligner.data.formats`.
        tokenizer: a tokenizer with a chat template and an eos token.
        max_length: most tokens per sequence (per prompt for RL prompts).
        over_length: ``"truncate"``, ``"drop"`` or ``"error"`` (see :mod:`aligner.data.encode`).
        attribute_names: attribute order for regression records.
        encoder: chat template or plain text (:func:`aligner.data.encode.make_encoder`); None: the
            tokenizer's chat template when it has one, else plain text.

    Raises:
        ValueError: what :func:`~aligner.data.encode.encode_records` raises, or no record left after encoding.
    """

    def __init__(
        self,
        records: Sequence[Record],
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_length: int,
        over_length: OverLength = "truncate",
        attribute_names: Sequence[str] = (),
        encoder: Encoder | None = None,
    ) -> None:
        if not records:
            raise ValueError("no records to encode")
        self.records = list(records)
        self.max_length = max_length
        self.pad_token_id: int = tokenizer.pad_token_id
        self.examples, self.report = encode_records(
            self.records,
            tokenizer,
            max_length=max_length,
            over_length=over_length,
            attribute_names=attribute_names,
            encoder=encoder,
        )
        if not self.examples:
            raise ValueError(f"every record was dropped by the length limit: {self.report}")
        self.lengths = [example_length(example) for example in self.examples]

    @classmethod
    def from_source(
        cls,
        source: str | Path | Sequence[dict[str, Any]],
        kind: RecordKind,
        tokenizer: PreTrainedTokenizerBase,
        **options: Any,
    ) -> EncodedDataset:
        """Read records with :func:`~aligner.data.formats.read_records` and encode them (``options`` as in the init)."""
        return cls(read_records(source, kind), tokenizer, **options)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]


def example_length(example: Example) -> int:
    """Tokens an example contributes to its batch's padded width."""
    if isinstance(example, PreferenceExample):
        return max(len(example.chosen), len(example.rejected))
    if isinstance(example, PromptExample):
        return len(example.prompt_ids)
    return len(example.sequence)
