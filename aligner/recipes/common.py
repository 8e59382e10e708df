"""Set-up shared by the recipes: the model and data sections of a config, and what they build.

A recipe (``aligner/recipes/<name>.py``) reads like a script: load the config,
:func:`setup` the process groups, build the model with :func:`build_model_from`,
the data with :func:`build_loaders`, then hand a ``forward_step`` to the offline
trainer. What differs between algorithms (the loss) stays in the recipe.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from aligner.checkpoint import load_model_weights  # noqa: F401  (re-exported for recipes)
from aligner.data import EncodedDataset, GlobalBatchLoader, GlobalBatchSampler, load_tokenizer, read_records
from aligner.data.formats import RecordKind

log = logging.getLogger("aligner")


@dataclass
class ModelSection:
    """Where the initial weights come from: exactly one of ``hf_path`` and ``config``.

    Attributes:
        hf_path: a Hugging Face checkpoint folder (Llama / Mistral / Qwen2) to import.
        config: a :class:`~aligner.models.config.ModelConfig` mapping for a model drawn
            at random (from the trainer's seed): tests and from-scratch runs.
        params_dtype: overrides the dtype of an imported checkpoint ("bfloat16" on GPUs).
    """

    hf_path: str | None = None
    config: dict[str, Any] | None = None
    params_dtype: str | None = None


@dataclass
class DataSection:
    """The training and validation data and how it is tokenized.

    Attributes:
        train: a jsonl file (DESIGN.md section 6 formats, NeMo-Aligner / TRL names accepted).
        val: a jsonl file for validation; None skips validation.
        tokenizer: a local Hugging Face tokenizer folder (with a chat template);
            None uses ``model.hf_path``.
        max_length: most tokens per sequence.
        over_length: "truncate", "drop" or "error" for longer examples.
        group_by_length: batch similar lengths together (less padding).
        pad_to_multiple_of: round each batch's padded width up to this multiple.
        reader: "lines" (plain jsonl reader, errors name file:line) or "datasets"
            (Hugging Face ``load_dataset("json")``, memory-mapped for large files).
    """

    train: str = "???"
    val: str | None = None
    tokenizer: str | None = None
    max_length: int = 1024
    over_length: str = "truncate"
    group_by_length: bool = True
    pad_to_multiple_of: int | None = 8
    reader: str = "lines"
    attribute_names: list[str] = field(default_factory=list)


def tokenizer_path(model: ModelSection, data: DataSection) -> str:
    """The tokenizer folder: ``data.tokenizer`` or the imported checkpoint's."""
    path = data.tokenizer or model.hf_path
    if path is None:
        raise ValueError("data.tokenizer is required when the model is not imported from model.hf_path")
    return path


def build_model_from(model: ModelSection, num_value_outputs: int | None = None, tp: int = 1, pp: int = 1):
    """This rank's GPTModel shard: imported from ``model.hf_path`` or drawn from ``model.config``.

    Raises:
        ValueError: neither or both of ``hf_path`` and ``config`` are set.
    """
    from aligner.models.config import ModelConfig
    from aligner.models.gpt import build_model
    from aligner.models.hf import config_from_hf, import_hf

    if (model.hf_path is None) == (model.config is None):
        raise ValueError("set exactly one of model.hf_path (import a checkpoint) and model.config (random init)")
    if model.config is not None:
        values = dict(model.config)
        if model.params_dtype is not None:
            values["params_dtype"] = model.params_dtype
        return build_model(ModelConfig.from_dict(values), num_value_outputs=num_value_outputs)
    config = None
    if model.params_dtype is not None:
        from transformers import AutoConfig

        hf_config = AutoConfig.from_pretrained(model.hf_path, local_files_only=True)
        config = ModelConfig.from_dict({**config_from_hf(hf_config).to_dict(), "params_dtype": model.params_dtype})
    return import_hf(model.hf_path, tp=tp, pp=pp, config=config, num_value_outputs=num_value_outputs)


def check_vocab(tokenizer, model) -> None:
    """The model's vocabulary must cover every token id the tokenizer can produce."""
    vocab_size = model.aligner_config.vocab_size
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab_size}; "
            "set model.config.vocab_size >= the tokenizer's size"
        )


