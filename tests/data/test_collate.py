"""Collation against hand-written expected tensors: the batch contract, key by key."""

import pytest
import torch

from aligner.data.collate import IGNORE_INDEX, collate, mismatched_sequence, padded_width, shifted_labels
from aligner.data.encode import (
    EncodedSequence,
    KTOExample,
    PreferenceExample,
    PromptExample,
    RegressionExample,
    SFTExample,
)

PAD = 0
X = IGNORE_INDEX


def sequence(prompt: list[int], response: list[int]) -> EncodedSequence:
    return EncodedSequence(prompt + response, [False] * len(prompt) + [True] * len(response), len(prompt))


# prompt tokens in the 10s, response tokens in the 20s/30s; PAD = 0
A = sequence([11, 12, 13], [21, 22])
B = sequence([14, 15], [31, 32, 33, 34])
C = sequence([16], [41])


def test_sft_batch():
    batch = collate([SFTExample(A, index=5), SFTExample(B, index=7)], pad_token_id=PAD)
    assert set(batch) == {"input_ids", "labels", "lengths", "index"}
    torch.testing.assert_close(batch["input_ids"], torch.tensor([[11, 12, 13, 21, 22, 0], [14, 15, 31, 32, 33, 34]]))
    # labels[t] = input_ids[t + 1] where t + 1 is a response token; -100 on prompt, padding and the last position
    torch.testing.assert_close(batch["labels"], torch.tensor([[X, X, 21, 22, X, X], [X, 31, 32, 33, 34, X]]))
    torch.testing.assert_close(batch["lengths"], torch.tensor([5, 6]))
    torch.testing.assert_close(batch["index"], torch.tensor([5, 7]))
    assert all(tensor.dtype == torch.long for tensor in batch.values())


def test_pad_to_multiple():
    batch = collate([SFTExample(A, 0), SFTExample(C, 1)], pad_token_id=PAD, pad_to_multiple_of=8)
    assert batch["input_ids"].shape == (2, 8)
    torch.testing.assert_close(batch["input_ids"][1], torch.tensor([16, 41, 0, 0, 0, 0, 0, 0]))
    torch.testing.assert_close(batch["labels"][1], torch.tensor([41, X, X, X, X, X, X, X]))
    assert padded_width([5, 8], 8) == 8 and padded_width([9], 8) == 16 and padded_width([9]) == 9


def test_multi_turn_labels():
    # prompt, trained turn, user turn, trained turn
    turns = EncodedSequence([1, 2, 3, 4, 5, 6, 7], [False, False, True, True, False, False, True], 2)
    assert shifted_labels(turns, 8) == [X, 3, 4, X, X, 7, X, X]


def test_preference_batch_orders_chosen_then_rejected():
    pairs = [
        PreferenceExample(chosen=A, rejected=B, index=3, chosen_reward=1.0, rejected_reward=0.0),
        PreferenceExample(chosen=C, rejected=A, index=4, chosen_reward=0.5, rejected_reward=0.25),
    ]
    batch = collate(pairs, pad_token_id=PAD)
    assert set(batch) == {"input_ids", "labels", "lengths", "index", "chosen_reward", "rejected_reward"}
    expected_rows = [[11, 12, 13, 21, 22, 0], [16, 41, 0, 0, 0, 0], [14, 15, 31, 32, 33, 34], [11, 12, 13, 21, 22, 0]]
    torch.testing.assert_close(batch["input_ids"], torch.tensor(expected_rows))
    expected_labels = [[X, X, 21, 22, X, X], [41, X, X, X, X, X], [X, 31, 32, 33, 34, X], [X, X, 21, 22, X, X]]
    torch.testing.assert_close(batch["labels"], torch.tensor(expected_labels))
    torch.testing.assert_close(batch["lengths"], torch.tensor([5, 2, 6, 5]))
    torch.testing.assert_close(batch["index"], torch.tensor([3, 4]))
    torch.testing.assert_close(batch["chosen_reward"], torch.tensor([1.0, 0.5]))
    torch.testing.assert_close(batch["rejected_reward"], torch.tensor([0.0, 0.25]))


def test_preference_rewards_absent_or_mixed():
    plain = [PreferenceExample(A, B, 0), PreferenceExample(B, C, 1)]
    assert "chosen_reward" not in collate(plain, pad_token_id=PAD)
    mixed = [PreferenceExample(A, B, 0, 1.0, 0.0), PreferenceExample(B, C, 1, origin="train.jsonl:2")]
    with pytest.raises(ValueError, match="^train.jsonl:2: a pair without chosen_reward"):
        collate(mixed, pad_token_id=PAD)


