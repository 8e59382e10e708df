"""What every generation engine takes and returns: sampling settings, rollouts, versioned weights.

    engine.refit(actor, version=step)                 # weights of training step `step`
    rollouts = engine.generate(prompts, SamplingParams(max_new_tokens=512, temperature=0.7),
                               expected_version=step)  # StaleWeightsError if the refit was missed
    rollouts.tokens, rollouts.logprobs, rollouts.response_mask, rollouts.stop_reason

An engine is one backend behind :class:`Engine`: the built-in torch engine
(:class:`aligner.generation.torch_engine.TorchEngine`, any machine), and later
megatron-core's inference engine and TensorRT-LLM on GPUs. Backends that hold
their own copy of the weights in another layout are refit from Hugging
Face-named tensors streamed in bounded buckets (:data:`HFWeightBuckets`), the
names and layout :func:`aligner.models.hf.export_hf` writes; see
:func:`aligner.generation.refit.hf_weight_buckets` for the producer.

Nothing here imports megatron-core.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

# Why a row stopped, in the order they are checked on the token that ended it.
STOP_REASONS = ("eos", "stop_token", "stop_string", "length")

HFWeightBucket = Sequence[tuple[str, Tensor]]
"""One bucket of a refit: ``(name, tensor)`` pairs, Hugging Face names (``model.layers.0.self_attn.q_proj.weight``),
full (unsharded) tensors, any dtype (the engine casts)."""

HFWeightBuckets = Iterable[HFWeightBucket]
"""A whole refit: buckets, each bounded in bytes by its producer, together holding every weight of the model once."""


class StaleWeightsError(RuntimeError):
    """The engine's weights are older than the version the caller requires (a refit was missed or failed)."""