def load_dataset_split(
    path: str, kind: RecordKind, tokenizer, data: DataSection, attribute_names: Sequence[str] = ()
) -> EncodedDataset:
    """Read and encode one split, logging how many records the length limit touched."""
    records = read_records(path, kind, reader=data.reader)
    dataset = EncodedDataset(
        records,
        tokenizer,
        max_length=data.max_length,
        over_length=data.over_length,
        attribute_names=attribute_names,
    )
    log.info("%s: %s", path, dataset.report)
    return dataset


def make_loader(
    dataset: EncodedDataset,
    *,
    global_batch_size: int,
    micro_batch_size: int,
    seed: int,
    data: DataSection,
    shuffle: bool = True,
    drop_last: bool = True,
) -> GlobalBatchLoader:
    """A resumable loader giving this data-parallel rank its micro-batches per global step."""
    from megatron.core import parallel_state

    sampler = GlobalBatchSampler(
        len(dataset),
        global_batch_size=global_batch_size,
        micro_batch_size=micro_batch_size,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        seed=seed,
        shuffle=shuffle,
        drop_last=drop_last,
        lengths=dataset.lengths,
        group_by_length=data.group_by_length and shuffle,
    )
    return GlobalBatchLoader(dataset, sampler, pad_to_multiple_of=data.pad_to_multiple_of)


def load_tokenizer_for(model: ModelSection, data: DataSection):
    """The tokenizer of :func:`tokenizer_path`."""
    return load_tokenizer(tokenizer_path(model, data))


def tensor_parallel_group() -> torch.distributed.ProcessGroup | None:
    """megatron's tensor-parallel group, or None when it has one rank (no collectives needed)."""
    from megatron.core import parallel_state

    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return None
    return parallel_state.get_tensor_model_parallel_group()


def output_dir(path: str) -> Path:
    """``path`` as a folder that exists."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def parse_command_line(argv: Sequence[str] | None, description: str) -> tuple[str | None, list[str]]:
    """``--config FILE`` and ``key=value`` overrides from the command line."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML config (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-5 trainer.max_steps=100")
    args = parser.parse_args(argv)
    for override in args.overrides:
        if "=" not in override:
            parser.error(f"override {override!r} is not key=value")
    return args.config, list(args.overrides)