def test_regression_batch():
    examples = [RegressionExample(A, [4.0, -100.0], 2), RegressionExample(C, [0.0, 3.0], 9)]
    batch = collate(examples, pad_token_id=PAD)
    assert set(batch) == {"input_ids", "lengths", "attributes", "index"}
    torch.testing.assert_close(batch["input_ids"], torch.tensor([[11, 12, 13, 21, 22], [16, 41, 0, 0, 0]]))
    torch.testing.assert_close(batch["lengths"], torch.tensor([5, 2]))
    torch.testing.assert_close(batch["attributes"], torch.tensor([[4.0, -100.0], [0.0, 3.0]]))
    torch.testing.assert_close(batch["index"], torch.tensor([2, 9]))


def test_kto_batch_with_mismatched_pairs():
    examples = [KTOExample(A, True, 0), KTOExample(B, False, 1), KTOExample(C, True, 2)]
    batch = collate(examples, pad_token_id=PAD)
    assert set(batch) == {
        "input_ids", "labels", "lengths", "desirable", "kl_input_ids", "kl_labels", "kl_lengths", "index"
    }  # fmt: skip
    torch.testing.assert_close(batch["desirable"], torch.tensor([True, False, True]))
    # KL pairs: prompt i with response (i + 1) % 3
    expected_kl = [[11, 12, 13, 31, 32, 33, 34], [14, 15, 41, 0, 0, 0, 0], [16, 21, 22, 0, 0, 0, 0]]
    torch.testing.assert_close(batch["kl_input_ids"], torch.tensor(expected_kl))
    expected_kl_labels = [[X, X, 31, 32, 33, 34, X], [X, 41, X, X, X, X, X], [21, 22, X, X, X, X, X]]
    torch.testing.assert_close(batch["kl_labels"], torch.tensor(expected_kl_labels))
    torch.testing.assert_close(batch["kl_lengths"], torch.tensor([7, 3, 3]))
    torch.testing.assert_close(batch["lengths"], torch.tensor([5, 6, 2]))
    torch.testing.assert_close(batch["index"], torch.tensor([0, 1, 2]))


def test_kto_mismatched_pairs_respect_max_length():
    batch = collate([KTOExample(A, True, 0), KTOExample(B, False, 1)], pad_token_id=PAD, max_length=5)
    torch.testing.assert_close(batch["kl_input_ids"][0], torch.tensor([11, 12, 13, 31, 32]))
    torch.testing.assert_close(batch["kl_labels"][0], torch.tensor([X, X, 31, 32, X]))
    assert mismatched_sequence(A, A).input_ids == A.input_ids


def test_kto_single_example_pairs_with_itself():
    batch = collate([KTOExample(A, True, 0)], pad_token_id=PAD)
    torch.testing.assert_close(batch["kl_input_ids"], batch["input_ids"])
    torch.testing.assert_close(batch["kl_labels"], batch["labels"])


def test_prompt_batch():
    batch = collate([PromptExample([1, 2, 3], {"answer": 3}, 0), PromptExample([4], {}, 1)], pad_token_id=PAD)
    assert set(batch) == {"input_ids", "lengths", "index"}
    torch.testing.assert_close(batch["input_ids"], torch.tensor([[1, 2, 3], [4, 0, 0]]))
    torch.testing.assert_close(batch["lengths"], torch.tensor([3, 1]))


def test_collate_rejects_empty_and_mixed():
    with pytest.raises(ValueError, match="empty"):
        collate([], pad_token_id=PAD)
    with pytest.raises(TypeError, match="different kinds"):
        collate([SFTExample(A, 0), KTOExample(A, True, 1)], pad_token_id=PAD)


def test_labels_select_response_logprobs(tokenizer):
    """With real encodings, token_logprobs over the labels sums exactly the response tokens' log-probs."""
    from aligner.data.encode import encode_records
    from aligner.data.formats import read_rows
    from aligner.ops import token_logprobs

    rows = [{"input": "What is 3 + 5?", "output": "The answer is 8."}, {"input": "What is 1 + 1?", "output": "2"}]
    examples, _ = encode_records(read_rows(rows, "sft"), tokenizer, max_length=64)
    batch = collate(examples, pad_token_id=tokenizer.pad_token_id)
    logits = torch.randn(*batch["input_ids"].shape, len(tokenizer))
    logprobs = token_logprobs(logits, batch["labels"])
    for row, example in enumerate(examples):
        sequence = example.sequence
        expected = sum(
            torch.log_softmax(logits[row, position - 1], dim=-1)[sequence.input_ids[position]]
            for position in range(sequence.prompt_length, len(sequence))
        )
        torch.testing.assert_close(logprobs[row].sum(), expected)
        # the last trained label is the eos token, predicted at position lengths - 2
        assert batch["labels"][row, batch["lengths"][row] - 2] == tokenizer.eos_token_id
