"""A run's data from its config: the tokenizer, the encoded splits and their per-step loaders."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from aligner.config import ConfigError, DataConfig, ModelSourceConfig, TrainerConfig
from aligner.data.dataset import EncodedDataset
from aligner.data.encode import Encoder, make_encoder
from aligner.data.formats import RecordKind, read_records
from aligner.data.loader import GlobalBatchLoader
from aligner.data.sampler import GlobalBatchSampler
from aligner.data.tokenizer import load_tokenizer

log = logging.getLogger("aligner")


def tokenizer_for(model: ModelSourceConfig, data: DataConfig):
    """The run's tokenizer: ``data.tokenizer``, else the imported checkpoint's (``model.hf_path``).

    Raises:
        ConfigError: neither is set.
    """
    path = data.tokenizer or model.hf_path
    if path is None:
        raise ConfigError("data.tokenizer is required when the model is not imported from model.hf_path")
    return load_tokenizer(path)


def encoder_for(tokenizer, data: DataConfig) -> Encoder:
    """How records become tokens: the chat template or plain text, as ``data`` says (see :class:`DataConfig`).

    Raises:
        ConfigError: options that do not fit the tokenizer (a chat template asked of one without).
    """
    try:
        return make_encoder(
            tokenizer,
            chat_template=data.chat_template,
            prompt_template=data.prompt_template,
            end_of_turn_token=data.end_of_turn_token,
        )
    except ValueError as error:
        raise ConfigError(str(error)) from None


def load_split(
    path: str,
    kind: RecordKind,
    tokenizer,
    data: DataConfig,
    attribute_names: Sequence[str] = (),
    *,
    split: str | None = None,
) -> EncodedDataset:
    """Read and encode one split (``split`` of a saved or hub dataset, ``data.split`` when None), logging how many
    records the length limit touched."""
    dataset = EncodedDataset(
        read_records(path, kind, reader=data.reader, split=split or data.split, cache_dir=data.cache_dir),
        tokenizer,
        max_length=data.max_length,
        over_length=data.over_length,
        attribute_names=attribute_names,
        encoder=encoder_for(tokenizer, data),
    )
    log.info("%s: %s", path, dataset.report)
    return dataset


def load_splits(
    model: ModelSourceConfig, data: DataConfig, kind: RecordKind, attribute_names: Sequence[str] = ()
) -> tuple[object, EncodedDataset, EncodedDataset | None]:
    """``(tokenizer, train, val)``: the run's tokenizer and its encoded splits (``val`` None without ``data.val``)."""
    tokenizer = tokenizer_for(model, data)
    train = load_split(data.train, kind, tokenizer, data, attribute_names)
    val = (
        None
        if data.val is None
        else load_split(data.val, kind, tokenizer, data, attribute_names, split=data.split_for("val"))
    )
    return tokenizer, train, val


def make_loader(
    dataset: EncodedDataset,
    trainer: TrainerConfig,
    data: DataConfig,
    *,
    shuffle: bool = True,
    drop_last: bool = True,
) -> GlobalBatchLoader:
    """A resumable loader giving this data-parallel rank its micro-batches per global step."""
    from megatron.core import parallel_state

    sampler = GlobalBatchSampler(
        len(dataset),
        global_batch_size=trainer.global_batch_size,
        micro_batch_size=trainer.micro_batch_size,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        seed=trainer.seed,
        shuffle=shuffle,
        drop_last=drop_last,
        lengths=dataset.lengths,
        group_by_length=data.group_by_length and shuffle,
    )
    return GlobalBatchLoader(dataset, sampler, pad_to_multiple_of=data.pad_to_multiple_of)


def make_loaders(
    trainer: TrainerConfig, data: DataConfig, train: EncodedDataset, val: EncodedDataset | None
) -> tuple[GlobalBatchLoader, GlobalBatchLoader | None]:
    """This rank's training loader (shuffled, resumable) and validation loader (in order, or None)."""
    val_loader = None if val is None else make_loader(val, trainer, data, shuffle=False, drop_last=False)
    return make_loader(train, trainer, data), val_loader