def setup(parallel, trainer) -> None:
    """Console logging on every rank's first tensor/pipeline rank, then the process groups and seeds."""
    import os

    from aligner.parallel import initialize

    logging.basicConfig(
        level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # megatron-core logs its whole DDP / optimizer configuration at INFO.
    logging.getLogger("megatron").setLevel(logging.WARNING)
    initialize(tp=parallel.tp, pp=parallel.pp, seed=trainer.seed)


def weighted_metrics(metrics: dict[str, torch.Tensor], count: torch.Tensor | int) -> dict[str, torch.Tensor]:
    """Batch-mean metrics as ``[mean * count, count]`` pairs, so the trainer weighs micro-batches by size.

    Metrics that are not 0-dim (per-attribute vectors) are left out.
    """
    weight = torch.as_tensor(count, dtype=torch.float64)
    return {
        name: torch.stack([value.detach().double() * weight.to(value.device), weight.to(value.device)])
        for name, value in metrics.items()
        if value.dim() == 0
    }


REFERENCE_MODES = ("precompute", "on_the_fly")


def frozen_copy(model):
    """A frozen, eval-mode copy of ``model``'s current weights (the reference policy)."""
    from aligner.models.gpt import build_model

    reference = build_model(model.aligner_config, num_value_outputs=model.aligner_num_value_outputs, init_weights=False)
    reference.load_state_dict(model.state_dict())
    reference.requires_grad_(False)
    return reference.eval()


def to_device(batch: dict, device: torch.device) -> dict:
    """``batch`` with its tensors on ``device``."""
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


@torch.no_grad()
def forward_only_sequence_logprobs(model, batch: dict, *, input_key: str, labels_key: str, vocab_size: int, tp_group):
    """Summed log-probs of each row of one micro-batch under ``model``, without gradient, at any pipeline size.

    Runs megatron's forward-only schedule on ``batch[input_key]`` scored against
    ``batch[labels_key]`` (``model`` keeps its train/eval mode). Returns the
    ``[rows]`` float32 sums of :func:`aligner.algorithms.logprobs.sequence_logprobs`
    on the last pipeline stage and None on the other stages (which never need
    them: the loss is computed on the last stage).
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from aligner.algorithms.logprobs import sequence_logprobs

    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        model.config.variable_seq_lengths = True
    result: list[torch.Tensor] = []

    def forward_step(data_iterator, model):
        micro_batch = next(data_iterator)
        logits = model(micro_batch[input_key], None, None)

        def loss_func(logits):
            _, sums, _ = sequence_logprobs(logits, micro_batch[labels_key], vocab_size=vocab_size, tp_group=tp_group)
            result.append(sums.float())
            return sums.sum() * 0, torch.ones((), dtype=torch.int, device=sums.device), {}

        return logits, loss_func

    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([batch]),
        model=[model],
        num_microbatches=1,
        seq_length=batch[input_key].shape[1],
        micro_batch_size=batch[input_key].shape[0],
        forward_only=True,
    )
    return result[0] if result else None


@torch.no_grad()
def precompute_sequence_logprobs(
    model, dataset: EncodedDataset, *, micro_batch_size: int, vocab_size: int, tp_group, data: DataSection
) -> torch.Tensor:
    """Summed log-probs of every trained sequence of ``dataset`` under ``model``, by dataset index.

    Runs :func:`forward_only_sequence_logprobs` (any pipeline size) over the dataset
    in order, in micro-batches of ``micro_batch_size``, which the data-parallel
    replicas share out round-robin (each computes 1/dp of the table, whose rows
    are then exchanged: one all-gather of ``len(dataset) * R`` floats). The
    micro-batches are the same at every data-parallel size, so the table is too.
    Returns ``[len(dataset), R]`` float32 on the CPU on every rank, ``R`` the
    rows per example (2 for a preference pair: chosen, rejected; 1 otherwise).
    """
    from megatron.core import parallel_state

    from aligner.data import collate

    device = next(model.parameters()).device
    starts = range(0, len(dataset), micro_batch_size)

    def micro_batch(number: int) -> dict:
        examples = [dataset[i] for i in range(starts[number], min(starts[number] + micro_batch_size, len(dataset)))]
        collated = collate(
            examples,
            pad_token_id=dataset.pad_token_id,
            pad_to_multiple_of=data.pad_to_multiple_of,
            max_length=dataset.max_length,
        )
        return to_device(collated, device)

    model.eval()
    rows: dict[int, torch.Tensor] = {}  # micro-batch number -> [B, R], on the last pipeline stage
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    for number in range(dp_rank, len(starts), dp_size):  # one schedule per micro-batch: their widths differ
        batch = micro_batch(number)
        sums = forward_only_sequence_logprobs(
            model, batch, input_key="input_ids", labels_key="labels", vocab_size=vocab_size, tp_group=tp_group
        )
        if sums is not None:
            rows[number] = sums.view(-1, batch["index"].shape[0]).T.cpu()  # [B, R]: chosen then rejected rows
    if dp_size > 1:  # the replicas of one pipeline stage exchange their rows
        shares: list[dict[int, torch.Tensor] | None] = [None] * dp_size
        torch.distributed.all_gather_object(shares, rows, group=parallel_state.get_data_parallel_group())
        rows = {number: part for share in shares for number, part in share.items()}
    table = torch.cat([rows[number] for number in range(len(starts))]) if rows else None
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        shared = [table]
        torch.distributed.broadcast_object_list(
            shared,
            src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        )
        table = shared[0]
    return table


class Annotated:
    """A step loader whose micro-batches get more fields, computed per step before the step runs.

    ``annotate(micro_batches) -> micro_batches`` sees a whole step's micro-batches
    (e.g. runs a frozen reference model on them), so a value the loss needs is
    there on the last pipeline stage whatever the pipeline size. State and length
    are the wrapped loader's.
    """

    def __init__(self, loader: GlobalBatchLoader, annotate: Callable[[list[dict]], list[dict]]) -> None:
        self.loader = loader
        self.annotate = annotate

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for micro_batches in self.loader:
            yield self.annotate(micro_batches)

    def state_dict(self) -> dict[str, int]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.loader.load_state_dict(state)


def with_reference_model(loader: GlobalBatchLoader, reference_model, *, vocab_size: int, tp_group) -> Annotated:
    """``loader`` whose micro-batches also carry ``ref_logps`` from ``reference_model``, computed step by step.

    The reference runs on each micro-batch (``input_ids`` scored against ``labels``)
    before the step, through the forward-only pipeline schedule, so this works at
    any pipeline size; ``ref_logps`` is set on the last pipeline stage.
    """
    device = next(reference_model.parameters()).device

    def annotate(micro_batches: list[dict]) -> list[dict]:
        annotated = []
        for batch in micro_batches:
            ref = forward_only_sequence_logprobs(
                reference_model,
                to_device(batch, device),
                input_key="input_ids",
                labels_key="labels",
                vocab_size=vocab_size,
                tp_group=tp_group,
            )
            annotated.append(batch if ref is None else {**batch, "ref_logps": ref})
        return annotated

    return Annotated(loader, annotate)


def with_reference_table(loader: GlobalBatchLoader, table: torch.Tensor) -> Annotated:
    """``loader`` whose micro-batches also carry ``ref_logps`` looked up in ``table`` by their ``index``.

    ``ref_logps`` follows the batch's row layout: ``[2B]`` (chosen rows, then
    rejected rows) for preference batches, ``[B]`` otherwise.
    """

    def annotate(micro_batches: list[dict]) -> list[dict]:
        return [{**batch, "ref_logps": table[batch["index"]].T.reshape(-1)} for batch in micro_batches]

    return Annotated(loader, annotate)


def report(name: str, trainer) -> None:
    """Print the run's outcome once (global rank 0): steps, first/last training loss, last validation."""
    if torch.distributed.get_rank() != 0:
        return
    summary = trainer.summary
    lines = [f"{name}: {summary.step} steps"]
    if summary.history:
        lines.append(f"train loss {summary.history[0]['loss']:.4g} -> {summary.history[-1]['loss']:.4g}")
    if summary.val_history:
        shown = {k: v for k, v in summary.val_history[-1].items() if k not in ("step", "count", "tokens")}
        lines.append("val " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(shown.items())))
    if summary.checkpoint is not None:
        lines.append(f"checkpoint {summary.checkpoint}")
    print("; ".join(lines), flush=True)


