"""Frozen-model passes: sequence log-probs of a frozen model (a reference policy), per step or precomputed.

Every pass runs the forward-only pipeline schedule (:func:`aligner.models.schedule.forward_only`)
through the fused LM head (:mod:`aligner.models.lm_head`), so it works at any
tensor/pipeline/data-parallel layout and never holds ``[batch, seq, vocab]`` logits;
the values land on the last pipeline stage, where losses are computed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from megatron.core import parallel_state

from aligner.data import EncodedDataset, GlobalBatchLoader, collate
from aligner.models.lm_head import lm_hidden_states, lm_token_logprobs
from aligner.models.schedule import CollectStep, forward_only
from aligner.parallel import gather_over_data_parallel


def sequence_logprobs_step(input_key: str = "input_ids", labels_key: str = "labels") -> CollectStep:
    """A forward-only step collecting ``[rows]`` float32 sums of each row's token log-probs of ``batch[labels_key]``."""

    def step(batch, model):
        hidden = lm_hidden_states(model, batch[input_key])

        def collect(hidden):
            return lm_token_logprobs(model, hidden, batch[labels_key]).sum(dim=-1).float()

        return hidden, collect

    return step


def frozen_sequence_logprobs(
    model: torch.nn.Module, micro_batches: list[dict], *, input_key: str = "input_ids", labels_key: str = "labels"
) -> list[torch.Tensor] | None:
    """Per micro-batch, the ``[rows]`` summed log-probs of ``batch[labels_key]`` under ``model``, without gradient.

    Returns the list on the last pipeline stage, None on the others.
    """
    return forward_only(model, micro_batches, sequence_logprobs_step(input_key, labels_key))


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

    def __iter__(self) -> Iterator[list[dict]]:
        for micro_batches in self.loader:
            yield self.annotate(micro_batches)

    def state_dict(self) -> dict[str, int]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.loader.load_state_dict(state)


def with_reference_model(loader: GlobalBatchLoader, reference_model: torch.nn.Module) -> Annotated:
    """``loader`` whose micro-batches also carry ``ref_logps`` from ``reference_model``, computed step by step.

    ``ref_logps`` (``[rows]`` sums of ``labels``' log-probs of ``input_ids``) is set
    on the last pipeline stage.
    """

    def annotate(micro_batches: list[dict]) -> list[dict]:
        sums = frozen_sequence_logprobs(reference_model, micro_batches)
        if sums is None:
            return micro_batches
        return [{**batch, "ref_logps": ref} for batch, ref in zip(micro_batches, sums, strict=True)]

    return Annotated(loader, annotate)


def with_reference_table(loader: GlobalBatchLoader, table: torch.Tensor) -> Annotated:
    """``loader`` whose micro-batches also carry ``ref_logps`` looked up in ``table`` by their ``index``.

    ``ref_logps`` follows the batch's row layout: ``[2B]`` (chosen rows, then
    rejected rows) for preference batches, ``[B]`` otherwise.
    """

    def annotate(micro_batches: list[dict]) -> list[dict]:
        return [{**batch, "ref_logps": table[batch["index"]].T.reshape(-1)} for batch in micro_batches]

    return Annotated(loader, annotate)


@torch.no_grad()
def precompute_sequence_logprobs(
    model: torch.nn.Module, dataset: EncodedDataset, *, micro_batch_size: int, pad_to_multiple_of: int | None
) -> torch.Tensor:
    """Summed log-probs of every trained sequence of ``dataset`` under ``model``, by dataset index.

    Runs the dataset in order, in micro-batches of ``micro_batch_size``, which the
    data-parallel replicas share out round-robin (each computes 1/dp of the table,
    whose rows are then exchanged: one all-gather of ``len(dataset) * R`` floats).
    The micro-batches are the same at every data-parallel size, so the table is too.
    ``model`` is put in eval mode.

    Returns:
        ``[len(dataset), R]`` float32 on the CPU on every rank, ``R`` the rows per
        example (2 for a preference pair: chosen, rejected; 1 otherwise).
    """
    starts = range(0, len(dataset), micro_batch_size)

    def micro_batch(number: int) -> dict:
        stop = min(starts[number] + micro_batch_size, len(dataset))
        examples = [dataset[i] for i in range(starts[number], stop)]
        return collate(
            examples,
            pad_token_id=dataset.pad_token_id,
            pad_to_multiple_of=pad_to_multiple_of,
            max_length=dataset.max_length,
        )

    model.eval()
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    numbers = list(range(dp_rank, len(starts), dp_size))
    batches = [micro_batch(number) for number in numbers]
    sums = frozen_sequence_logprobs(model, batches) if batches else None
    rows: dict[int, torch.Tensor] = {}  # micro-batch number -> [B, R], on the last pipeline stage
    if sums is not None:
        for number, batch, batch_sums in zip(numbers, batches, sums, strict=True):
            rows[number] = batch_sums.view(-1, batch["index"].shape[0]).T.cpu()  # [B, R]: chosen then rejected rows
    # the replicas of one pipeline stage exchange their rows
    rows = {number: part for share in gather_over_data_parallel(rows) for number, part in share.items()}
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
