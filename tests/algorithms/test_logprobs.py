"""sequence_logprobs (single process and vocab-parallel on 2 gloo ranks) and last_token_values."""

import datetime

import pytest
import torch
from distributed import run_distributed
from torch.testing import assert_close

from aligner.algorithms.logprobs import last_token_values, sequence_logprobs

# fp32 logits of magnitude ~3 (/ T = 0.7) over <= 14 columns: the log-sum-exp (up to ~20) and the label's
# scaled logit each carry a few fp32 roundoffs (2^-24 relative, ~1e-6 absolute at 20).
FP32_ATOL = 2e-5
# float64 logits: the kernel and log_softmax agree to a few float64 ulps.
FP64_ATOL = 1e-12
# Hand-worked numbers below are written to 6 decimals.
HAND_TOL = 5e-7
TP = 2
SHARD_VOCAB = 7  # padded vocabulary 14 over 2 ranks


def _reference(logits, labels, vocab_size, temperature):
    """float64 log_softmax over the real columns, gathered at the labels; 0 where label == -100."""
    real = logits.double()[..., :vocab_size] / temperature
    logps = torch.log_softmax(real, dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(labels == -100, 0.0, logps)


def _labels(batch, seq, vocab_size):
    labels = torch.randint(0, vocab_size, (batch, seq))
    labels[torch.rand(batch, seq) < 0.3] = -100
    labels[0, -1] = -100  # the last position never predicts a trained token
    labels[0, 0] = vocab_size - 1  # the highest real id
    return labels


def test_hand_worked_padded_column_gets_no_mass():
    # vocab_size 2, padded to 3: logits [0, 0, 100] -> the padded column (100) is masked,
    # so each real token has probability 1/2: log-prob -log 2 = -0.693147.
    logits = torch.tensor([[[0.0, 0.0, 100.0], [0.0, 0.0, 100.0]]])
    labels = torch.tensor([[1, -100]])
    token_logps, sums, counts = sequence_logprobs(logits, labels, vocab_size=2)
    assert_close(token_logps, torch.tensor([[-0.693147, 0.0]]), atol=HAND_TOL, rtol=0)
    assert_close(sums, torch.tensor([-0.693147]), atol=HAND_TOL, rtol=0)
    assert counts.tolist() == [1] and counts.dtype == torch.int64


@pytest.mark.parametrize(
    ("dtype", "atol"), [(torch.float32, FP32_ATOL), (torch.float64, FP64_ATOL)], ids=["fp32", "fp64"]
)
@pytest.mark.parametrize(("vocab_size", "temperature"), [(13, 1.0), (10, 0.7)], ids=["unpadded", "padded T=0.7"])
def test_matches_log_softmax_gather(dtype, atol, vocab_size, temperature):
    batch, seq, padded = 3, 6, 13
    logits = (3 * torch.randn(batch, seq, padded)).to(dtype).requires_grad_()
    labels = _labels(batch, seq, vocab_size)
    token_logps, sums, counts = sequence_logprobs(logits, labels, vocab_size=vocab_size, temperature=temperature)
    expected = _reference(logits.detach(), labels, vocab_size, temperature)
    assert_close(token_logps, expected.to(token_logps.dtype), atol=atol, rtol=0)
    assert_close(sums, expected.sum(-1).to(sums.dtype), atol=seq * atol, rtol=0)
    assert torch.equal(counts, (labels != -100).sum(-1))

    weights = torch.randn(batch, seq, dtype=torch.float64)
    (grad,) = torch.autograd.grad((token_logps.double() * weights).sum(), logits)
    reference_logits = logits.detach().double().requires_grad_()
    (expected_grad,) = torch.autograd.grad(
        (_reference(reference_logits, labels, vocab_size, temperature) * weights).sum(), reference_logits
    )
    assert_close(grad.double(), expected_grad, atol=atol, rtol=0)
    assert torch.equal(grad[..., vocab_size:], torch.zeros_like(grad[..., vocab_size:]))


def test_gradcheck():
    logits = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    labels = _labels(2, 3, 5)
    assert torch.autograd.gradcheck(lambda x: sequence_logprobs(x, labels, vocab_size=5)[1], (logits,))


def test_bad_arguments():
    logits = torch.randn(2, 3, 8)
    with pytest.raises(IndexError, match="padding-vocabulary id"):
        sequence_logprobs(logits, torch.full((2, 3), 6), vocab_size=6)
    with pytest.raises(ValueError, match=r"vocab_size must be in \[1, 8\]"):
        sequence_logprobs(logits, torch.zeros(2, 3, dtype=torch.long), vocab_size=9)
    with pytest.raises(ValueError, match="labels must have shape"):
        sequence_logprobs(logits, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"logits must be \[batch, seq, vocab\]"):
        sequence_logprobs(logits[0], torch.zeros(3, dtype=torch.long))


def test_last_token_values():
    # lengths [3, 1] -> row 0 reads position 2, row 1 position 0
    values = torch.arange(2 * 4 * 2, dtype=torch.float32).view(2, 4, 2).requires_grad_()
    out = last_token_values(values, torch.tensor([3, 1]))
    assert out.tolist() == [[4.0, 5.0], [8.0, 9.0]]
    out.sum().backward()
    expected_grad = torch.zeros(2, 4, 2)
    expected_grad[0, 2] = expected_grad[1, 0] = 1.0
    assert torch.equal(values.grad, expected_grad)
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 4\]"):
        last_token_values(values, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 4\]"):
        last_token_values(values, torch.tensor([5, 2]))
    with pytest.raises(ValueError, match="lengths must be an integer tensor of shape"):
        last_token_values(values, torch.tensor([2.0, 2.0]))
    with pytest.raises(ValueError, match=r"values must be \[batch, seq, outputs\]"):
        last_token_values(values[0], torch.tensor([1]))


