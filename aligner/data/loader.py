"""The training loader: per global step, this rank's list of collated micro-batches."""

from __future__ import annotations

from collections.abc import Iterator

from aligner.data.collate import Batch, collate
from aligner.data.dataset import EncodedDataset
from aligner.data.sampler import GlobalBatchSampler


class GlobalBatchLoader:
    """Iterates one epoch (from the sampler's position on) of ``list[Batch]``, one dict per micro-batch.

    Composes an :class:`~aligner.data.dataset.EncodedDataset`, a
    :class:`~aligner.data.sampler.GlobalBatchSampler` and :func:`~aligner.data.collate.collate`;
    its state is the sampler's (``consumed_samples``), so saving it with a checkpoint resumes
    the data stream exactly.

    Args:
        dataset: the encoded examples.
        sampler: decides which indices this rank gets per step.
        pad_to_multiple_of: round each batch's padded width up to this multiple.
    """

    def __init__(
        self, dataset: EncodedDataset, sampler: GlobalBatchSampler, *, pad_to_multiple_of: int | None = None
    ) -> None:
        if sampler.num_samples != len(dataset):
            raise ValueError(f"the sampler covers {sampler.num_samples} samples but the dataset has {len(dataset)}")
        self.dataset = dataset
        self.sampler = sampler
        self.pad_to_multiple_of = pad_to_multiple_of

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[Batch]]:
        for micro_batches in self.sampler:
            yield [
                collate(
                    [self.dataset[index] for index in indices],
                    pad_token_id=self.dataset.pad_token_id,
                    pad_to_multiple_of=self.pad_to_multiple_of,
                    max_length=self.dataset.max_length,
                )
                for indices in micro_batches
            ]

    def state_dict(self) -> dict[str, int]:
        """The sampler's state."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume the sampler."""
        self.sampler.load_state_dict(state)
