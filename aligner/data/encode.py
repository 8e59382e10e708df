"""Records -> token ids through the tokenizer's chat template, with a trained-token mask.

How a conversation is split: for each trained assistant turn ``k`` the encoder
renders ``messages[:k]`` with ``add_generation_prompt=True`` (the prompt) and
``messages[:k + 1]`` (prompt plus turn); both must tokenize to exact prefixes of
the whole conversation's tokens, otherwise the template is rejected with an error
(no guessing). The trained tokens of turn ``k`` run from the end of its prompt
through the last end-of-turn token of its rendering; tokens a template adds after
it (such as a newline) stay untrained. The end-of-turn token is ``eos_token``, or
the special token the template closes an assistant turn with when that is another
one (ChatML's ``<|im_end|>`` on a base tokenizer whose eos is ``<|endoftext|>``),
or the one named by ``end_of_turn_token``. A template that ends assistant turns
with none of them is an error, since the model would never learn to stop.

Already-templated prompts (NeMo-Aligner's ``<extra_id_0>System ... <extra_id_1>User
... <extra_id_1>Assistant``, or text holding ChatML / Llama-3 / Mistral / Gemma turn
markers) are not templated a second time: such a single-turn prompt is tokenized as
it is, and its response is followed by eos.

Plain text (:class:`TextEncoder`): for a tokenizer without a chat template (base
models) or when asked, a prompt string (formatted by ``prompt_template``, a string
with ``{prompt}``) and the response are tokenized separately and concatenated, the
response followed by eos, as TRL does for non-conversational data; only the
response and its eos are trained. :func:`make_encoder` picks the encoder.

Over-length policy (``max_length`` counts prompt and response tokens):

- ``"truncate"``: cut the sequence from the right to ``max_length`` (the response
  loses its tail and its eos). A record whose prompt leaves no room for one
  trained token is dropped, never cut into. RL prompts are never cut either:
  an over-long prompt is dropped.
- ``"drop"``: skip every over-long record.
- ``"error"``: raise ``ValueError`` naming the record (``file:line`` or row) and its lengths.

:class:`EncodeReport` counts what happened; callers log it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, get_args

from aligner.data.formats import (
    KTORecord,
    Message,
    PreferenceRecord,
    Record,
    RegressionRecord,
    RLPromptRecord,
    SFTRecord,
)
from aligner.data.tokenizer import stop_token_ids

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

OverLength = Literal["truncate", "drop", "error"]
OVER_LENGTH_POLICIES: tuple[str, ...] = get_args(OverLength)
MISSING_ATTRIBUTE = -100.0  # the regression batch's label for an attribute a record lacks


@dataclass(frozen=True)
class EncodedSequence:
    """One tokenized conversation.

    Attributes:
        input_ids: token ids, prompt first.
        loss_mask: True at trained (response) tokens; same length as ``input_ids``.
        prompt_length: tokens before the first trained token; for a single-turn record
            ``input_ids[:prompt_length]`` is the prompt and the rest is the response.
    """

    input_ids: list[int]
    loss_mask: list[bool]
    prompt_length: int

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class SFTExample:
    """An encoded :class:`~aligner.data.formats.SFTRecord`; ``index`` is its position in the encoded dataset."""

    sequence: EncodedSequence
    index: int
    origin: str = ""


@dataclass(frozen=True)
class PreferenceExample:
    """An encoded preference pair (same prompt tokens in both sequences)."""

    chosen: EncodedSequence
    rejected: EncodedSequence
    index: int
    chosen_reward: float | None = None
    rejected_reward: float | None = None
    origin: str = ""


@dataclass(frozen=True)
class RegressionExample:
    """An encoded prompt/response with its attribute labels in a fixed order (``-100.0`` = missing)."""

    sequence: EncodedSequence
    attributes: list[float]
    index: int
    origin: str = ""


@dataclass(frozen=True)
class KTOExample:
    """An encoded prompt/response with its desirable flag."""

    sequence: EncodedSequence
    desirable: bool
    index: int
    origin: str = ""


@dataclass(frozen=True)
class PromptExample:
    """An encoded RL prompt (rendered with the generation prompt) and the row's extra fields."""

    prompt_ids: list[int]
    extra: dict[str, Any]
    index: int
    origin: str = ""


