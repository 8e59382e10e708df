"""Vocab-parallel log-probs and entropy on 2 gloo ranks equal aligner.ops on the unsplit logits.

One pair of processes runs every case (spawning costs seconds); the parent builds
the inputs, the workers return what each rank computed, and the parent compares
against single-process references.
"""

import datetime
import os
import re
import secrets

import pytest
import torch
from distributed import run_distributed
from random_seed import SEED_ENV

from aligner import ops
from aligner.ops.linear import linear_token_logprobs
from aligner.parallel.vocab_parallel import (
    vocab_parallel_entropy,
    vocab_parallel_linear_token_logprobs,
    vocab_parallel_token_logprobs,
    vocab_parallel_token_logprobs_and_entropy,
)

WORLD = 2
SHARD_VOCAB = 11  # odd, so nothing lines up with the kernels' vector width
# fp32: the ranks' merged log-sum-exp and per-rank partial sums differ from the one-pass kernel's
# by summation order only: ~170 ulps of the largest element (values O(1), gradients up to O(10)).
FP32_REL = 2e-5
# bf16 gradients come back in bf16, and the linear head's grad_hidden is a bf16 sum of
# per-rank bf16 partials: allow a couple of roundings of the largest element.
BF16_GRAD_REL = 2**-6


def _labels_hitting_both_shards(shape, ignore_index):
    labels = torch.randint(0, WORLD * SHARD_VOCAB, shape)
    flat = labels.view(-1)
    flat[0], flat[1] = 0, SHARD_VOCAB - 1  # rank 0's first and last column
    flat[2], flat[3] = SHARD_VOCAB, WORLD * SHARD_VOCAB - 1  # rank 1's
    flat[4] = ignore_index
    return labels


def _logits_case(dtype, temperature, ignore_index, shape=(3, 5), with_masked_columns=False):
    logits = (3 * torch.randn(*shape, WORLD * SHARD_VOCAB)).to(dtype)
    grad_entropy = torch.randn(shape)
    if with_masked_columns:
        rows = logits.view(-1, WORLD * SHARD_VOCAB)
        rows[5, SHARD_VOCAB:] = float("-inf")  # no probability mass at all on rank 1
        rows[6, :3] = float("-inf")
        grad_entropy = 4 * torch.randn(shape)  # |g_ent| > 1 at -inf logits once gave NaN
    return {
        "kind": "logits",
        "logits": logits,
        "labels": _labels_hitting_both_shards(shape, ignore_index),
        "temperature": temperature,
        "ignore_index": ignore_index,
        "grad_logprobs": torch.randn(shape),
        "grad_entropy": grad_entropy,
    }


def _linear_case(dtype, rows, chunk_size, temperature):
    hidden_size = 8
    return {
        "kind": "linear",
        "hidden": torch.randn(rows, hidden_size).to(dtype),
        "weight": torch.randn(WORLD * SHARD_VOCAB, hidden_size).to(dtype),
        "labels": _labels_hitting_both_shards((rows,), -100),
        "temperature": temperature,
        "chunk_size": chunk_size,
        "grad_logprobs": torch.randn(rows),
        "grad_entropy": torch.randn(rows),
    }


def _uneven_linear_case(vocab, rows, chunk_size, temperature):
    """A real vocabulary of ``vocab`` ids in shards of SHARD_VOCAB padded rows, the padding sliced off.

    Rank r holds the real rows ``[r * SHARD_VOCAB, min((r + 1) * SHARD_VOCAB, vocab))``: with
    ``vocab <= SHARD_VOCAB`` rank 1 holds none (what megatron's padding to 128 * tp does to a small vocabulary).
    """
    hidden_size = 8
    labels = torch.randint(0, vocab, (rows,))
    labels[0], labels[1], labels[2] = 0, vocab - 1, -100
    labels[3] = min(SHARD_VOCAB, vocab - 1)  # rank 1's first row when it has one
    return {
        "kind": "linear_uneven",
        "vocab": vocab,
        "hidden": torch.randn(rows, hidden_size),
        "weight": torch.randn(vocab, hidden_size),
        "labels": labels,
        "temperature": temperature,
        "chunk_size": chunk_size,
        "grad_logprobs": torch.randn(rows),
        "grad_entropy": 4 * torch.randn(rows),
    }


