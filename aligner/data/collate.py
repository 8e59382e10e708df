"""Encoded examples -> right-padded batch dicts of tensors (the batch contract).

Every sequence batch has ``input_ids`` LongTensor ``[B, S]`` padded on the right
with the pad token to the longest row (rounded up to ``pad_to_multiple_of``),
``labels`` ``[B, S]`` with ``labels[:, t] = input_ids[:, t + 1]`` where token
``t + 1`` is trained and ``-100`` elsewhere (prompt, padding, last position),
``lengths`` ``[B]`` (real tokens per row) and ``index`` ``[B]`` (dataset rows).

========== ================================================================
kind       keys
========== ================================================================
sft        input_ids, labels, lengths, index
preference input_ids [2B, S], labels [2B, S], lengths [2B] (rows 0..B-1
           chosen, B..2B-1 rejected, same prompt order), index [B];
           chosen_reward, rejected_reward float [B] when every pair has them
regression input_ids, lengths, attributes float [B, K] (-100.0 = missing), index
kto        input_ids, labels, lengths, desirable bool [B], kl_input_ids,
           kl_labels, kl_lengths (prompt i with response (i + 1) % B), index
rl_prompt  input_ids (prompts with the generation prompt), lengths, index
========== ================================================================
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from aligner.data.encode import (
    EncodedSequence,
    Example,
    KTOExample,
    PreferenceExample,
    PromptExample,
    RegressionExample,
    SFTExample,
)
from aligner.ops import IGNORE_INDEX

Batch = dict[str, torch.Tensor]


def to_device(batch: dict, device: torch.device) -> dict:
    """``batch`` with its tensors on ``device`` (other values as they are)."""
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def padded_width(lengths: Sequence[int], pad_to_multiple_of: int | None = None) -> int:
    """The longest length, rounded up to a multiple of ``pad_to_multiple_of`` when given."""
    width = max(lengths)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    return width


def shifted_labels(sequence: EncodedSequence, width: int) -> list[int]:
    """``labels[t] = input_ids[t + 1]`` where token ``t + 1`` is trained, ``-100`` elsewhere; padded to ``width``."""
    labels = [IGNORE_INDEX] * width
    for position in range(len(sequence) - 1):
        if sequence.loss_mask[position + 1]:
            labels[position] = sequence.input_ids[position + 1]
    return labels


def collate_sequences(
    sequences: Sequence[EncodedSequence], *, pad_token_id: int, pad_to_multiple_of: int | None = None
) -> Batch:
    """``input_ids``, ``labels`` and ``lengths`` for a list of sequences (shapes in the module docstring)."""
    lengths = [len(sequence) for sequence in sequences]
    width = padded_width(lengths, pad_to_multiple_of)
    input_ids = [sequence.input_ids + [pad_token_id] * (width - len(sequence)) for sequence in sequences]
    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "labels": torch.tensor([shifted_labels(sequence, width) for sequence in sequences], dtype=torch.long),
        "lengths": torch.tensor(lengths, dtype=torch.long),
    }


def collate_sft(examples: Sequence[SFTExample], *, pad_token_id: int, pad_to_multiple_of: int | None = None) -> Batch:
    """The "sft" batch: input_ids, labels, lengths, index."""
    batch = collate_sequences(
        [example.sequence for example in examples], pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of
    )
    batch["index"] = _index(examples)
    return batch


def collate_preference(
    examples: Sequence[PreferenceExample], *, pad_token_id: int, pad_to_multiple_of: int | None = None
) -> Batch:
    """The "preference" batch: chosen rows first, then rejected rows, padded together.

    Raises:
        ValueError: some pairs carry rewards and others do not.
    """
    sequences = [example.chosen for example in examples] + [example.rejected for example in examples]
    batch = collate_sequences(sequences, pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of)
    batch["index"] = _index(examples)
    with_rewards = [example.chosen_reward is not None for example in examples]
    if all(with_rewards):
        batch["chosen_reward"] = torch.tensor([example.chosen_reward for example in examples], dtype=torch.float32)
        batch["rejected_reward"] = torch.tensor([example.rejected_reward for example in examples], dtype=torch.float32)
    elif any(with_rewards):
        without = examples[with_rewards.index(False)].origin
        raise ValueError(f"{without}: a pair without chosen_reward/rejected_reward in a batch of pairs with them")
    return batch


def collate_regression(
    examples: Sequence[RegressionExample], *, pad_token_id: int, pad_to_multiple_of: int | None = None
) -> Batch:
    """The "regression" batch: input_ids, lengths, attributes ``[B, K]``, index (no labels)."""
    batch = collate_sequences(
        [example.sequence for example in examples], pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of
    )
    del batch["labels"]
    batch["attributes"] = torch.tensor([example.attributes for example in examples], dtype=torch.float32)
    batch["index"] = _index(examples)
    return batch


def mismatched_sequence(
    prompt_of: EncodedSequence, response_of: EncodedSequence, max_length: int | None = None
) -> EncodedSequence:
    """The prompt of one single-turn sequence followed by the response of another, cut to ``max_length``.

    Because prompt tokens are a prefix of the full conversation's tokens, the concatenation is what the
    chat template would give for that prompt and response.
    """
    prompt_length = prompt_of.prompt_length
    input_ids = prompt_of.input_ids[:prompt_length] + response_of.input_ids[response_of.prompt_length :]
    loss_mask = [False] * prompt_length + response_of.loss_mask[response_of.prompt_length :]
    if max_length is not None:
        input_ids, loss_mask = input_ids[:max_length], loss_mask[:max_length]
    return EncodedSequence(input_ids, loss_mask, prompt_length)


def collate_kto(
    examples: Sequence[KTOExample],
    *,
    pad_token_id: int,
    pad_to_multiple_of: int | None = None,
    max_length: int | None = None,
) -> Batch:
    """The "kto" batch, with ``kl_*`` tensors for the mismatched pairs (prompt i, response (i + 1) % B).

    ``max_length`` cuts the mismatched pairs (their prompts already fit, so a response token remains).
    With B = 1 the "mismatched" pair is the example itself.
    """
    sequences = [example.sequence for example in examples]
    batch = collate_sequences(sequences, pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of)
    batch["desirable"] = torch.tensor([example.desirable for example in examples], dtype=torch.bool)
    kl_sequences = [
        mismatched_sequence(sequences[i], sequences[(i + 1) % len(sequences)], max_length)
        for i in range(len(sequences))
    ]
    kl_batch = collate_sequences(kl_sequences, pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of)
    batch.update({f"kl_{name}": tensor for name, tensor in kl_batch.items()})
    batch["index"] = _index(examples)
    return batch


def collate_prompts(
    examples: Sequence[PromptExample], *, pad_token_id: int, pad_to_multiple_of: int | None = None
) -> Batch:
    """The "rl_prompt" batch: right-padded prompt ids, lengths, index (extra fields stay on the examples)."""
    lengths = [len(example.prompt_ids) for example in examples]
    width = padded_width(lengths, pad_to_multiple_of)
    input_ids = [example.prompt_ids + [pad_token_id] * (width - len(example.prompt_ids)) for example in examples]
    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "lengths": torch.tensor(lengths, dtype=torch.long),
        "index": _index(examples),
    }


def collate(
    examples: Sequence[Example],
    *,
    pad_token_id: int,
    pad_to_multiple_of: int | None = None,
    max_length: int | None = None,
) -> Batch:
    """Collate examples of one kind with the matching ``collate_*`` function.

    ``max_length`` only matters for KTO's mismatched pairs.

    Raises:
        ValueError: an empty list.
        TypeError: examples of mixed or unknown types.
    """
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    example_type = type(examples[0])
    if any(type(example) is not example_type for example in examples):
        raise TypeError("cannot collate examples of different kinds into one batch")
    if example_type is KTOExample:
        return collate_kto(
            examples, pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of, max_length=max_length
        )
    collate_fn = _COLLATE_FNS.get(example_type)
    if collate_fn is None:
        raise TypeError(f"no collate function for {example_type.__name__}")
    return collate_fn(examples, pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of)


def _index(examples: Sequence[Example]) -> torch.Tensor:
    return torch.tensor([example.index for example in examples], dtype=torch.long)


_COLLATE_FNS = {
    SFTExample: collate_sft,
    PreferenceExample: collate_preference,
    RegressionExample: collate_regression,
    PromptExample: collate_prompts,
}