Example = SFTExample | PreferenceExample | RegressionExample | KTOExample | PromptExample


@dataclass
class EncodeReport:
    """What encoding did to a dataset: ``kept`` records (of which ``truncated`` were cut) and ``dropped`` ones."""

    kept: int = 0
    truncated: int = 0
    dropped: int = 0
    max_length: int = 0
    dropped_origins: list[str] = field(default_factory=list)
    identical_pairs: int = 0
    identical_origins: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        total = self.kept + self.dropped + self.identical_pairs
        text = f"kept {self.kept} of {total} records ({self.truncated} truncated), dropped {self.dropped}"
        if self.dropped_origins:
            shown = ", ".join(self.dropped_origins[:3])
            text += f" (first: {shown})"
        if self.identical_pairs:
            shown = ", ".join(self.identical_origins[:3])
            text += f", {self.identical_pairs} pairs whose chosen equals rejected dropped (first: {shown})"
        return f"{text}; max_length {self.max_length}"


# Turn markers of the common chat formats: a prompt holding one was rendered already.
PRETEMPLATED_MARKERS = (
    "<extra_id_0>System",
    "<extra_id_1>User",
    "<extra_id_1>Assistant",
    "<|im_start|>",
    "<|start_header_id|>",
    "[INST]",
    "<start_of_turn>",
)


def pretemplated_prompt(messages: Sequence[Message]) -> str | None:
    """The prompt text when ``messages`` is one user turn that already holds a chat format's turn markers."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        text = messages[0]["content"]
        if any(marker in text for marker in PRETEMPLATED_MARKERS):
            return text
    return None


def raw_prompt_response(tokenizer, prompt_text: str, response: str, eos_token_id: int) -> EncodedSequence:
    """``prompt_text`` tokenized as it is, then ``response`` and eos; only the latter are trained."""
    prompt_ids = list(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    response_ids = [*tokenizer(response, add_special_tokens=False)["input_ids"], eos_token_id]
    return EncodedSequence(
        input_ids=prompt_ids + response_ids,
        loss_mask=[False] * len(prompt_ids) + [True] * len(response_ids),
        prompt_length=len(prompt_ids),
    )


class ChatEncoder:
    """Tokenizes conversations with a tokenizer's chat template and marks the trained tokens.

    Args:
        tokenizer: a tokenizer with a chat template and an eos token.
        end_of_turn_token: the token that ends an assistant turn; None: eos, or the
            special token the template closes an assistant turn with (found by
            rendering a probe conversation).

    Raises (at construction):
        ValueError: the tokenizer has no chat template or no eos token, or
            ``end_of_turn_token`` is not one of its tokens.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, end_of_turn_token: str | None = None) -> None:
        if not tokenizer.chat_template:
            raise ValueError("the tokenizer has no chat_template; use one with a template or build_tokenizer()")
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token")
        self.tokenizer = tokenizer
        self.eos_token_id: int = tokenizer.eos_token_id
        if end_of_turn_token is not None:
            token_id = tokenizer.convert_tokens_to_ids(end_of_turn_token)
            if token_id is None or token_id == tokenizer.unk_token_id:
                raise ValueError(f"data.end_of_turn_token {end_of_turn_token!r} is not a token of the tokenizer")
            self.end_of_turn_ids = [self.eos_token_id, token_id]
        else:
            self.end_of_turn_ids = stop_token_ids(tokenizer)

    @property
    def stop_token_ids(self) -> list[int]:
        """The ids generation stops at: eos, then the template's end-of-turn token when it is another."""
        return list(dict.fromkeys(self.end_of_turn_ids))

    def tokens(self, messages: Sequence[Message], *, add_generation_prompt: bool) -> list[int]:
        """The template rendering of ``messages`` as token ids (the template adds bos, not the tokenizer)."""
        text = self.tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt(self, messages: Sequence[Message]) -> list[int]:
        """Prompt tokens ending with the generation prompt (what a policy continues); a pre-templated one as is."""
        text = pretemplated_prompt(messages)
        if text is not None:
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return self.tokens(messages, add_generation_prompt=True)

    def conversation(self, messages: Sequence[Message], trained_turns: Sequence[int], origin: str) -> EncodedSequence:
        """Tokenize ``messages``; the assistant turns at positions ``trained_turns`` are trained.

        Raises:
            ValueError: the template is not prefix-stable or does not end an assistant turn with eos
                (the message names ``origin``).
        """
        text = pretemplated_prompt(messages[:-1])
        if text is not None and list(trained_turns) == [len(messages) - 1]:
            return raw_prompt_response(self.tokenizer, text, messages[-1]["content"], self.eos_token_id)
        full = self.tokens(messages, add_generation_prompt=False)
        loss_mask = [False] * len(full)
        for turn in trained_turns:
            before = self.tokens(messages[:turn], add_generation_prompt=True)
            last = turn == len(messages) - 1
            through = full if last else self.tokens(messages[: turn + 1], add_generation_prompt=False)
            if full[: len(before)] != before or full[: len(through)] != through:
                raise ValueError(
                    f"{origin}: the chat template does not render turn {turn} as a prefix of the whole conversation; "
                    "prompt and response tokens cannot be split"
                )
            response = through[len(before) :]
            ends = [position for position, token in enumerate(response) if token in self.end_of_turn_ids]
            if not ends:
                raise ValueError(
                    f"{origin}: the chat template does not end assistant turn {turn} with eos_token or an end-of-turn "
                    "token; set data.end_of_turn_token to the token it ends turns with"
                )
            end = len(before) + ends[-1] + 1
            loss_mask[len(before) : end] = [True] * (end - len(before))
        return EncodedSequence(input_ids=full, loss_mask=loss_mask, prompt_length=loss_mask.index(True))

    def prompt_response(self, prompt: Sequence[Message], response: str, origin: str) -> EncodedSequence:
        """Tokenize ``prompt`` plus one assistant ``response``; only the response is trained."""
        messages = [*prompt, {"role": "assistant", "content": response}]
        return self.conversation(messages, [len(prompt)], origin)