def _uneven_rows(vocab, rank):
    start = rank * SHARD_VOCAB
    return slice(start, max(start, min(start + SHARD_VOCAB, vocab)))


CASES = {
    "fp32 T=0.7": lambda: _logits_case(torch.float32, 0.7, -100),
    "fp32 T=1 ignore_index inside the vocab": lambda: _logits_case(torch.float32, 1.0, SHARD_VOCAB + 2),
    "bf16 T=1.3": lambda: _logits_case(torch.bfloat16, 1.3, -100),
    "fp32 -inf columns, a rank without mass": lambda: _logits_case(torch.float32, 0.8, -100, with_masked_columns=True),
    "bf16 -inf columns, a rank without mass": lambda: _logits_case(torch.bfloat16, 1.0, -100, with_masked_columns=True),
    "fp32 leading dims [2, 3, 4]": lambda: _logits_case(torch.float32, 1.0, -100, shape=(2, 3, 4)),
    "linear fp32 chunk 4 of 13": lambda: _linear_case(torch.float32, 13, 4, 0.9),
    "linear bf16 default chunk": lambda: _linear_case(torch.bfloat16, 9, None, 1.0),
    "linear uneven: rank 1 has no real row": lambda: _uneven_linear_case(SHARD_VOCAB - 4, 13, 4, 0.8),
    "linear uneven: rank 1 has 3 real rows": lambda: _uneven_linear_case(SHARD_VOCAB + 3, 9, None, 1.0),
}


class _CollectiveCounter:
    """Counts this process's all_gather_single and all_reduce calls."""

    def __init__(self):
        import torch.distributed as dist

        self.calls = []
        for name in ("all_gather_single", "all_reduce"):
            original = getattr(dist, name)
            setattr(dist, name, self._wrap(name, original))

    def _wrap(self, name, original):
        def counted(*args, **kwargs):
            self.calls.append(name)
            return original(*args, **kwargs)

        return counted

    def take(self):
        calls, self.calls = self.calls, []
        return calls


def _shard(tensor, rank):
    return tensor[..., rank * SHARD_VOCAB : (rank + 1) * SHARD_VOCAB]


def _run_logits_case(case, rank, counter):
    kwargs = {"temperature": case["temperature"]}
    labels_kwargs = {**kwargs, "ignore_index": case["ignore_index"]}
    shard = _shard(case["logits"], rank).clone().requires_grad_()
    out = {}
    logprobs, entropy = vocab_parallel_token_logprobs_and_entropy(shard, case["labels"], **labels_kwargs)
    out["forward_calls"] = counter.take()
    loss = (logprobs * case["grad_logprobs"]).sum() + (entropy * case["grad_entropy"]).sum()
    (out["grad_fused"],) = torch.autograd.grad(loss, shard)
    out["backward_calls"] = counter.take()
    out["logprobs"], out["entropy"] = logprobs.detach(), entropy.detach()

    logprobs_only = vocab_parallel_token_logprobs(shard, case["labels"], **labels_kwargs)
    (out["grad_logprobs_only"],) = torch.autograd.grad((logprobs_only * case["grad_logprobs"]).sum(), shard)
    entropy_only = vocab_parallel_entropy(shard, **kwargs)
    (out["grad_entropy_only"],) = torch.autograd.grad((entropy_only * case["grad_entropy"]).sum(), shard)
    out["logprobs_only"], out["entropy_only"] = logprobs_only.detach(), entropy_only.detach()
    counter.take()
    return out


