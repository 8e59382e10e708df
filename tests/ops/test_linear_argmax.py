"""linear_argmax / linear_greedy against the float64 reference, on fresh random inputs.

Tolerances. The kernel sums each logit's H products in float32 (one FMA chain in order of the
hidden index), so a logit's error is bounded by ``gamma_H * sum_k |w_k x_k|`` with
``gamma_H = H u / (1 - H u)``, ``u = 2^-24`` (Higham, Accuracy and Stability, 3.1); the max logit
is held to that bound per row. The log-sum-exp adds the float32 rounding of the ``exp`` terms
and their sum (relative ``~V u`` of the sum in the worst case, far less in practice): it is held
to the logit bound plus ``1e-5`` absolute. The argmax is compared where the reference's two
largest logits differ by more than twice the bound (otherwise rounding may decide either way,
for any float32 implementation); the tests check that such rows are the great majority.
"""

import math

import pytest
import torch

from aligner import ops
from aligner.ops import reference
from aligner.ops.greedy import uses_fused_kernel

U32 = 2.0**-24
LSE_ATOL = 1e-5


def logit_bound(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per row: ``gamma_H * max_v sum_k |w_vk x_k|`` (float64), the float32 error bound of any logit of the row."""
    H = hidden.shape[-1]
    gamma = H * U32 / (1 - H * U32)
    return gamma * (hidden.double().abs() @ weight.double().abs().T).amax(dim=-1)


def check_against_reference(hidden: torch.Tensor, weight: torch.Tensor) -> int:
    """Asserts the op's outputs against the float64 reference; returns how many rows had a decided argmax."""
    tokens, best, lse = ops.linear_argmax(hidden, weight)
    ref_tokens, ref_best, ref_lse = reference.linear_argmax(hidden, weight)
    assert tokens.shape == best.shape == lse.shape == hidden.shape[:-1]
    assert tokens.dtype == torch.int64 and best.dtype == lse.dtype == torch.float32
    bound = logit_bound(hidden, weight).reshape(hidden.shape[:-1])
    assert ((best.double() - ref_best).abs() <= bound).all()
    assert ((lse.double() - ref_lse).abs() <= bound + LSE_ATOL).all()
    # the reported max is the logit of the reported token
    logits = hidden.double() @ weight.double().T
    assert ((logits.gather(-1, tokens[..., None]).squeeze(-1) - best.double()).abs() <= bound).all()
    if weight.shape[0] == 1:
        assert (tokens == 0).all()
        return tokens.numel()
    top2 = logits.topk(2, dim=-1).values
    decided = (top2[..., 0] - top2[..., 1]) > 2 * bound
    assert torch.equal(tokens[decided], ref_tokens[decided])
    _, logprobs = ops.linear_greedy(hidden, weight)
    ref_logprobs = torch.log_softmax(logits, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)
    assert ((logprobs.double() - ref_logprobs).abs() <= 2 * bound + LSE_ATOL).all()
    return int(decided.sum())


# (rows, hidden, vocab): one row / one vocabulary entry / tiny hidden; rows below, at and past a vector
# (8) and a tile's columns (16); vocabularies across the 64-row block and the 4096-row chunk; more than
# 64 columns (the kernel's heap buffer); the engine's decode step (32 x 256 against 32768)
SHAPES = [
    (1, 8, 1),
    (1, 1, 300),
    (1, 64, 5000),
    (3, 33, 4097),
    (8, 16, 64),
    (9, 40, 130),
    (16, 24, 8193),
    (17, 7, 4096),
    (32, 256, 32768),
    (70, 16, 9000),
]


@pytest.mark.parametrize("rows,hidden_size,vocab", SHAPES)
def test_matches_float64_reference(rows, hidden_size, vocab):
    hidden = torch.randn(rows, hidden_size)
    weight = torch.randn(vocab, hidden_size) / math.sqrt(hidden_size) * 4  # logits of std ~4: peaked rows
    assert uses_fused_kernel(hidden)
    decided = check_against_reference(hidden, weight)
    assert decided >= 0.8 * rows


def test_leading_dimensions_and_empty_inputs():
    hidden, weight = torch.randn(2, 3, 20), torch.randn(500, 20)
    tokens, logprobs = ops.linear_greedy(hidden, weight)
    flat_tokens, flat_logprobs = ops.linear_greedy(hidden.reshape(6, 20), weight)
    assert tokens.shape == (2, 3) and torch.equal(tokens.reshape(6), flat_tokens)
    assert torch.equal(logprobs.reshape(6), flat_logprobs)
    for empty in (torch.randn(0, 20), torch.randn(4, 0, 20)):
        tokens, best, lse = ops.linear_argmax(empty, weight)
        assert tokens.shape == best.shape == lse.shape == empty.shape[:-1]
    # H = 0: every logit is 0, the first token wins, lse = log V
    tokens, best, lse = ops.linear_argmax(torch.randn(3, 0), torch.randn(7, 0))
    assert tokens.tolist() == [0, 0, 0] and best.tolist() == [0.0] * 3
    torch.testing.assert_close(lse, torch.full((3,), math.log(7)))


def test_ties_go_to_the_first_index_across_tiles_blocks_and_chunks():
    hidden = torch.randn(5, 32)
    weight = torch.randn(9000, 32) * 0.01
    # the best row, copied to later positions: inside its tile (6 rows), its 64-row block, a later block,
    # a later 4096-row chunk; copies give bitwise equal logits (same products, same order)
    best = hidden.mean(0) * 3
    for position in (8999, 4096, 4095, 700, 101, 100):
        weight[position] = best
    tokens, top, _ = ops.linear_argmax(hidden, weight)
    logits = hidden @ weight.T
    for row in range(5):
        if logits[row].argmax() in (100, 101, 700, 4095, 4096, 8999):  # the planted row is this row's max
            assert tokens[row] == 100, (row, tokens[row])
    # all-equal logits: token 0 everywhere
    tokens, _, lse = ops.linear_argmax(torch.zeros(4, 32), torch.randn(5000, 32))
    assert tokens.tolist() == [0] * 4
    torch.testing.assert_close(lse, torch.full((4,), math.log(5000)))


def test_nan_wins_the_argmax_and_poisons_the_row_like_torch_argmax():
    hidden, weight = torch.randn(4, 16), torch.randn(6000, 16)
    weight[4500, 3] = float("nan")  # a NaN logit in every row, in the second chunk
    hidden[2, 0] = float("nan")  # every logit of row 2 NaN: its first, token 0
    tokens, best, lse = ops.linear_argmax(hidden, weight)
    expected = (hidden @ weight.T).argmax(-1)
    assert tokens.tolist() == expected.tolist() == [4500, 4500, 0, 4500]
    assert best.isnan().all() and lse.isnan().all()


def test_huge_logits_keep_a_finite_log_sum_exp():
    hidden = torch.randn(6, 64) * 1e4  # logits ~1e5: exp of them overflows, exp(l - max) does not
    weight = torch.randn(3000, 64)
    tokens, best, lse = ops.linear_argmax(hidden, weight)
    assert torch.isfinite(lse).all()
    check_against_reference(hidden, weight)


def test_weight_rows_sliced_in_place():
    """weight[:vocab] of a padded output layer is read through its row stride, without a copy."""
    hidden, padded = torch.randn(7, 48), torch.randn(1200, 48)
    padded[1000:] = 100.0  # padding rows that would win if read
    sliced = ops.linear_argmax(hidden, padded[:1000])
    copied = ops.linear_argmax(hidden, padded[:1000].clone())
    for got, want in zip(sliced, copied, strict=True):
        assert torch.equal(got, want)
    # a weight whose rows are not contiguous (a transposed view) is copied first
    strided = torch.randn(48, 1000).T
    for got, want in zip(
        ops.linear_argmax(hidden, strided), ops.linear_argmax(hidden, strided.contiguous()), strict=True
    ):
        assert torch.equal(got, want)


def test_result_does_not_depend_on_the_thread_count():
    hidden, weight = torch.randn(32, 64), torch.randn(20000, 64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.linear_argmax(hidden, weight)
        torch.set_num_threads(2)
        two = ops.linear_argmax(hidden, weight)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_dtypes_compose_torch_ops(dtype):
    """Not the fused kernel: F.linear in the input dtype, argmax over those logits, a float32 log-sum-exp."""
    hidden, weight = torch.randn(5, 32).to(dtype), (torch.randn(700, 32) / 2).to(dtype)
    assert not uses_fused_kernel(hidden)
    tokens, best, lse = ops.linear_argmax(hidden, weight)
    logits = hidden @ weight.T
    assert torch.equal(tokens, logits.argmax(-1))
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert best.dtype == lse.dtype == out_dtype
    torch.testing.assert_close(lse, logits.to(out_dtype).logsumexp(-1))
    _, logprobs = ops.linear_greedy(hidden, weight)
    expected = torch.log_softmax(logits.to(out_dtype), -1).gather(-1, tokens[:, None]).squeeze(-1)
    torch.testing.assert_close(logprobs, expected)


def test_bad_arguments_name_what_is_wrong():
    hidden, weight = torch.randn(3, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match=r"hidden must have shape \[\.\.\., 8\]"):
        ops.linear_argmax(torch.randn(3, 9), weight)
    with pytest.raises(TypeError, match="weight must have the dtype of hidden"):
        ops.linear_argmax(hidden, weight.double())
    with pytest.raises(TypeError, match="hidden must be a floating-point tensor"):
        ops.linear_argmax(hidden.long(), weight.long())
    with pytest.raises(ValueError, match="weight must be \\[vocab, hidden\\] with at least one row"):
        ops.linear_argmax(hidden, torch.randn(0, 8))
    with pytest.raises(ValueError, match="weight must be \\[vocab, hidden\\]"):
        ops.linear_argmax(hidden, torch.randn(80))
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        ops.linear_argmax(hidden, [[0.0] * 8])
    with pytest.raises(ValueError, match="is on meta"):
        ops.linear_argmax(hidden, weight.to("meta"))
    # the kernel's own checks, reached through torch.ops
    with pytest.raises(ValueError, match="weight \\[vocab, hidden\\] must have hidden size 8"):
        torch.ops.aligner.linear_argmax(hidden, torch.randn(10, 9))
    with pytest.raises(TypeError, match="float32"):
        torch.ops.aligner.linear_argmax(hidden.double(), weight.double())