def _vocab_parallel_worker(cases):
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    try:
        results = {}
        for name, case in cases.items():
            shard = case["logits"][..., rank * SHARD_VOCAB : (rank + 1) * SHARD_VOCAB].clone().requires_grad_()
            token_logps, sums, counts = sequence_logprobs(
                shard,
                case["labels"],
                vocab_size=case["vocab_size"],
                tp_group=dist.group.WORLD,
                temperature=case["temperature"],
            )
            (grad,) = torch.autograd.grad((token_logps * case["weights"]).sum(), shard)
            results[name] = {"token_logps": token_logps.detach(), "sums": sums.detach(), "counts": counts, "grad": grad}
        try:  # must raise on every rank before any collective, or the other rank would hang
            sequence_logprobs(
                torch.randn(1, 2, SHARD_VOCAB),
                torch.tensor([[TP * SHARD_VOCAB - 1, 0]]),
                vocab_size=11,
                tp_group=dist.group.WORLD,
            )
            results["padding label error"] = None
        except IndexError as error:
            results["padding label error"] = str(error)
        return results
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_vocab_parallel_matches_full_vocab():
    batch, seq = 3, 5
    cases = {}
    for name, vocab_size, temperature in (("padded 11 of 14, T=0.8", 11, 0.8), ("unpadded 14", 14, 1.0)):
        cases[name] = {
            "logits": 3 * torch.randn(batch, seq, TP * SHARD_VOCAB),
            "labels": _labels(batch, seq, vocab_size),
            "vocab_size": vocab_size,
            "temperature": temperature,
            "weights": torch.randn(batch, seq),
        }
    cases["padded 11 of 14, T=0.8"]["labels"][1, 1] = SHARD_VOCAB - 1  # rank 0's last column
    cases["padded 11 of 14, T=0.8"]["labels"][1, 2] = SHARD_VOCAB  # rank 1's first column
    per_rank = run_distributed(_vocab_parallel_worker, TP, args=(cases,))
    for name, case in cases.items():
        logits = case["logits"].double().requires_grad_()
        expected = _reference(logits, case["labels"], case["vocab_size"], case["temperature"])
        (expected_grad,) = torch.autograd.grad((expected * case["weights"].double()).sum(), logits)
        for rank, results in enumerate(per_rank):
            got = results[name]
            assert_close(
                got["token_logps"].double(), expected.detach(), atol=FP32_ATOL, rtol=0, msg=f"{name} rank {rank}"
            )
            assert_close(got["sums"].double(), expected.detach().sum(-1), atol=seq * FP32_ATOL, rtol=0)
            assert torch.equal(got["counts"], (case["labels"] != -100).sum(-1))
            grad_shard = expected_grad[..., rank * SHARD_VOCAB : (rank + 1) * SHARD_VOCAB]
            assert_close(got["grad"].double(), grad_shard, atol=FP32_ATOL, rtol=0, msg=f"{name} rank {rank} grad")
        assert torch.equal(per_rank[0][name]["token_logps"], per_rank[1][name]["token_logps"])
    for results in per_rank:
        assert results["padding label error"] is not None and "padding-vocabulary id" in results["padding label error"]