def _run_linear_case(case, rank, counter):
    hidden = case["hidden"].clone().requires_grad_()
    weight_shard = case["weight"][rank * SHARD_VOCAB : (rank + 1) * SHARD_VOCAB].clone().requires_grad_()
    logprobs, entropy = vocab_parallel_linear_token_logprobs(
        hidden,
        weight_shard,
        case["labels"],
        temperature=case["temperature"],
        chunk_size=case["chunk_size"],
        return_entropy=True,
    )
    out = {"forward_calls": counter.take()}
    loss = (logprobs * case["grad_logprobs"]).sum() + (entropy * case["grad_entropy"]).sum()
    out["grad_hidden"], out["grad_weight"] = torch.autograd.grad(loss, (hidden, weight_shard))
    out["backward_calls"] = counter.take()
    out["logprobs"], out["entropy"] = logprobs.detach(), entropy.detach()
    partial = vocab_parallel_linear_token_logprobs(
        hidden,
        weight_shard,
        case["labels"],
        temperature=case["temperature"],
        chunk_size=case["chunk_size"],
        all_reduce_grad_hidden=False,
    )
    (out["grad_hidden_partial"],) = torch.autograd.grad((partial * case["grad_logprobs"]).sum(), hidden)
    out["partial_backward_calls"] = counter.take()[1:]  # after the forward's all-gather
    return out


def _run_uneven_linear_case(case, rank, counter):
    hidden = case["hidden"].clone().requires_grad_()
    weight_shard = case["weight"][_uneven_rows(case["vocab"], rank)].clone().requires_grad_()
    logprobs, entropy = vocab_parallel_linear_token_logprobs(
        hidden,
        weight_shard,
        case["labels"],
        temperature=case["temperature"],
        chunk_size=case["chunk_size"],
        return_entropy=True,
        vocab_start=rank * SHARD_VOCAB,
        vocab_size=case["vocab"],
    )
    out = {"forward_calls": counter.take(), "shard_rows": weight_shard.shape[0]}
    loss = (logprobs * case["grad_logprobs"]).sum() + (entropy * case["grad_entropy"]).sum()
    out["grad_hidden"], out["grad_weight"] = torch.autograd.grad(loss, (hidden, weight_shard))
    out["backward_calls"] = counter.take()
    out["logprobs"], out["entropy"] = logprobs.detach(), entropy.detach()
    return out


def _run_bad_inputs(rank):
    """Each bad call must raise on every rank before any collective (else the other rank hangs)."""
    logits = torch.randn(4, SHARD_VOCAB)
    messages = {}
    bad_calls = {
        "label beyond the global vocab": lambda: vocab_parallel_token_logprobs(
            logits, torch.tensor([0, 1, WORLD * SHARD_VOCAB, 2])
        ),
        "labels of the wrong shape": lambda: vocab_parallel_token_logprobs(logits, torch.zeros(3, dtype=torch.long)),
        "float labels": lambda: vocab_parallel_token_logprobs(logits, torch.zeros(4)),
        "integer logits": lambda: vocab_parallel_entropy(torch.zeros(4, SHARD_VOCAB, dtype=torch.long)),
        "zero temperature": lambda: vocab_parallel_entropy(logits, temperature=0.0),
        "linear label beyond the global vocab": lambda: vocab_parallel_linear_token_logprobs(
            torch.randn(2, 3), torch.randn(SHARD_VOCAB, 3), torch.tensor([-1, 0])
        ),
        "linear label beyond vocab_size": lambda: vocab_parallel_linear_token_logprobs(
            torch.randn(2, 3),
            torch.randn(2, 3),
            torch.tensor([0, SHARD_VOCAB + 2]),
            vocab_start=rank * SHARD_VOCAB,
            vocab_size=SHARD_VOCAB + 2,
        ),
        "linear rows beyond vocab_size": lambda: vocab_parallel_linear_token_logprobs(
            torch.randn(2, 3), torch.randn(SHARD_VOCAB, 3), torch.tensor([0, 1]), vocab_start=1, vocab_size=SHARD_VOCAB
        ),
        "linear empty shard without vocab_size": lambda: vocab_parallel_linear_token_logprobs(
            torch.randn(2, 3), torch.randn(0, 3), torch.tensor([0, 1])
        ),
    }
    for name, call in bad_calls.items():
        try:
            call()
        except Exception as error:  # noqa: BLE001 - the parent checks the type
            messages[name] = (type(error).__name__, str(error))
    return messages


