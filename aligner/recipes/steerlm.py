"""SteerLM: supervised fine-tuning conditioned on attribute values written into the prompt.

    python -m aligner.recipes.rm --config configs/rm_regression_tiny.yaml          # 1. regression RM (optional)
    python -m aligner.recipes.steerlm --config configs/steerlm_tiny.yaml           # 2-3. label, then SFT

The recipe (Dong et al., 2023; NeMo-Aligner), on attribute data
(``{"prompt", "response", "attributes"}`` jsonl or HelpSteer2 columns):

1. a multi-attribute regression reward model is trained by :mod:`aligner.recipes.rm`
   (``rm.kind: regression``);
2. each training and validation record gets its attribute values: the dataset's
   own labels, or, with ``steerlm.annotate_rm_checkpoint``, that reward model's
   predictions (:func:`annotate`: clamped to 0..4 and
   rounded), which replace the labels;
3. each record becomes an SFT conversation whose system turn starts with its
   attribute line (:func:`aligner.algorithms.steerlm.conditioned_prompt`), and
   the response is trained with the plain SFT loss (token-mean NLL, the forward
   step of :mod:`aligner.recipes.sft`); earlier assistant turns of a multi-turn
   prompt are trained too, as in SFT;
4. at inference the caller writes the attributes it wants into the prompt:
   :func:`steer` (a batch of prompts) or
   :func:`aligner.algorithms.steerlm.generate_with_attributes` (one).

Every data-parallel replica annotates the whole dataset itself (one forward
pass of the reward model, before training); annotation supports tensor
parallelism only (``parallel.pp: 1``); the reward model's checkpoint may have
been written at any parallel layout (distributed checkpoints are resliced).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from aligner import cli
from aligner.algorithms.logprobs import last_token_values
from aligner.algorithms.steerlm import (
    DEFAULT_ATTRIBUTES,
    Prompt,
    attribute_value,
    check_attribute_names,
    conditioned_prompt,
    format_attributes,
)
from aligner.checkpoint import load_model_weights
from aligner.config import ConfigError, ModelSourceConfig, RunConfig
from aligner.data import (
    HELPSTEER2_ATTRIBUTES,
    EncodedDataset,
    RegressionRecord,
    SFTRecord,
    make_encoder,
    read_records,
)
from aligner.data.splits import encoder_for, make_loaders, tokenizer_for
from aligner.generation.steerlm import generate_with_attributes_batch
from aligner.models.loading import build_model_from, check_vocab
from aligner.parallel import initialize
from aligner.recipes.sft import forward_step
from aligner.trainers.fit import fit_model
from aligner.trainers.run import Run

log = logging.getLogger("aligner")


@dataclass
class SteerLMConfig:
    """Which attributes condition the policy and where their values come from.

    Attributes:
        attribute_names: the attributes of the attribute line, in its order
            (default: HelpSteer2's five).
        annotate_rm_checkpoint: an aligner checkpoint (a step folder or its run
            folder) of a regression reward model from :mod:`aligner.recipes.rm`;
            when set, its predictions replace the dataset's labels. None uses
            the dataset's labels.
        rm_model: the reward model's architecture, as the ``model`` section of
            its run (``config`` or ``hf_path``; the weights come from the checkpoint).
        rm_attribute_names: the reward model's outputs in order (its run's
            ``rm.attribute_names``); None means ``attribute_names``. Must
            include every name of ``attribute_names``.
        annotate_batch_size: records per reward-model forward while annotating.
    """

    attribute_names: list[str] = field(default_factory=lambda: list(HELPSTEER2_ATTRIBUTES))
    annotate_rm_checkpoint: str | None = None
    rm_model: ModelSourceConfig = field(default_factory=ModelSourceConfig)
    rm_attribute_names: list[str] | None = None
    annotate_batch_size: int = 8

    def __post_init__(self) -> None:
        try:
            format_attributes(dict.fromkeys(self.attribute_names, 0), self.attribute_names)
        except ValueError as error:
            raise ConfigError(f"steerlm.attribute_names: {error}") from None
        rm_model_set = self.rm_model.hf_path is not None or self.rm_model.config is not None
        if self.annotate_rm_checkpoint is None:
            if rm_model_set or self.rm_attribute_names is not None:
                raise ConfigError(
                    "steerlm.rm_model / steerlm.rm_attribute_names describe the annotating reward model; "
                    "set steerlm.annotate_rm_checkpoint too, or leave them unset to use the dataset's labels"
                )
            return
        if not rm_model_set:
            raise ConfigError(
                "steerlm.annotate_rm_checkpoint needs steerlm.rm_model: the reward model's architecture "
                "(the model section of its rm run: config or hf_path)"
            )
        unknown = [name for name in self.attribute_names if name not in self.reward_model_outputs]
        if unknown:
            raise ConfigError(
                f"steerlm.attribute_names {unknown} are not outputs of the reward model "
                f"(steerlm.rm_attribute_names = {self.reward_model_outputs}); set rm_attribute_names to the "
                "rm run's rm.attribute_names"
            )
        if self.annotate_batch_size < 1:
            raise ConfigError(f"steerlm.annotate_batch_size must be >= 1, got {self.annotate_batch_size}")

    @property
    def reward_model_outputs(self) -> list[str]:
        """The annotating reward model's outputs, in order."""
        return list(self.attribute_names if self.rm_attribute_names is None else self.rm_attribute_names)