def prepare_run(
    config, kind: RecordKind, attribute_names: Sequence[str] = (), num_value_outputs: int | None = None
) -> tuple[EncodedDataset, EncodedDataset | None, Any]:
    """What every recipe does first: :func:`setup`, then ``(train, val, model)``.

    ``config`` has the recipe sections ``model``, ``data``, ``parallel`` and
    ``trainer``; the splits are read as records of ``kind`` (``val`` is None
    without ``data.val``); the model is this rank's shard, its vocabulary
    checked against the tokenizer's.
    """
    setup(config.parallel, config.trainer)
    tokenizer = load_tokenizer_for(config.model, config.data)
    train = load_dataset_split(config.data.train, kind, tokenizer, config.data, attribute_names)
    val = None
    if config.data.val is not None:
        val = load_dataset_split(config.data.val, kind, tokenizer, config.data, attribute_names)
    model = build_model_from(
        config.model, num_value_outputs=num_value_outputs, tp=config.parallel.tp, pp=config.parallel.pp
    )
    check_vocab(tokenizer, model)
    return train, val, model


def make_loaders(config, train: EncodedDataset, val: EncodedDataset | None):
    """This rank's training loader (shuffled, resumable) and validation loader (in order, or None)."""
    loader_args = dict(
        global_batch_size=config.trainer.global_batch_size,
        micro_batch_size=config.trainer.micro_batch_size,
        seed=config.trainer.seed,
        data=config.data,
    )
    val_loader = None if val is None else make_loader(val, shuffle=False, drop_last=False, **loader_args)
    return make_loader(train, **loader_args), val_loader


def fit(config, model, forward_step, train_data, val_data=None):
    """Train ``model`` with the shared offline trainer on the run's sections; returns the fitted trainer."""
    from aligner.trainers.offline import OfflineTrainer

    trainer = OfflineTrainer(
        model,
        forward_step,
        train_data,
        trainer=config.trainer,
        optim=config.optim,
        checkpoint=config.checkpoint,
        logging=config.logging,
        val_data=val_data,
        run_config=config,
    )
    trainer.fit()
    return trainer