COMPILED_CASES = ("fp32 T=0.7", "linear fp32 chunk 4 of 13")


def _run_compiled(case, rank):
    """The fused op (or the LM-head variant) under torch.compile(fullgraph=True): outputs and grads."""
    if case["kind"] == "logits":
        inputs = (_shard(case["logits"], rank).clone().requires_grad_(),)

        def call(shard):
            return vocab_parallel_token_logprobs_and_entropy(
                shard, case["labels"], temperature=case["temperature"], ignore_index=case["ignore_index"]
            )

    else:
        weight_shard = case["weight"][rank * SHARD_VOCAB : (rank + 1) * SHARD_VOCAB]
        inputs = (case["hidden"].clone().requires_grad_(), weight_shard.clone().requires_grad_())

        def call(hidden, weight):
            return vocab_parallel_linear_token_logprobs(
                hidden,
                weight,
                case["labels"],
                temperature=case["temperature"],
                chunk_size=case["chunk_size"],
                return_entropy=True,
            )

    logprobs, entropy = torch.compile(call, backend="aot_eager", fullgraph=True)(*inputs)
    loss = (logprobs * case["grad_logprobs"]).sum() + (entropy * case["grad_entropy"]).sum()
    return {"logprobs": logprobs.detach(), "entropy": entropy.detach(), "grads": torch.autograd.grad(loss, inputs)}


def worker(cases):
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    compiled = {name: _run_compiled(cases[name], rank) for name in COMPILED_CASES}  # before the counter patches dist
    counter = _CollectiveCounter()
    try:
        results = {"compiled": compiled}
        runs = {"logits": _run_logits_case, "linear": _run_linear_case, "linear_uneven": _run_uneven_linear_case}
        for name, case in cases.items():
            results[name] = runs[case["kind"]](case, rank, counter)
        results["bad inputs"] = _run_bad_inputs(rank)
        return results
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks():
    seed = int(os.environ.get(SEED_ENV) or secrets.randbits(31))
    torch.manual_seed(seed)
    print(f"{SEED_ENV}={seed} (inputs of every two-rank case in {__name__})")
    cases = {name: make() for name, make in CASES.items()}
    return cases, run_distributed(worker, WORLD, args=(cases,), timeout_s=120)


def _assert_close(actual, expected, dtype, *, grad=False):
    if dtype == torch.bfloat16 and grad:
        scale = expected.float().abs().max().item()
        torch.testing.assert_close(actual.float(), expected.float(), rtol=0, atol=BF16_GRAD_REL * scale)
    else:
        scale = max(1.0, expected.double().abs().max().item()) if expected.numel() else 1.0
        torch.testing.assert_close(actual.double(), expected.double(), rtol=0, atol=FP32_REL * scale)