@dataclass
class SteerLMRunConfig(RunConfig):
    """SteerLM: attribute-conditioned supervised fine-tuning.

    Attributes:
        steerlm: which attributes condition the policy and where their values come from.
    """

    steerlm: SteerLMConfig = field(default_factory=SteerLMConfig)


def conditioned_sft_records(records: Sequence[RegressionRecord], names: Sequence[str]) -> list[SFTRecord]:
    """Attribute-labelled records as SFT conversations: attribute line in the system turn, response trained.

    ``messages = conditioned_prompt(record.prompt, values, names) + [assistant: record.response]``
    with ``values`` the record's labels of ``names`` (clamped to 0..4, rounded).

    Raises:
        ValueError: a record without a label for one of ``names`` (the message
            names the record and the attribute); see :func:`conditioned_prompt`.
    """
    conversations = []
    for record in records:
        missing = [name for name in names if name not in record.attributes]
        if missing:
            raise ValueError(
                f"{record.origin}: no label for attribute(s) {missing} (it has {sorted(record.attributes)}); "
                "fix steerlm.attribute_names, or label the data with a reward model (steerlm.annotate_rm_checkpoint)"
            )
        prompt = conditioned_prompt(record.prompt, {name: record.attributes[name] for name in names}, names)
        messages = [*prompt, {"role": "assistant", "content": record.response}]
        conversations.append(SFTRecord(messages=messages, origin=record.origin))
    return conversations


def _check_single_stage(what: str) -> None:
    from megatron.core import parallel_state

    pp = parallel_state.get_pipeline_model_parallel_world_size()
    cp = parallel_state.get_context_parallel_world_size()
    if pp > 1 or cp > 1:
        raise NotImplementedError(
            f"{what} runs with tensor parallelism only; got pipeline-parallel size {pp} and context-parallel size {cp}"
        )


