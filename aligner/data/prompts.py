"""Prompts for online RL: records -> prompt token ids, and per step this rank's prompts, each repeated per group.

A prompt record is ``{"prompt": str or messages, ...}``; every other field rides
along in ``extra`` for the reward function (:class:`~aligner.data.formats.RLPromptRecord`).
Prompts are tokenized as the SFT path tokenizes its prompts: with the chat template
and the generation prompt (``add_generation_prompt=True``), or as plain text
(:func:`aligner.data.encode.make_encoder`). A prompt longer than ``max_length`` is
never cut: it is dropped (``over_length`` ``"truncate"`` or ``"drop"``) or is an
error naming the record (``"error"``).

Each step takes ``prompts_per_step`` prompts over all data-parallel ranks (a
:class:`~aligner.data.sampler.GlobalBatchSampler` global batch: shuffled per
epoch, disjoint across ranks, resumable mid-epoch from its ``consumed_samples``);
a rank's share is repeated explicitly by :func:`repeat_each`, so the
``group_size`` samples of a prompt are adjacent rows of that rank (GRPO's groups;
``group_size=1`` for PPO / REINFORCE)::

    prompts = load_prompts(config.data.train, tokenizer, config.data, max_prompt_length=...)
    loader = make_prompt_loader(prompts, prompts_per_step=32, group_size=4, seed=config.trainer.seed)
    run.register("data", loader)         # its position is checkpointed
    for batch in loader:                 # one epoch from the current position
        engine.generate(batch.prompt_ids, ...)   # [32 / dp * 4] rows
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from aligner.config import DataConfig
from aligner.data.encode import Encoder, EncodeReport, OverLength, PromptExample, encode_records, make_encoder
from aligner.data.formats import Message, RLPromptRecord, read_records
from aligner.data.sampler import GlobalBatchSampler
from aligner.data.splits import encoder_for

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger("aligner")
T = TypeVar("T")


class PromptDataset:
    """RL prompt records, tokenized once; the records whose prompt fits ``max_length`` are kept.

    Indexing gives the encoded :class:`~aligner.data.encode.PromptExample` (``index``
    equals its position); :attr:`records` holds the kept records in the same order,
    :attr:`report` what the length limit dropped.

    Args:
        records: ``rl_prompt`` records (:func:`aligner.data.formats.read_records`).
        tokenizer: the policy's tokenizer.
        max_length: most tokens per prompt.
        over_length: ``"truncate"`` or ``"drop"`` drop an over-long prompt, ``"error"`` raises.
        encoder: chat template or plain text (:func:`~aligner.data.encode.make_encoder`); None: the
            tokenizer's chat template when it has one, else plain text.

    Raises:
        ValueError: no records, a record that is not an RL prompt, an over-long prompt under
            ``"error"`` (naming the record), or every prompt dropped.
    """

    def __init__(
        self,
        records: Sequence[RLPromptRecord],
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_length: int,
        over_length: OverLength = "truncate",
        encoder: Encoder | None = None,
    ) -> None:
        if not records:
            raise ValueError("no prompt records")
        wrong = [record.origin for record in records if not isinstance(record, RLPromptRecord)]
        if wrong:
            raise ValueError(f"prompt records must be rl_prompt records; these are not: {wrong[:3]}")
        encoder = encoder or make_encoder(tokenizer)
        self.max_length = max_length
        self.pad_token_id: int = tokenizer.pad_token_id
        self.records: list[RLPromptRecord] = []
        self.examples: list[PromptExample] = []
        self.report = EncodeReport(max_length=max_length)
        # One record at a time, so each kept example is paired with its record (encoding drops some).
        for record in records:
            encoded, _ = encode_records(
                [record], tokenizer, max_length=max_length, over_length=over_length, encoder=encoder
            )
            if not encoded:
                self.report.dropped += 1
                self.report.dropped_origins.append(record.origin)
                continue
            (example,) = encoded
            self.examples.append(PromptExample(example.prompt_ids, example.extra, len(self.examples), example.origin))
            self.records.append(record)
            self.report.kept += 1
        if not self.examples:
            raise ValueError(f"every prompt was dropped by the length limit: {self.report}")
        self.lengths = [len(example.prompt_ids) for example in self.examples]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> PromptExample:
        return self.examples[index]


def load_prompts(
    source: str | Path | Sequence[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    data: DataConfig,
    *,
    max_prompt_length: int | None = None,
    split: str | None = None,
) -> PromptDataset:
    """Read ``rl_prompt`` records with the run's reader settings and tokenize them as ``data`` says; logs the report.

    Args:
        source: a jsonl / json / parquet file, a ``save_to_disk`` folder, or a list of row dicts.
        tokenizer: the policy's tokenizer.
        data: the run's data section (``reader``, ``split``, ``cache_dir``, ``chat_template``,
            ``prompt_template``, ``end_of_turn_token``, ``over_length``).
        max_prompt_length: most tokens per prompt; None: ``data.max_length``.
        split: the split of a saved ``DatasetDict`` (or hub dataset) to read; None: ``data.split``.

    Raises:
        ConfigError: encoder options that do not fit the tokenizer.
        ValueError, FileNotFoundError: see :func:`~aligner.data.formats.read_records` and :class:`PromptDataset`.
    """
    records = read_records(source, "rl_prompt", reader=data.reader, split=split or data.split, cache_dir=data.cache_dir)
    dataset = PromptDataset(
        records,
        tokenizer,
        max_length=data.max_length if max_prompt_length is None else max_prompt_length,
        over_length=data.over_length,
        encoder=encoder_for(tokenizer, data),
    )
    log.info("%s: %s", source if isinstance(source, (str, Path)) else "prompt rows", dataset.report)
    return dataset


def repeat_each(items: Sequence[T], times: int) -> list[T]:
    """Each item ``times`` times in a row: ``repeat_each([a, b], 3) == [a, a, a, b, b, b]``.

    Raises:
        ValueError: ``times < 1``.
    """
    if times < 1:
        raise ValueError(f"times must be >= 1, got {times}")
    return [item for item in items for _ in range(times)]


@dataclass(frozen=True)
class PromptBatch:
    """One step's prompts on this rank, each repeated ``group_size`` times (a group's rows adjacent).

    Row ``i`` belongs to group ``i // group_size``. Every list has ``num_prompts * group_size`` rows.

    Attributes:
        prompt_ids: token ids of each row's prompt (what the engine continues).
        prompts: each row's prompt as its record holds it (``{"role", "content"}`` messages).
        extras: each row's record fields other than the prompt (a copy per row).
        index: each row's prompt index in the :class:`PromptDataset`.
        group_size: samples per prompt.
    """

    prompt_ids: list[list[int]]
    prompts: list[list[Message]]
    extras: list[dict[str, Any]]
    index: list[int]
    group_size: int

    def __len__(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_prompts(self) -> int:
        return len(self.prompt_ids) // self.group_size


class PromptLoader:
    """Per step, this rank's :class:`PromptBatch`; iterates one epoch from the current position, resumably.

    ``prompts_per_step`` prompts are drawn per step over all ``dp_size`` ranks; this rank gets
    ``prompts_per_step / dp_size`` of them, each repeated ``group_size`` times. The state is the
    sampler's (``consumed_samples``, counted in prompts over all ranks).

    Args:
        dataset: the encoded prompts.
        prompts_per_step: distinct prompts per step over all data-parallel ranks.
        group_size: samples per prompt.
        dp_rank: this rank's data-parallel index.
        dp_size: data-parallel world size.
        seed: shuffling seed (the epoch is mixed in).
        shuffle: shuffle per epoch; otherwise dataset order.
        drop_last: drop (True) or complete (False) an epoch's last incomplete step.

    Raises:
        ValueError: ``group_size < 1``, ``prompts_per_step`` not a positive multiple of ``dp_size``, or
            fewer prompts than one step under ``drop_last``.
    """

    def __init__(
        self,
        dataset: PromptDataset,
        *,
        prompts_per_step: int,
        group_size: int = 1,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> None:
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if dp_size < 1 or prompts_per_step < 1 or prompts_per_step % dp_size:
            raise ValueError(
                f"prompts_per_step ({prompts_per_step}) must be a positive multiple of the data-parallel size "
                f"({dp_size}): every rank gets the same number of prompts"
            )
        if drop_last and len(dataset) < prompts_per_step:
            raise ValueError(
                f"the prompt set has {len(dataset)} prompts, fewer than the {prompts_per_step} of one step; lower "
                "the prompts per step or give more prompts"
            )
        self.dataset = dataset
        self.group_size = group_size
        # One "micro-batch" per rank per step: the rank's whole share of the step's prompts.
        self.sampler = GlobalBatchSampler(
            len(dataset),
            global_batch_size=prompts_per_step,
            micro_batch_size=prompts_per_step // dp_size,
            dp_rank=dp_rank,
            dp_size=dp_size,
            seed=seed,
            shuffle=shuffle,
            drop_last=drop_last,
        )

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[PromptBatch]:
        for (indices,) in self.sampler:
            yield self.batch(indices)

    def batch(self, indices: Sequence[int]) -> PromptBatch:
        """The :class:`PromptBatch` of the prompts at ``indices``, each repeated ``group_size`` times."""
        rows = repeat_each(list(indices), self.group_size)
        return PromptBatch(
            prompt_ids=[list(self.dataset[index].prompt_ids) for index in rows],
            prompts=[[dict(message) for message in self.dataset.records[index].prompt] for index in rows],
            extras=[dict(self.dataset[index].extra) for index in rows],
            index=rows,
            group_size=self.group_size,
        )

    def state_dict(self) -> dict[str, int]:
        """The sampler's state: ``{"consumed_samples": prompts handed out so far, over all ranks}``."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume the sampler (see :meth:`aligner.data.sampler.GlobalBatchSampler.load_state_dict`)."""
        self.sampler.load_state_dict(state)


def make_prompt_loader(
    dataset: PromptDataset,
    *,
    prompts_per_step: int,
    group_size: int = 1,
    seed: int = 0,
    shuffle: bool = True,
    drop_last: bool = True,
) -> PromptLoader:
    """A :class:`PromptLoader` for this data-parallel rank (megatron's ``parallel_state``)."""
    from megatron.core import parallel_state

    return PromptLoader(
        dataset,
        prompts_per_step=prompts_per_step,
        group_size=group_size,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        seed=seed,
        shuffle=shuffle,
        drop_last=drop_last,
    )