def _logits_reference(case):
    logits = case["logits"].clone().requires_grad_()
    kwargs = {"temperature": case["temperature"], "ignore_index": case["ignore_index"]}
    logprobs, entropy = ops.token_logprobs_and_entropy(logits, case["labels"], **kwargs)
    loss = (logprobs * case["grad_logprobs"]).sum() + (entropy * case["grad_entropy"]).sum()
    (grad_fused,) = torch.autograd.grad(loss, logits, retain_graph=True)
    (grad_logprobs,) = torch.autograd.grad((logprobs * case["grad_logprobs"]).sum(), logits, retain_graph=True)
    (grad_entropy,) = torch.autograd.grad((entropy * case["grad_entropy"]).sum(), logits)
    return {
        "logprobs": logprobs.detach(),
        "entropy": entropy.detach(),
        "grad_fused": grad_fused,
        "grad_logprobs_only": grad_logprobs,
        "grad_entropy_only": grad_entropy,
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name in CASES if not name.startswith("linear")])
def test_logits_shard_matches_single_rank(two_ranks, name):
    cases, results = two_ranks
    case = cases[name]
    dtype = case["logits"].dtype
    reference = _logits_reference(case)
    for rank, result in enumerate(results):
        got = result[name]
        _assert_close(got["logprobs"], reference["logprobs"], dtype)
        _assert_close(got["entropy"], reference["entropy"], dtype)
        torch.testing.assert_close(got["logprobs_only"], got["logprobs"], rtol=0, atol=0)
        torch.testing.assert_close(got["entropy_only"], got["entropy"], rtol=0, atol=0)
        for grad in ("grad_fused", "grad_logprobs_only", "grad_entropy_only"):
            assert got[grad].dtype == dtype
            _assert_close(got[grad], _shard(reference[grad], rank), dtype, grad=True)
    # Every rank combines the same gathered numbers in the same order.
    assert torch.equal(results[0][name]["logprobs"], results[1][name]["logprobs"])
    assert torch.equal(results[0][name]["entropy"], results[1][name]["entropy"])


@pytest.mark.slow
def test_one_all_gather_forward_and_no_collective_backward(two_ranks):
    _, results = two_ranks
    for result in results:
        assert result["fp32 T=0.7"]["forward_calls"] == ["all_gather_single"]
        assert result["fp32 T=0.7"]["backward_calls"] == []
        # The linear head adds the all-reduce of hidden's gradient, as ColumnParallelLinear does.
        assert result["linear fp32 chunk 4 of 13"]["forward_calls"] == ["all_gather_single"]
        assert result["linear fp32 chunk 4 of 13"]["backward_calls"] == ["all_reduce"]


@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name in CASES if name.startswith(("linear fp32", "linear bf16"))])
def test_linear_shard_matches_single_rank(two_ranks, name):
    cases, results = two_ranks
    case = cases[name]
    dtype = case["hidden"].dtype
    hidden = case["hidden"].clone().requires_grad_()
    weight = case["weight"].clone().requires_grad_()
    logprobs, entropy = linear_token_logprobs(
        hidden, weight, case["labels"], temperature=case["temperature"], chunk_size=5, return_entropy=True
    )
    loss = (logprobs * case["grad_logprobs"]).sum() + (entropy * case["grad_entropy"]).sum()
    grad_hidden, grad_weight = torch.autograd.grad(loss, (hidden, weight), retain_graph=True)
    for rank, result in enumerate(results):
        got = result[name]
        _assert_close(got["logprobs"], logprobs.detach(), dtype)
        _assert_close(got["entropy"], entropy.detach(), dtype)
        _assert_close(got["grad_hidden"], grad_hidden, dtype, grad=True)
        _assert_close(got["grad_weight"], grad_weight[rank * SHARD_VOCAB : (rank + 1) * SHARD_VOCAB], dtype, grad=True)
    assert torch.equal(results[0][name]["logprobs"], results[1][name]["logprobs"])
    # Without the all-reduce each rank keeps its vocabulary columns' share of hidden's gradient.
    (grad_hidden_logprobs_only,) = torch.autograd.grad((logprobs * case["grad_logprobs"]).sum(), hidden)
    partials = [result[name]["grad_hidden_partial"] for result in results]
    assert all(result[name]["partial_backward_calls"] == [] for result in results)
    _assert_close(partials[0].float() + partials[1].float(), grad_hidden_logprobs_only, dtype, grad=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name in CASES if name.startswith("linear uneven")])