@torch.no_grad()
def annotate(
    records: Sequence[Mapping[str, Any]],
    reward_model: torch.nn.Module,
    encode: Callable[[Mapping[str, Any]], Sequence[int]] | Sequence[Sequence[int]],
    *,
    names: Sequence[str] = DEFAULT_ATTRIBUTES,
    batch_size: int = 8,
    pad_token_id: int = 0,
) -> list[dict[str, Any]]:
    """Label each record with the attribute values a regression reward model predicts.

    Each record's prompt+response tokens run through the model in right-padded
    batches; its ``K`` outputs at the last real token (position ``length - 1``)
    become the attribute values, clamped to ``0..4`` and rounded half up. The
    model runs in eval mode and is put back in its former mode afterwards. A
    collective over the tensor-parallel group when it has several ranks.

    Args:
        records: the examples (e.g. ``{"prompt", "response", ...}``), passed through.
        reward_model: a model from :func:`aligner.models.gpt.build_model` with
            ``num_value_outputs=len(names)`` (this rank's tensor-parallel shard).
        encode: a function from a record to its prompt+response token ids (the
            chat template and tokenizer used to train the reward model), or the
            token id lists themselves, one per record.
        names: the model's outputs, in order.
        batch_size: records per forward.
        pad_token_id: the id right-padding fills with (never read: attention is causal).

    Returns:
        New dicts, one per record: the record's fields with ``"attributes"``
        replaced by ``{name: int}`` predictions.

    Raises:
        ValueError: bad ``names``, ``batch_size < 1``, a token list count other than
            ``len(records)``, an empty token list, a model whose output count is
            not ``len(names)``.
        NotImplementedError: pipeline- or context-parallel size above 1.
    """
    check_attribute_names(names)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if callable(encode):
        token_ids = [list(encode(record)) for record in records]
    else:
        token_ids = [list(ids) for ids in encode]
        if len(token_ids) != len(records):
            raise ValueError(f"got {len(token_ids)} token id lists for {len(records)} records")
    empty = [index for index, ids in enumerate(token_ids) if not ids]
    if empty:
        raise ValueError(f"record(s) {empty[:8]} encode to no tokens")
    _check_single_stage("annotate")
    device = next(reward_model.parameters()).device
    was_training = reward_model.training
    reward_model.eval()
    annotated = []
    try:
        for first in range(0, len(records), batch_size):
            chunk = token_ids[first : first + batch_size]
            lengths = torch.tensor([len(ids) for ids in chunk], dtype=torch.long, device=device)
            input_ids = torch.full((len(chunk), int(lengths.max())), pad_token_id, dtype=torch.long, device=device)
            for row, ids in enumerate(chunk):
                input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            values = reward_model(input_ids, None, None)  # [b, s, K]
            if values.shape[-1] != len(names):
                raise ValueError(
                    f"the reward model has {values.shape[-1]} outputs but {len(names)} attribute names were given "
                    f"({list(names)}); build it with num_value_outputs={len(names)}"
                )
            scores = last_token_values(values.float(), lengths).cpu()  # [b, K]
            for offset, row_scores in enumerate(scores.tolist()):
                predicted = {name: attribute_value(score) for name, score in zip(names, row_scores, strict=True)}
                annotated.append({**records[first + offset], "attributes": predicted})
    finally:
        reward_model.train(was_training)
    return annotated


def annotate_records(
    records: Sequence[RegressionRecord],
    reward_model: torch.nn.Module,
    tokenizer,
    *,
    names: Sequence[str],
    max_length: int,
    batch_size: int = 8,
) -> list[RegressionRecord]:
    """The records with their attributes replaced by a regression reward model's predictions.

    Each record's prompt and response are rendered with the tokenizer's chat
    template (as the reward model was trained), cut to ``max_length`` tokens,
    and scored at their last token (:func:`annotate`).

    Args:
        records: attribute records (their labels are ignored).
        reward_model: this rank's shard of a model with ``num_value_outputs=len(names)``.
        tokenizer: a tokenizer with a chat template.
        names: the reward model's outputs, in order.
        max_length: most tokens per scored sequence.
        batch_size: records per forward.

    Returns:
        New records whose ``attributes`` are ``{name: int in 0..4}`` for every name.

    Raises:
        ValueError, NotImplementedError: see :func:`annotate`.
    """
    encoder = make_encoder(tokenizer)
    token_ids = [
        encoder.prompt_response(record.prompt, record.response, record.origin).input_ids[:max_length]
        for record in records
    ]
    rows = annotate(
        [asdict(record) for record in records],
        reward_model,
        token_ids,
        names=names,
        batch_size=batch_size,
        pad_token_id=tokenizer.pad_token_id,
    )
    return [RegressionRecord(**row) for row in rows]


def load_reward_model(section: SteerLMConfig, tp: int = 1, pp: int = 1) -> torch.nn.Module:
    """The annotating reward model: ``section.rm_model``'s architecture with the checkpoint's weights."""
    reward_model = build_model_from(section.rm_model, num_value_outputs=len(section.reward_model_outputs), tp=tp, pp=pp)
    load_model_weights(section.annotate_rm_checkpoint, reward_model)
    return reward_model