@dataclass(frozen=True)
class SamplingParams:
    """How to draw each response.

    Attributes:
        max_new_tokens: ``>= 1`` response tokens at most per row; a row that reaches it
            stops with reason ``"length"`` (``is_end`` False).
        temperature: ``> 0`` divisor of the logits (ignored when ``greedy``).
        top_k: keep the ``top_k`` most likely tokens; 0 keeps all (ignored when ``greedy``).
        top_p: keep the smallest most-likely set reaching mass ``top_p``; 1 keeps all (ignored when ``greedy``).
        greedy: take the most likely token at every step.
        stop_token_ids: ids that end a response besides the engine's eos ids (kept in the response).
        stop_strings: a response ends at the first token after which its decoded text contains one
            of them (the token is kept; the text is not cut). Needs an engine built with ``detokenize``.
        seed: seed of the draws (the same seed, prompts and weights give the same rollouts);
            None draws from torch's default generator.

    Raises:
        ValueError: a value out of range, or an empty stop string.
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.greedy:
            if not self.temperature > 0:
                raise ValueError(
                    f"temperature must be > 0 (use greedy=True for argmax decoding), got {self.temperature}"
                )
            if self.top_k < 0:
                raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
            if not 0 < self.top_p <= 1:
                raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {self.top_p}")
        # Lists from a YAML config become tuples, so the params stay hashable and immutable.
        object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in self.stop_token_ids))
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ValueError(f"stop_strings must be non-empty strings, got {self.stop_strings!r}")


STOP_STRING_SLACK = 8  # characters decoded beyond the longest stop string (see ends_with_stop_string)


def ends_with_stop_string(
    response: Sequence[int], stop_strings: Sequence[str], detokenize: Callable[[Sequence[int]], str]
) -> bool:
    """Whether the decoded text of ``response`` contains one of ``stop_strings``, given that it did not
    before the last token (the engines ask after every token, so a row stops at the first that does).

    Only the tail is decoded: the last ``k`` tokens, ``k`` from the longest stop string's length plus
    :data:`STOP_STRING_SLACK` characters and doubled until their text is that long (or the whole
    response), so a step costs the same at any response length, where decoding the whole response
    every step is quadratic in it. A new occurrence ends in the text the last token changed, so it
    lies in that tail; decoding from inside the response can only differ in the first few characters
    of the tail (a UTF-8 character cut at the window's start decodes as U+FFFD, a tokenizer may drop
    the first space), which the slack covers.

    Args:
        response: the response's token ids so far.
        stop_strings: non-empty texts.
        detokenize: token ids -> text (the tokenizer's ``decode``).
    """
    if not stop_strings or not response:
        return False
    wanted = max(len(stop) for stop in stop_strings) + STOP_STRING_SLACK
    count = min(len(response), wanted)
    while True:
        text = detokenize(response[-count:])
        if len(text) >= wanted or count == len(response):
            return any(stop in text for stop in stop_strings)
        count = min(len(response), 2 * count)


@dataclass
class Rollouts:
    """Prompts and their sampled responses, right-padded, with the engine's log-probs as drawn.

    Token layout (as the trainer's log-probs): ``logprobs[b, t - 1]`` is the
    engine's log-prob of ``tokens[b, t]`` given ``tokens[b, :t]``, so the
    response of row ``b`` occupies columns ``prompt_lengths[b] - 1 .. lengths[b] - 2``
    of ``logprobs`` (:attr:`response_mask`) and the sequence reward goes on column
    ``lengths[b] - 2``.

    Attributes:
        tokens: ``[B, S]`` int64; row ``b`` holds its prompt then its response in
            ``[0, lengths[b])`` and the pad id after; ``S = max(lengths)``.
        prompt_lengths: ``[B]`` int64 prompt tokens per row.
        lengths: ``[B]`` int64 prompt + response tokens per row (a stop token, when drawn, is included).
        is_end: ``[B]`` bool: True where the response stopped on its own (eos, a stop token or
            a stop string), False where it ran out of ``max_new_tokens``.
        stop_reason: ``B`` strings from :data:`STOP_REASONS`.
        logprobs: ``[B, S - 1]`` float32, 0 outside the response. A sampled token's
            log-prob under the distribution it was drawn from, after temperature,
            top-k and top-p: ``log_softmax(filtered(logits / T))[token]``. With
            greedy decoding, its log-prob under the plain model,
            ``log_softmax(logits)[token]`` (temperature 1, nothing filtered), which is
            what a trainer at temperature 1 computes.
        weights_version: the engine's weights version that produced them.
        metrics: engine counters and timings, e.g. ``generate_s``, ``tokens_per_s``,
            ``forwards``, ``decode_rows`` (row-steps actually computed).
    """

    tokens: Tensor
    prompt_lengths: Tensor
    lengths: Tensor
    is_end: Tensor
    stop_reason: list[str]
    logprobs: Tensor
    weights_version: int
    metrics: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_buffers(
        cls,
        tokens: Tensor,
        prompt_lengths: Tensor,
        lengths: Tensor,
        stop_reason: list[str],
        logprobs: Tensor,
        *,
        weights_version: int,
        metrics: dict[str, float],
    ) -> Rollouts:
        """Rollouts from an engine's full-width buffers (``[B, L]`` tokens, ``[B, L - 1]`` log-probs), cut to the
        longest row; ``is_end`` where the stop reason is not ``"length"``."""
        width = int(lengths.max())
        return cls(
            tokens=tokens[:, :width],
            prompt_lengths=prompt_lengths,
            lengths=lengths,
            is_end=torch.tensor([reason != "length" for reason in stop_reason], device=tokens.device),
            stop_reason=stop_reason,
            logprobs=logprobs[:, : width - 1],
            weights_version=weights_version,
            metrics=metrics,
        )

    @property
    def response_mask(self) -> Tensor:
        """``[B, S - 1]`` bool: True on the columns of :attr:`logprobs` that score a response token."""
        columns = torch.arange(self.logprobs.shape[1], device=self.tokens.device)
        return (columns >= self.prompt_lengths[:, None] - 1) & (columns < self.lengths[:, None] - 1)

    def cpu(self) -> Rollouts:
        """These rollouts with every tensor on the CPU (e.g. to gather them as Python objects)."""
        moved = {name: value.cpu() for name, value in vars(self).items() if isinstance(value, Tensor)}
        return dataclasses.replace(self, **moved)

    def select(self, rows: Tensor | Sequence[int]) -> Rollouts:
        """The rollouts of ``rows`` (indices or a ``[B]`` bool mask), trimmed to their own longest row.

        ``metrics`` are the batch's and are not carried over.
        """
        rows = torch.as_tensor(rows, device=self.tokens.device)
        if rows.dtype == torch.bool:
            rows = rows.nonzero().squeeze(1)
        width = int(self.lengths[rows].max()) if rows.numel() else 1
        return Rollouts(
            tokens=self.tokens[rows, :width],
            prompt_lengths=self.prompt_lengths[rows],
            lengths=self.lengths[rows],
            is_end=self.is_end[rows],
            stop_reason=[self.stop_reason[i] for i in rows.tolist()],
            logprobs=self.logprobs[rows, : max(width - 1, 0)],
            weights_version=self.weights_version,
        )

    @classmethod
    def cat(cls, parts: Sequence[Rollouts], pad_token_id: int) -> Rollouts:
        """The rows of ``parts`` in order, right-padded with ``pad_token_id`` to the longest; one weights version.

        ``metrics`` are summed (counters and seconds add up; rates are left out).

        Raises:
            ValueError: no parts, or parts drawn with different weights versions.
        """
        if not parts:
            raise ValueError("Rollouts.cat needs at least one batch")
        versions = {part.weights_version for part in parts}
        if len(versions) > 1:
            raise ValueError(f"Rollouts.cat: the batches come from different weights versions {sorted(versions)}")
        width = max(part.tokens.shape[1] for part in parts)

        def padded(tensor: Tensor, columns: int, value: float) -> Tensor:
            return torch.nn.functional.pad(tensor, (0, columns - tensor.shape[1]), value=value)

        metrics: dict[str, float] = {}
        for part in parts:
            for name, value in part.metrics.items():
                if not name.endswith("_per_s"):
                    metrics[name] = metrics.get(name, 0.0) + value
        return cls(
            tokens=torch.cat([padded(part.tokens, width, pad_token_id) for part in parts]),
            prompt_lengths=torch.cat([part.prompt_lengths for part in parts]),
            lengths=torch.cat([part.lengths for part in parts]),
            is_end=torch.cat([part.is_end for part in parts]),
            stop_reason=[reason for part in parts for reason in part.stop_reason],
            logprobs=torch.cat([padded(part.logprobs, width - 1, 0.0) for part in parts]),
            weights_version=versions.pop(),
            metrics=metrics,
        )


class Engine(abc.ABC):
    """A generation backend with versioned weights.

    The version is the caller's count of weight updates (e.g. the training step
    the weights come from); an engine starts at the version it was built with
    and changes it only by a refit.
    """

    @property
    @abc.abstractmethod
    def version(self) -> int:
        """The version of the weights the engine generates with."""

    @abc.abstractmethod
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingParams,
        *,
        expected_version: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Rollouts:
        """Sample one response per prompt (a list of token ids).

        The draws come from ``generator`` when given (its state advances), else from a generator
        seeded with ``sampling.seed``, else from torch's default one.

        Raises:
            StaleWeightsError: ``expected_version`` is given and the engine's weights are older.
            ValueError: an empty prompt, a token id outside the vocabulary, a prompt too long.
        """

    @abc.abstractmethod
    def refit(self, source: torch.nn.Module, version: int) -> float:
        """Take the weights of ``source`` (the trainer's model) as version ``version``; returns the seconds it took.

        Raises:
            ValueError: ``version`` is older than the engine's.
        """

    @abc.abstractmethod
    def refit_from_hf_buckets(self, buckets: HFWeightBuckets, version: int) -> float:
        """Load every weight from Hugging Face-named buckets as version ``version``; returns the seconds it took.

        Raises:
            ValueError: ``version`` is older than the engine's, or a bucket holds a name the model does not have.
            KeyError: the buckets ended without a weight the model needs.
        """

    @abc.abstractmethod
    def sleep(self) -> None:
        """Release what the engine holds between generations (on a GPU: its memory, so training can use it)."""

    @abc.abstractmethod
    def wake(self) -> None:
        """Undo :meth:`sleep` before the next generation (weights first, then the KV cache, on a GPU)."""

    @contextlib.contextmanager
    def awake(self) -> Iterator[Engine]:
        """``with engine.awake(): engine.generate(...)``: woken for the block, put to sleep after it (also on error)."""
        self.wake()
        try:
            yield self
        finally:
            self.sleep()

    def check_version(self, expected_version: int | None) -> None:
        """Raise :class:`StaleWeightsError` if the weights are older than ``expected_version`` (None: no check)."""
        if expected_version is not None and self.version < expected_version:
            raise StaleWeightsError(
                f"the engine holds weights version {self.version} but version {expected_version} is required: "
                "refit the engine from the trainer before generating"
            )
