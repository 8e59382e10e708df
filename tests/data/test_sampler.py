"""The global/micro batch sampler: DP disjointness, determinism, exact resume, length grouping."""

import random

import pytest

from aligner.data.sampler import GlobalBatchSampler


def rank_samplers(num_samples, dp_size, **options):
    return [GlobalBatchSampler(num_samples, dp_rank=rank, dp_size=dp_size, **options) for rank in range(dp_size)]


def flatten(micro_batches):
    return [index for micro_batch in micro_batches for index in micro_batch]


def test_dp_ranks_get_disjoint_parts_of_each_global_batch():
    samplers = rank_samplers(100, 4, global_batch_size=16, micro_batch_size=2, seed=3)
    steps = list(zip(*samplers, strict=True))
    assert len(steps) == 100 // 16
    seen = []
    for step, per_rank in enumerate(steps):
        for micro_batches in per_rank:
            assert len(micro_batches) == samplers[0].micro_batches_per_step == 2
            assert all(len(micro_batch) == 2 for micro_batch in micro_batches)
        indices = [index for micro_batches in per_rank for index in flatten(micro_batches)]
        assert len(set(indices)) == 16  # disjoint across ranks
        assert sorted(indices) == sorted(samplers[0].epoch_order(0)[16 * step : 16 * (step + 1)])
        seen += indices
    assert len(set(seen)) == len(seen) == 96  # nothing repeats within the epoch; the last 4 are dropped


def test_one_rank_equals_all_ranks_in_order():
    (single,) = rank_samplers(64, 1, global_batch_size=8, micro_batch_size=2, seed=1)
    ranks = rank_samplers(64, 2, global_batch_size=8, micro_batch_size=2, seed=1)
    for whole, *parts in zip(single, *ranks, strict=True):
        # rank r holds micro-batches r, r + dp, ... of the global batch
        interleaved = [micro_batch for pair in zip(*parts, strict=True) for micro_batch in pair]
        assert interleaved == whole


def test_deterministic_per_seed_and_epoch():
    def first_epochs(seed):
        sampler = GlobalBatchSampler(40, global_batch_size=8, micro_batch_size=4, seed=seed)
        return [list(sampler), list(sampler)]

    assert first_epochs(7) == first_epochs(7)
    assert first_epochs(7) != first_epochs(8)
    epoch0, epoch1 = first_epochs(7)
    assert epoch0 != epoch1
    assert sorted(flatten(sum(epoch0, []))) == sorted(flatten(sum(epoch1, []))) == list(range(40))


def test_no_shuffle_is_dataset_order():
    sampler = GlobalBatchSampler(8, global_batch_size=4, micro_batch_size=2, shuffle=False)
    assert list(sampler) == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]


@pytest.mark.parametrize("group_by_length", [False, True])
@pytest.mark.parametrize("stop_after", [1, 3, 5, 7])  # mid-epoch, at the epoch boundary (5) and past it
def test_resume_equals_uninterrupted(group_by_length, stop_after):
    lengths = [random.Random(0).randint(1, 50) for _ in range(43)]
    options = dict(global_batch_size=8, micro_batch_size=2, dp_rank=1, dp_size=2, seed=11, lengths=lengths)
    options["group_by_length"] = group_by_length

    def run(sampler, steps):
        batches = []
        while len(batches) < steps:
            for micro_batches in sampler:
                batches.append(micro_batches)
                if len(batches) == steps:
                    break
        return batches

    uninterrupted = run(GlobalBatchSampler(43, **options), 12)
    first = GlobalBatchSampler(43, **options)
    head = run(first, stop_after)
    state = first.state_dict()
    assert state == {"consumed_samples": 8 * stop_after}
    resumed = GlobalBatchSampler(43, **options)
    resumed.load_state_dict(state)
    assert head + run(resumed, 12 - stop_after) == uninterrupted


def test_drop_last_false_completes_the_last_batch():
    sampler = GlobalBatchSampler(10, global_batch_size=4, micro_batch_size=2, drop_last=False, seed=0)
    epoch = [flatten(micro_batches) for micro_batches in sampler]
    assert len(epoch) == len(sampler) == 3
    order = sampler.epoch_order(0)
    assert set(flatten(epoch)) == set(range(10))
    assert epoch[-1] == order[8:10] + order[:2]  # completed from the start of the epoch's order


def test_length_grouping_reduces_padding():
    rng = random.Random(0)
    lengths = [rng.choice([rng.randint(4, 12), rng.randint(40, 64)]) for _ in range(512)]

    def padded_tokens(group_by_length):
        sampler = GlobalBatchSampler(
            512, global_batch_size=32, micro_batch_size=4, dp_size=1, seed=5,
            lengths=lengths, group_by_length=group_by_length,
        )  # fmt: skip
        micro_batches = [micro_batch for step in sampler for micro_batch in step]
        assert sorted(flatten(micro_batches)) == list(range(512))  # still every sample once
        return sum(max(lengths[i] for i in micro_batch) * len(micro_batch) for micro_batch in micro_batches)

    real_tokens = sum(lengths)
    grouped, random_order = padded_tokens(True), padded_tokens(False)
    assert grouped - real_tokens < 0.25 * (random_order - real_tokens)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(global_batch_size=12, micro_batch_size=4, dp_size=2), r"divisible by micro_batch_size \* dp_size"),
        (dict(global_batch_size=8, micro_batch_size=2, dp_size=2, dp_rank=2), "dp_rank 2 is outside"),
        (dict(global_batch_size=128, micro_batch_size=2), "fewer than one global batch"),
        (dict(global_batch_size=8, micro_batch_size=2, group_by_length=True), "needs lengths"),
    ],
)
def test_invalid_configurations(options, message):
    with pytest.raises(ValueError, match=message):
        GlobalBatchSampler(100, **options)


def test_load_state_checks_batch_multiple():
    sampler = GlobalBatchSampler(100, global_batch_size=8, micro_batch_size=2)
    with pytest.raises(ValueError, match="not a multiple of global_batch_size 8"):
        sampler.load_state_dict({"consumed_samples": 12})
