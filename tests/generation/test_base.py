"""The engine contract (aligner.generation.base) and the refit buckets (aligner.generation.refit), in this process."""

import pytest
import torch

from aligner.generation.base import (
    STOP_STRING_SLACK,
    Engine,
    Rollouts,
    SamplingParams,
    StaleWeightsError,
    ends_with_stop_string,
)
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


# --- stop strings: the tail of the text, as the whole text -------------------------------------------------------

# Byte-level pieces, as a byte-level BPE vocabulary holds them: empty ones (a tokenizer's decode may give a token
# no text), halves of multi-byte characters, pieces of the stop strings.
PIECES = [
    b"",
    b"",
    b"a",
    b"b",
    b"ab",
    b" ",
    b"\n",
    b"\n\n",
    b"</",
    b"answer",
    b">",
    "é".encode(),
    "é".encode()[:1],
    "é".encode()[1:],
    "€".encode()[:2],
    "€".encode()[2:],
    b"x" * 7,
]
STOPS = ["\n\n", "</answer>", "é", "€ab", "ab" * 12]


def byte_pieces_text(ids) -> str:
    return b"".join(PIECES[i] for i in ids).decode("utf-8", errors="replace")


def first_stop(ids, stops, detokenize, *, whole: bool) -> int | None:
    """The first prefix length whose text holds a stop string: by the whole text, or as the engines ask."""
    for end in range(1, len(ids) + 1):
        found = (
            any(s in detokenize(ids[:end]) for s in stops)
            if whole
            else ends_with_stop_string(ids[:end], stops, detokenize)
        )
        if found:
            return end
    return None


@pytest.mark.parametrize("empty_share", [0.0, 0.5, 0.8], ids=["no-empty", "half-empty", "mostly-empty"])
def test_a_stop_string_is_found_at_the_token_that_completes_it_as_in_the_whole_text(empty_share):
    found = 0
    for _ in range(300):
        weights = torch.ones(len(PIECES))
        weights[:2] = empty_share / (1 - empty_share) * (len(PIECES) - 2) / 2 if empty_share else 0.0
        ids = torch.multinomial(weights, 120, replacement=True).tolist()
        stops = [STOPS[i] for i in torch.randperm(len(STOPS))[: int(torch.randint(1, 4, ()))]]
        expected = first_stop(ids, stops, byte_pieces_text, whole=True)
        assert first_stop(ids, stops, byte_pieces_text, whole=False) == expected, (ids, stops)
        found += expected is not None
    assert found > 30  # the comparison covered stops found, not only responses without one
    # a stop string whose pieces lie far apart, empty tokens between them: found at its last piece
    ids = [8, *[0] * 40, 9, *[1] * 40, 10]  # "</", "answer", ">"
    assert first_stop(ids, ["</answer>"], byte_pieces_text, whole=False) == len(ids)


def test_a_stop_string_is_found_as_in_the_whole_text_with_a_trained_tokenizer(tmp_path):
    from aligner.data.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(tmp_path / "tokenizer")
    stops = ["\n\n", "answer is 1", "é", "Ā"]
    # the tokens of texts near the stop strings (multi-byte characters as byte tokens) and random ones
    texts = ["The answer is 12.", "\n", "\n\n", "é", "Ā€", " answer", " is", " 1"]
    pool = torch.tensor(sorted({i for text in texts for i in tokenizer(text)["input_ids"]}))
    found = 0
    for _ in range(100):
        ids = torch.where(
            torch.rand(80) < 0.8, pool[torch.randint(0, len(pool), (80,))], torch.randint(0, len(tokenizer), (80,))
        )
        ids = ids.tolist()
        expected = first_stop(ids, stops, tokenizer.decode, whole=True)
        assert first_stop(ids, stops, tokenizer.decode, whole=False) == expected, (ids, stops)
        found += expected is not None
    assert found > 30


def test_a_stop_string_check_decodes_a_bounded_tail():
    decoded = []

    def counting(ids) -> str:
        decoded.append(len(ids))
        return byte_pieces_text(ids)

    ids = [2, 3] * 1500  # "abab...", 3000 tokens
    stops = ["\n\n", "</answer>"]
    for end in range(1, len(ids) + 1):
        assert not ends_with_stop_string(ids[:end], stops, counting)
    # one-character tokens: the tail is the longest stop string and the slack, whatever the response's length
    assert max(decoded) == len("</answer>") + STOP_STRING_SLACK
    # mostly empty tokens: the tail doubles until it holds that many characters
    decoded.clear()
    ids = ([0] * 30 + [2]) * 40
    for end in range(1, len(ids) + 1):
        ends_with_stop_string(ids[:end], stops, counting)
    assert max(decoded) <= 2 * 31 * (len("</answer>") + STOP_STRING_SLACK)
    assert ends_with_stop_string([], stops, counting) is False and ends_with_stop_string([7], [], counting) is False