def steer(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[Prompt],
    attributes: Mapping[str, float],
    *,
    names: Sequence[str] = HELPSTEER2_ATTRIBUTES,
    max_new_tokens: int = 256,
    greedy: bool = True,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> list[str]:
    """The responses of a SteerLM policy to ``prompts``, all asked for ``attributes``, in one batch.

    A prompt is rendered as in training: a string is one user turn, the
    attribute line goes first in the system turn, and the chat template adds
    the generation prompt. Generation stops at the tokenizer's eos.

    Args:
        model: the SteerLM policy (this rank's tensor-parallel shard; every
            rank of the group must call with the same arguments).
        tokenizer: the tokenizer of training (chat template, eos and pad tokens).
        prompts: strings or chat message lists.
        attributes: the wanted value of every name.
        names: the attributes and their order, as in training (``steerlm.attribute_names``).
        max_new_tokens, greedy, temperature, top_k, top_p, generator: see
            :func:`aligner.generation.torch_engine.generate`.

    Returns:
        One decoded response per prompt, special tokens left out.

    Raises:
        ValueError: see :func:`conditioned_prompt` and :func:`aligner.generation.torch_engine.generate`.
    """
    chat_prompts = [[{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt for prompt in prompts]
    return generate_with_attributes_batch(
        model,
        tokenizer,
        chat_prompts,
        attributes,
        names=names,
        max_new_tokens=max_new_tokens,
        greedy=greedy,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        generator=generator,
    )


def _log_annotation(path: str, records: Sequence[RegressionRecord], names: Sequence[str]) -> None:
    means = ", ".join(
        f"{name} {sum(record.attributes[name] for record in records) / len(records):.2f}" for name in names
    )
    log.info("%s: annotated %d records; mean %s", path, len(records), means)


def run(config: SteerLMRunConfig) -> Run:
    """Label, then train; returns the finished :class:`~aligner.trainers.run.Run` (``states["policy"]``)."""
    initialize(tp=config.parallel.tp, pp=config.parallel.pp, seed=config.trainer.seed)
    # data: records, labelled by the reward model when asked (before the policy exists: the two
    # models are never in memory together), then rendered as attribute-conditioned conversations
    section, data = config.steerlm, config.data
    tokenizer = tokenizer_for(config.model, data)
    splits = {"train": data.train} if data.val is None else {"train": data.train, "val": data.val}
    records = {
        split: read_records(
            path, "regression", reader=data.reader, split=data.split_for(split), cache_dir=data.cache_dir
        )
        for split, path in splits.items()
    }
    if section.annotate_rm_checkpoint is not None:
        reward_model = load_reward_model(section, tp=config.parallel.tp, pp=config.parallel.pp)
        check_vocab(tokenizer, reward_model)
        for split in records:
            records[split] = annotate_records(
                records[split],
                reward_model,
                tokenizer,
                names=section.reward_model_outputs,
                max_length=data.max_length,
                batch_size=section.annotate_batch_size,
            )
            _log_annotation(splits[split], records[split], section.attribute_names)
        del reward_model
    encoded = {}
    for split, split_records in records.items():
        encoded[split] = EncodedDataset(
            conditioned_sft_records(split_records, section.attribute_names),
            tokenizer,
            max_length=data.max_length,
            over_length=data.over_length,
            encoder=encoder_for(tokenizer, data),
        )
        log.info("%s: %s", splits[split], encoded[split].report)
    train_loader, val_loader = make_loaders(config.trainer, data, encoded["train"], encoded.get("val"))
    # model
    model = build_model_from(config.model, tp=config.parallel.tp, pp=config.parallel.pp)
    check_vocab(tokenizer, model)
    # loop: plain SFT on the conditioned conversations
    uniform_loss = math.log(model.aligner_config.vocab_size)  # a collapsed model's token NLL
    return fit_model(config, model, forward_step, train_loader, val_loader, uniform_loss=uniform_loss)


RECIPE = cli.Recipe("steerlm", "SteerLM: attribute-conditioned supervised fine-tuning", SteerLMRunConfig, run)


def main(argv: Sequence[str] | None = None) -> None:
    cli.main(RECIPE, argv)


if __name__ == "__main__":
    main()