def test_uneven_linear_shards_match_single_rank(two_ranks, name):
    """Real rows only per rank, down to none: the values and gradients of the unsplit head, never NaN."""
    cases, results = two_ranks
    case = cases[name]
    hidden = case["hidden"].clone().requires_grad_()
    weight = case["weight"].clone().requires_grad_()
    logprobs, entropy = linear_token_logprobs(
        hidden, weight, case["labels"], temperature=case["temperature"], chunk_size=5, return_entropy=True
    )
    loss = (logprobs * case["grad_logprobs"]).sum() + (entropy * case["grad_entropy"]).sum()
    grad_hidden, grad_weight = torch.autograd.grad(loss, (hidden, weight))
    assert [result[name]["shard_rows"] for result in results] == [
        _uneven_rows(case["vocab"], rank).stop - _uneven_rows(case["vocab"], rank).start for rank in range(WORLD)
    ]
    for rank, result in enumerate(results):
        got = result[name]
        for key in ("logprobs", "entropy", "grad_hidden", "grad_weight"):
            assert torch.isfinite(got[key]).all(), (rank, key)
        _assert_close(got["logprobs"], logprobs.detach(), torch.float32)
        _assert_close(got["entropy"], entropy.detach(), torch.float32)
        _assert_close(got["grad_hidden"], grad_hidden, torch.float32)
        _assert_close(got["grad_weight"], grad_weight[_uneven_rows(case["vocab"], rank)], torch.float32)
        # A rank without rows still joins both collectives.
        assert got["forward_calls"] == ["all_gather_single"] and got["backward_calls"] == ["all_reduce"]
    assert torch.equal(results[0][name]["logprobs"], results[1][name]["logprobs"])


@pytest.mark.slow
def test_bad_inputs_raise_on_every_rank(two_ranks):
    _, results = two_ranks
    expected = {
        "label beyond the global vocab": ("IndexError", "outside \\[0, 22\\)"),
        "labels of the wrong shape": ("ValueError", "labels must have shape"),
        "float labels": ("TypeError", "int64 or int32"),
        "integer logits": ("TypeError", "logits_shard must be a floating-point"),
        "zero temperature": ("ValueError", "temperature"),
        "linear label beyond the global vocab": ("IndexError", "value -1 at flat position 0"),
        "linear label beyond vocab_size": ("IndexError", f"value {SHARD_VOCAB + 2} at flat position 1.*vocab_size"),
        "linear rows beyond vocab_size": ("ValueError", f"\\[1, {SHARD_VOCAB + 1}\\) must lie in"),
        "linear empty shard without vocab_size": ("ValueError", "at least one vocabulary row"),
    }
    for result in results:
        for name, (error_type, pattern) in expected.items():
            got_type, message = result["bad inputs"][name]
            assert got_type == error_type, (name, message)
            assert re.search(pattern, message), (name, message)


def test_needs_an_initialized_process_group():
    if torch.distributed.is_initialized():
        pytest.skip("a process group exists in this process")
    with pytest.raises(RuntimeError, match="torch.distributed to be initialized"):
        vocab_parallel_entropy(torch.randn(2, 3))


@pytest.mark.slow
@pytest.mark.parametrize("name", COMPILED_CASES)
def test_compiled_fullgraph_matches_eager(two_ranks, name):
    _, results = two_ranks
    # The same kernels and collectives run compiled; only surrounding fp32 ops may be reordered.
    for result in results:
        compiled, eager = result["compiled"][name], result[name]
        torch.testing.assert_close(compiled["logprobs"], eager["logprobs"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(compiled["entropy"], eager["entropy"], atol=1e-5, rtol=1e-5)
        eager_grads = (eager["grad_fused"],) if "grad_fused" in eager else (eager["grad_hidden"], eager["grad_weight"])
        for got, want in zip(compiled["grads"], eager_grads, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
