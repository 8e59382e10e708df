"""A deterministic, resumable, data-parallel batch sampler.

Each optimizer step consumes one global batch of ``global_batch_size`` (G) dataset
indices, cut into ``G / micro_batch_size`` micro-batches of M. Micro-batch ``j``
of data-parallel rank ``r`` is chunk ``j * dp_size + r`` of the global batch, so
the ranks see disjoint parts of every global batch, each rank does
``G / (M * dp_size)`` gradient-accumulation steps, and (with length grouping)
the ranks' micro-batches at the same step have similar lengths.

Order: a fresh permutation per epoch from ``(seed, epoch)``. With
``group_by_length`` the permutation is cut into mega-batches of
``length_group_size`` global batches, each sorted by length (longest first) and
cut into global batches, and then the epoch's global batches are shuffled: rows
of similar length share a batch, which cuts padding.

``drop_last=True`` drops the epoch's incomplete final global batch;
``drop_last=False`` completes it with indices from the start of the epoch's
order, so every index is seen at least once per epoch and batches keep their shape.

The whole state is ``consumed_samples`` (global, summed over ranks, counted when a
batch is handed out): ``load_state_dict`` resumes exactly where a run stopped,
mid-epoch included.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch


class GlobalBatchSampler:
    """Yields, per global step, this rank's micro-batches as lists of dataset indices.

    Args:
        num_samples: dataset size.
        global_batch_size: G, samples per optimizer step over all data-parallel ranks.
        micro_batch_size: M, samples per forward/backward on one rank.
        dp_rank: this rank's data-parallel index.
        dp_size: data-parallel world size.
        seed: shuffling seed (the epoch is mixed in).
        shuffle: shuffle per epoch; otherwise dataset order.
        drop_last: drop (True) or complete (False) the last incomplete global batch.
        lengths: per-sample lengths, needed by ``group_by_length``.
        group_by_length: group similar lengths into batches (module docstring).
        length_group_size: global batches per mega-batch for ``group_by_length``.

    Raises:
        ValueError: G not divisible by ``M * dp_size``, a bad rank, a dataset smaller than one
            global batch under ``drop_last``, or ``group_by_length`` without matching ``lengths``.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        lengths: Sequence[int] | None = None,
        group_by_length: bool = False,
        length_group_size: int = 8,
    ) -> None:
        if min(global_batch_size, micro_batch_size, dp_size, length_group_size) < 1:
            raise ValueError("global_batch_size, micro_batch_size, dp_size and length_group_size must be >= 1")
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(
                f"global_batch_size {global_batch_size} must be divisible by micro_batch_size * dp_size = "
                f"{micro_batch_size} * {dp_size} = {micro_batch_size * dp_size}"
            )
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is outside [0, dp_size={dp_size})")
        if num_samples < 1 or (drop_last and num_samples < global_batch_size):
            raise ValueError(
                f"the dataset has {num_samples} samples, fewer than one global batch of {global_batch_size}; "
                "lower trainer.global_batch_size or give more data"
            )
        if group_by_length and (lengths is None or len(lengths) != num_samples):
            raise ValueError(f"group_by_length needs lengths for all {num_samples} samples")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.lengths = None if lengths is None else list(lengths)
        self.group_by_length = group_by_length
        self.length_group_size = length_group_size
        self.consumed_samples = 0
        self._cached_epoch: tuple[int, list[int]] | None = None

    @property
    def steps_per_epoch(self) -> int:
        """Global batches per epoch."""
        if self.drop_last:
            return self.num_samples // self.global_batch_size
        return -(-self.num_samples // self.global_batch_size)

    @property
    def samples_per_epoch(self) -> int:
        """Samples consumed per epoch (over all ranks)."""
        return self.steps_per_epoch * self.global_batch_size

    @property
    def epoch(self) -> int:
        """The epoch the next global batch belongs to."""
        return self.consumed_samples // self.samples_per_epoch

    @property
    def micro_batches_per_step(self) -> int:
        """Gradient-accumulation steps per global batch on each rank."""
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[list[list[int]]]:
        """This rank's micro-batches for each remaining global batch of the current epoch."""
        epoch = self.epoch
        order = self.epoch_order(epoch)
        start = self.consumed_samples - epoch * self.samples_per_epoch
        for batch_start in range(start, self.samples_per_epoch, self.global_batch_size):
            global_batch = order[batch_start : batch_start + self.global_batch_size]
            self.consumed_samples += self.global_batch_size
            yield self.rank_micro_batches(global_batch)

    def rank_micro_batches(self, global_batch: Sequence[int]) -> list[list[int]]:
        """This rank's micro-batches of one global batch: chunks ``dp_rank, dp_rank + dp_size, ...`` of size M."""
        size = self.micro_batch_size
        chunks = [list(global_batch[start : start + size]) for start in range(0, len(global_batch), size)]
        return chunks[self.dp_rank :: self.dp_size]

    def epoch_order(self, epoch: int) -> list[int]:
        """All ``samples_per_epoch`` indices of ``epoch`` in the order they are consumed (same on every rank)."""
        if self._cached_epoch is not None and self._cached_epoch[0] == epoch:
            return self._cached_epoch[1]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        order = (order * -(-self.samples_per_epoch // self.num_samples))[: self.samples_per_epoch]
        if self.group_by_length:
            order = self._group_by_length(order, generator)
        self._cached_epoch = (epoch, order)
        return order

    def _group_by_length(self, order: list[int], generator: torch.Generator) -> list[int]:
        """Sort each mega-batch by length (longest first), then shuffle the resulting global batches."""
        size = self.global_batch_size
        mega = size * self.length_group_size
        grouped: list[int] = []
        for start in range(0, len(order), mega):
            # Python's sort is stable, so equal lengths keep their random order.
            grouped.extend(sorted(order[start : start + mega], key=lambda index: -self.lengths[index]))
        batches = [grouped[start : start + size] for start in range(0, len(grouped), size)]
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return [index for batch in batches for index in batch]

    def state_dict(self) -> dict[str, int]:
        """``{"consumed_samples": n}``: the global samples handed out so far."""
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume from :meth:`state_dict`.

        Raises:
            ValueError: ``consumed_samples`` is not a whole number of global batches.
        """
        consumed = int(state["consumed_samples"])
        if consumed < 0 or consumed % self.global_batch_size:
            raise ValueError(
                f"consumed_samples {consumed} is not a multiple of global_batch_size {self.global_batch_size}; "
                "was the checkpoint written with another batch size?"
            )
        self.consumed_samples = consumed