class TextEncoder:
    """Plain text: prompt and response tokenized separately and concatenated, the response ended by eos.

    For tokenizers without a chat template (base models) or ``data.chat_template:
    false``. The prompt is ``prompt_template.format(prompt=text)`` (or the text as
    it is: already-templated prompts are not templated again), tokenized with the
    tokenizer's special tokens (a bos where it adds one); the response is
    tokenized without them and followed by eos. Only the response and its eos are
    trained. Records must be single-turn: one user prompt (optionally after a
    system turn, which is prepended to the prompt text) and one response.

    Raises (at construction):
        ValueError: no eos token, or a ``prompt_template`` without ``{prompt}``.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_template: str | None = None) -> None:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token")
        if prompt_template is not None and "{prompt}" not in prompt_template:
            raise ValueError(f"data.prompt_template must contain {{prompt}}, got {prompt_template!r}")
        self.tokenizer = tokenizer
        self.prompt_template = prompt_template
        self.eos_token_id: int = tokenizer.eos_token_id

    @property
    def stop_token_ids(self) -> list[int]:
        return [self.eos_token_id]

    def _prompt_text(self, messages: Sequence[Message], origin: str) -> str:
        roles = [message["role"] for message in messages]
        if roles not in (["user"], ["system", "user"]):
            raise ValueError(
                f"{origin}: plain-text mode (no chat template) takes a single-turn prompt, got turns {roles}; "
                "use a tokenizer with a chat template for multi-turn data (data.tokenizer)"
            )
        text = "\n\n".join(message["content"] for message in messages)
        if self.prompt_template is None or pretemplated_prompt(messages) is not None:
            return text
        return self.prompt_template.format(prompt=text)

    def prompt(self, messages: Sequence[Message], origin: str = "prompt") -> list[int]:
        """The prompt's tokens (what a policy continues)."""
        return list(self.tokenizer(self._prompt_text(messages, origin))["input_ids"])

    def prompt_response(self, prompt: Sequence[Message], response: str, origin: str) -> EncodedSequence:
        """``prompt`` tokens, then ``response`` tokens and eos; only the latter are trained."""
        prompt_ids = self.prompt(prompt, origin)
        response_ids = [*self.tokenizer(response, add_special_tokens=False)["input_ids"], self.eos_token_id]
        return EncodedSequence(
            input_ids=prompt_ids + response_ids,
            loss_mask=[False] * len(prompt_ids) + [True] * len(response_ids),
            prompt_length=len(prompt_ids),
        )

    def conversation(self, messages: Sequence[Message], trained_turns: Sequence[int], origin: str) -> EncodedSequence:
        """A single-turn conversation (prompt turns, then one trained assistant turn)."""
        if list(trained_turns) != [len(messages) - 1] or messages[-1]["role"] != "assistant":
            raise ValueError(
                f"{origin}: plain-text mode (no chat template) trains one final assistant turn; this conversation "
                "has several: use a tokenizer with a chat template (data.tokenizer)"
            )
        return self.prompt_response(messages[:-1], messages[-1]["content"], origin)


