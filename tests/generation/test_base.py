"""The engine contract (aligner.generation.base) and the refit buckets (aligner.generation.refit), in this process."""

import pytest
import torch

from aligner.generation.base import Engine, Rollouts, SamplingParams, StaleWeightsError
from aligner.generation.refit import bucket_named_tensors


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": 0.0}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"stop_strings": ["ok", ""]}, "stop_strings"),
    ],
)
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_greedy_ignores_the_sampling_knobs_and_lists_become_tuples():
    params = SamplingParams(greedy=True, temperature=0.0, top_p=0.0, stop_token_ids=[3, 4], stop_strings=["\n\n"])
    assert params.stop_token_ids == (3, 4) and params.stop_strings == ("\n\n",)
    hash(params)


def test_response_mask_follows_the_token_layout():
    # Row 0: prompt 2 + response 3 (S = 5); row 1: prompt 3 + response 1, then padding.
    rollouts = Rollouts(
        tokens=torch.tensor([[1, 2, 3, 4, 5], [1, 2, 3, 4, 0]]),
        prompt_lengths=torch.tensor([2, 3]),
        lengths=torch.tensor([5, 4]),
        is_end=torch.tensor([False, True]),
        stop_reason=["length", "eos"],
        logprobs=torch.zeros(2, 4),
        weights_version=0,
    )
    # logprobs[b, t - 1] scores tokens[b, t]: the response tokens are t = 2..4 and t = 3.
    assert rollouts.response_mask.tolist() == [[False, True, True, True], [False, False, True, False]]


class _VersionOnly(Engine):
    """The smallest engine: only a version, to test the contract's own logic."""

    def __init__(self, version: int):
        self._version = version
        self.calls: list[str] = []

    @property
    def version(self) -> int:
        return self._version

    def generate(self, prompts, sampling, *, expected_version=None):
        raise NotImplementedError

    def refit(self, source, version):
        raise NotImplementedError

    def refit_from_hf_buckets(self, buckets, version):
        raise NotImplementedError

    def sleep(self):
        self.calls.append("sleep")

    def wake(self):
        self.calls.append("wake")


def test_stale_weights_are_an_error_newer_ones_are_not():
    engine = _VersionOnly(5)
    engine.check_version(None)
    engine.check_version(5)
    engine.check_version(3)
    with pytest.raises(StaleWeightsError, match="version 5 but version 6 is required"):
        engine.check_version(6)


def test_awake_wakes_for_the_block_and_sleeps_after_it_even_on_error():
    engine = _VersionOnly(0)
    with engine.awake() as awake:
        assert awake is engine and engine.calls == ["wake"]
    assert engine.calls == ["wake", "sleep"]
    with pytest.raises(RuntimeError, match="boom"), engine.awake():
        raise RuntimeError("boom")
    assert engine.calls == ["wake", "sleep", "wake", "sleep"]


def test_cpu_moves_every_tensor_and_keeps_the_rest():
    rollouts = Rollouts(
        tokens=torch.tensor([[1, 2, 3]]),
        prompt_lengths=torch.tensor([1]),
        lengths=torch.tensor([3]),
        is_end=torch.tensor([True]),
        stop_reason=["eos"],
        logprobs=torch.tensor([[0.0, -0.5]]),
        weights_version=4,
        metrics={"generate_s": 0.1},
    )
    moved = rollouts.cpu()
    for name in ("tokens", "prompt_lengths", "lengths", "is_end", "logprobs"):
        assert getattr(moved, name).device.type == "cpu" and torch.equal(getattr(moved, name), getattr(rollouts, name))
    assert (moved.stop_reason, moved.weights_version, moved.metrics) == (["eos"], 4, {"generate_s": 0.1})


def test_buckets_are_bounded_and_keep_every_tensor_in_order():
    named = [(f"t{i}", torch.zeros(n, dtype=torch.float32)) for i, n in enumerate([3, 5, 1, 40, 2, 2, 7])]
    bound = 10 * 4  # bytes: ten float32 values
    buckets = list(bucket_named_tensors(named, bound))
    assert [name for bucket in buckets for name, _ in bucket] == [name for name, _ in named]
    for bucket in buckets:
        size = sum(t.numel() * 4 for _, t in bucket)
        assert size <= bound or len(bucket) == 1, "only a tensor larger than the bound may exceed it, alone"
    assert [len(bucket) for bucket in buckets] == [3, 1, 2, 1]
    with pytest.raises(ValueError, match="bucket_bytes"):
        list(bucket_named_tensors(named, 0))