Encoder = ChatEncoder | TextEncoder


def make_encoder(
    tokenizer: PreTrainedTokenizerBase,
    *,
    chat_template: bool | None = None,
    prompt_template: str | None = None,
    end_of_turn_token: str | None = None,
) -> Encoder:
    """The encoder for ``tokenizer``: its chat template, or plain text.

    Args:
        chat_template: True: the chat template (an error without one); False: plain
            text; None: the chat template when the tokenizer has one, else plain text.
        prompt_template: plain text only: a string with ``{prompt}`` that formats each prompt.
        end_of_turn_token: chat template only: the token assistant turns end with (default: detected).

    Raises:
        ValueError: ``chat_template=True`` without a template, or options that do not apply.
    """
    use_template = bool(tokenizer.chat_template) if chat_template is None else chat_template
    if use_template:
        if prompt_template is not None:
            raise ValueError("data.prompt_template applies to plain text; with a chat template leave it unset")
        return ChatEncoder(tokenizer, end_of_turn_token)
    if end_of_turn_token is not None:
        raise ValueError("data.end_of_turn_token applies to chat templates; plain text ends responses with eos")
    return TextEncoder(tokenizer, prompt_template)


def encode_records(
    records: Sequence[Record],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    over_length: OverLength = "truncate",
    attribute_names: Sequence[str] = (),
    encoder: Encoder | None = None,
) -> tuple[list[Example], EncodeReport]:
    """Encode records of one kind, applying the over-length policy (module docstring).

    Args:
        records: records from :mod:`aligner.data.formats`, all of one type.
        tokenizer: a tokenizer with a chat template and an eos token.
        max_length: most tokens per sequence (for RL prompts: per prompt).
        over_length: ``"truncate"``, ``"drop"`` or ``"error"``.
        attribute_names: for regression records, the attribute order of the output vectors.
        encoder: how records become tokens (:func:`make_encoder`); None: ``make_encoder(tokenizer)``.

    Returns:
        The examples (``index`` = position in this list) and an :class:`EncodeReport`.

    Raises:
        ValueError: an unknown policy, ``max_length < 2``, regression records without
            ``attribute_names``, or an over-long record under ``"error"`` (names record and lengths).
    """
    if over_length not in OVER_LENGTH_POLICIES:
        raise ValueError(f"unknown over_length {over_length!r}; expected one of {', '.join(OVER_LENGTH_POLICIES)}")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (a prompt token and a response token), got {max_length}")
    if any(isinstance(record, RegressionRecord) for record in records) and not attribute_names:
        raise ValueError("regression records need attribute_names (the attribute order of the model's outputs)")
    encoder = encoder or make_encoder(tokenizer)
    report = EncodeReport(max_length=max_length)
    examples: list[Example] = []
    for record in records:
        if isinstance(record, PreferenceRecord) and record.chosen == record.rejected:
            # Equal responses give equal log-probs: the pair's loss is a constant, with no gradient.
            report.identical_pairs += 1
            report.identical_origins.append(record.origin)
            continue
        example, truncated = _encode_one(encoder, record, len(examples), max_length, over_length, attribute_names)
        if example is None:
            report.dropped += 1
            report.dropped_origins.append(record.origin)
            continue
        examples.append(example)
        report.kept += 1
        report.truncated += int(truncated)
    return examples, report


def _fit_length(
    sequence: EncodedSequence, max_length: int, over_length: OverLength, what: str
) -> tuple[EncodedSequence | None, bool]:
    """Apply the over-length policy to one sequence.

    Returns:
        ``(sequence, truncated)``, with None for a dropped sequence.

    Raises:
        ValueError: an over-long sequence under ``"error"``; the message starts with ``what``.
    """
    if len(sequence) <= max_length:
        return sequence, False
    if over_length == "error":
        response_length = len(sequence) - sequence.prompt_length
        raise ValueError(
            f"{what}: {len(sequence)} tokens (prompt {sequence.prompt_length}, response {response_length}) "
            f"exceed max_length {max_length}; shorten it, raise max_length, or set over_length to 'truncate' or 'drop'"
        )
    # Keep at least one trained token; the prompt itself is never cut.
    if over_length == "drop" or sequence.prompt_length >= max_length:
        return None, False
    cut = EncodedSequence(sequence.input_ids[:max_length], sequence.loss_mask[:max_length], sequence.prompt_length)
    return cut, True


def _encode_one(
    encoder: Encoder,
    record: Record,
    index: int,
    max_length: int,
    over_length: OverLength,
    attribute_names: Sequence[str],
) -> tuple[Example | None, bool]:
    """Encode one record; ``(None, False)`` when the policy drops it."""
    origin = record.origin
    if isinstance(record, RLPromptRecord):
        prompt_ids = encoder.prompt(record.prompt)
        if len(prompt_ids) <= max_length:
            return PromptExample(prompt_ids, dict(record.extra), index, origin), False
        if over_length == "error":
            raise ValueError(
                f"{origin}: prompt of {len(prompt_ids)} tokens exceeds max_length {max_length}; "
                "shorten it, raise max_length, or set over_length to 'drop'"
            )
        return None, False
    if isinstance(record, PreferenceRecord):
        chosen, chosen_cut = _fit_length(
            encoder.prompt_response(record.prompt, record.chosen, origin), max_length, over_length, f"{origin} (chosen)"
        )
        rejected, rejected_cut = _fit_length(
            encoder.prompt_response(record.prompt, record.rejected, origin),
            max_length,
            over_length,
            f"{origin} (rejected)",
        )
        if chosen is None or rejected is None:
            return None, False
        example = PreferenceExample(chosen, rejected, index, record.chosen_reward, record.rejected_reward, origin)
        return example, chosen_cut or rejected_cut
    if isinstance(record, SFTRecord):
        assistant_turns = [turn for turn, message in enumerate(record.messages) if message["role"] == "assistant"]
        sequence = encoder.conversation(record.messages, assistant_turns, origin)
    else:
        sequence = encoder.prompt_response(record.prompt, record.response, origin)
    sequence, truncated = _fit_length(sequence, max_length, over_length, origin)
    if sequence is None:
        return None, False
    if isinstance(record, SFTRecord):
        return SFTExample(sequence, index, origin), truncated
    if isinstance(record, KTORecord):
        return KTOExample(sequence, record.desirable, index, origin), truncated
    labels = [record.attributes.get(name, MISSING_ATTRIBUTE) for name in attribute_names]
    return RegressionExample(sequence, labels, index, origin), truncated
