"""A frozen reward model of the rm recipe scoring token sequences, forward-only, at the trainer's layout.

The score of a sequence is what :mod:`aligner.recipes.rm` trains: the value
head's outputs at the sequence's last real token (position ``length - 1`` of a
right-padded row, :func:`aligner.algorithms.logprobs.last_token_values`), from
``model(input_ids, None, None)``. A pairwise model has one output, which is the
score; a regression (multi-attribute) model has one per attribute and the score
is ``sum_k attribute_weights[k] * value[k]``.

Scoring runs megatron's forward-only schedule
(:func:`aligner.models.schedule.forward_only`) in micro-batches, so it works at any
tensor / pipeline / data-parallel layout: each data-parallel replica scores its
own rollouts, the ranks of one tensor-parallel group pass the same ones, and the
scores, computed on the last pipeline stage, are shared with every stage.

The reward model reads the policy's token ids as they are: it must have been
trained with the policy's tokenizer and chat template.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import Tensor

from aligner.algorithms.logprobs import last_token_values
from aligner.checkpoint import latest_checkpoint, load_model_weights
from aligner.checkpoint.state import CONFIG, META
from aligner.config import ConfigError, load_config
from aligner.models.gpt import build_model
from aligner.models.loading import architecture_of
from aligner.models.schedule import forward_only
from aligner.rewards.inputs import RewardInputs
from aligner.rewards.model_config import RMRunConfig

REWARD_MODEL_STATE = "reward_model"  # the train state the rm recipe saves


def last_token_scores_step(batch: dict, model: torch.nn.Module):
    """A forward-only step collecting ``[rows, K]`` float32 outputs at each row's last real token (as the rm recipe)."""
    values = model(batch["input_ids"], None, None)  # [B, S, K] on the last pipeline stage

    def collect(values: Tensor) -> Tensor:
        return last_token_values(values.float(), batch["lengths"])

    return values, collect


class RewardModelScorer:
    """Scores token sequences with a frozen reward model (this rank's shard).

    Args:
        model: a model with a value head (``num_value_outputs=K``), e.g. from
            :func:`load_reward_model`; it is frozen and put in eval mode.
        attribute_names: the ``K`` outputs' names for a regression model; empty for a pairwise one.
        attribute_weights: the weight of each named attribute (attributes left out weigh 0);
            None for a model with one output, whose output is the score.
        micro_batch_size: rows per forward.
        pad_token_id: the id put past each row's length before the forward (never read: attention is causal).
        name: how errors and metrics name it.

    Raises:
        ValueError: names that do not match the model's outputs, weights missing for a model with
            several outputs, weights for unknown attributes, weights for a pairwise model, or
            ``micro_batch_size < 1``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        attribute_names: Sequence[str] = (),
        attribute_weights: Mapping[str, float] | None = None,
        micro_batch_size: int = 8,
        pad_token_id: int = 0,
        name: str = "reward_model",
    ) -> None:
        outputs = model.aligner_num_value_outputs
        if outputs is None:
            raise ValueError(f"{name}: the model is a language model; a reward model has a value head")
        if micro_batch_size < 1:
            raise ValueError(f"{name}: micro_batch_size must be >= 1, got {micro_batch_size}")
        if attribute_names and len(attribute_names) != outputs:
            raise ValueError(
                f"{name}: the model has {outputs} outputs but {len(attribute_names)} attribute names "
                f"{list(attribute_names)} were given"
            )
        self.model = model.requires_grad_(False).eval()
        self.attribute_names = list(attribute_names)
        self.weights = _weight_vector(self.attribute_names, outputs, attribute_weights, name)
        self.micro_batch_size = micro_batch_size
        self.pad_token_id = pad_token_id
        self.name = name
        self.vocab_size: int = model.aligner_config.vocab_size

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        *,
        attribute_weights: Mapping[str, float] | None = None,
        micro_batch_size: int = 8,
        pad_token_id: int = 0,
        name: str = "reward_model",
    ) -> RewardModelScorer:
        """The reward model of an rm recipe checkpoint (see :func:`load_reward_model`); a collective."""
        model, attribute_names = load_reward_model(path)
        try:
            return cls(
                model,
                attribute_names=attribute_names,
                attribute_weights=attribute_weights,
                micro_batch_size=micro_batch_size,
                pad_token_id=pad_token_id,
                name=name,
            )
        except ValueError as error:
            raise ConfigError(f"reward model {path}: {error}") from None

    @property
    def num_outputs(self) -> int:
        return self.model.aligner_num_value_outputs

    def attribute_scores(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """``[N, K]`` float32 outputs at each row's last real token; a collective of the model's parallel groups.

        Args:
            tokens: ``[N, S]`` integer token ids, row ``i`` real in ``[0, lengths[i])``.
            lengths: ``[N]`` integers in ``[1, S]``.

        Returns:
            The same CPU tensor on every rank of the pipeline.

        Raises:
            ValueError: bad shapes or lengths, or a token id outside the model's vocabulary.
        """
        real = self._real_positions(tokens, lengths)
        rows = tokens.shape[0]
        if rows == 0:
            return torch.zeros(0, self.num_outputs)
        # Whatever a caller padded with, the model embeds a valid id there (its outputs are never read).
        tokens = torch.where(real, tokens.long(), self.pad_token_id)
        batches = []
        for start in range(0, rows, self.micro_batch_size):
            batch_lengths = lengths[start : start + self.micro_batch_size].long()
            width = int(batch_lengths.max())
            batches.append(
                {"input_ids": tokens[start : start + self.micro_batch_size, :width], "lengths": batch_lengths}
            )
        collected = forward_only(self.model, batches, last_token_scores_step)
        values = None if collected is None else torch.cat([part.cpu() for part in collected])
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            shared = [values]
            dist.broadcast_object_list(
                shared,
                src=parallel_state.get_pipeline_model_parallel_last_rank(),
                group=parallel_state.get_pipeline_model_parallel_group(),
            )
            values = shared[0]
        return values

    def score(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """``[N]`` float32 scores: the single output, or the attribute-weighted sum; a collective.

        Arguments, returns and errors as in :meth:`attribute_scores`.
        """
        values = self.attribute_scores(tokens, lengths)
        if self.weights is None:
            return values[:, 0]
        return (values.double() @ self.weights).float()

    def __call__(self, inputs: RewardInputs) -> Tensor:
        """:meth:`score` of ``inputs.tokens``.

        Raises:
            ValueError: ``inputs`` carries no tokens.
        """
        if inputs.tokens is None:
            raise ValueError(f"{self.name} reads token ids: give the rollouts' tokens and lengths to the rewards")
        return self.score(inputs.tokens, inputs.lengths)

    def _real_positions(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """``[N, S]`` True at each row's real tokens, after checking shapes, lengths and token ids."""
        if tokens.dim() != 2 or tokens.is_floating_point() or tokens.dtype == torch.bool:
            raise ValueError(
                f"{self.name}: tokens must be [rows, seq] integers, got {tokens.dtype} {tuple(tokens.shape)}"
            )
        if lengths.shape != (tokens.shape[0],) or lengths.is_floating_point() or lengths.dtype == torch.bool:
            raise ValueError(
                f"{self.name}: lengths must be [{tokens.shape[0]}] integers, got {lengths.dtype} {tuple(lengths.shape)}"
            )
        if ((lengths < 1) | (lengths > tokens.shape[1])).any():
            raise ValueError(f"{self.name}: lengths must lie in [1, {tokens.shape[1]}], got {lengths.tolist()}")
        real = torch.arange(tokens.shape[1], device=tokens.device) < lengths.to(tokens.device)[:, None]
        outside = real & ((tokens < 0) | (tokens >= self.vocab_size))
        if outside.any():
            row, position = (int(index) for index in outside.nonzero()[0])
            raise ValueError(
                f"{self.name}: token id {int(tokens[row, position])} (row {row}, position {position}) is outside the "
                f"reward model's vocabulary of {self.vocab_size}; it must share the policy's tokenizer"
            )
        return real


def _weight_vector(names: Sequence[str], outputs: int, weights: Mapping[str, float] | None, name: str) -> Tensor | None:
    """``[K]`` float64 weights by output position, or None when the single output is the score."""
    if weights is None:
        if outputs > 1:
            raise ValueError(
                f"{name}: the reward model has {outputs} outputs {list(names)}; set attribute_weights to weigh them "
                "into one score (e.g. {helpfulness: 1.0, verbosity: -0.5})"
            )
        return None
    if not names:
        raise ValueError(
            f"{name}: a pairwise reward model has one output and no attributes; leave attribute_weights unset "
            "(scale its score with the term's weight)"
        )
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ValueError(f"{name}: attribute_weights names {unknown}, which are not outputs of the model {list(names)}")
    return torch.tensor([float(weights.get(attribute, 0.0)) for attribute in names], dtype=torch.float64)


def load_reward_model(path: str | Path) -> tuple[torch.nn.Module, list[str]]:
    """This rank's frozen shard of the reward model an rm recipe checkpoint holds, and its attribute names.

    The architecture and the outputs come from the checkpoint's ``config.yaml`` (the rm run's
    ``model`` and ``rm`` sections), the weights from its ``reward_model`` train state,
    resliced to the current tensor / pipeline layout. A collective.

    Args:
        path: a checkpoint folder (``.../step_000120``) or a checkpoint root, whose latest is read.

    Returns:
        ``(model, attribute_names)``: the model in eval mode without gradients; the names of its
        outputs for a regression model, ``[]`` for a pairwise one.

    Raises:
        FileNotFoundError: no checkpoint at ``path``, or one without ``config.yaml``.
        ConfigError: a checkpoint whose configuration is not an rm recipe's, or whose architecture
            cannot be built (see :func:`aligner.models.loading.architecture_of`).
        ValueError: the checkpoint has no ``reward_model`` state.
    """
    checkpoint = Path(path)
    if not (checkpoint / META).is_file():
        latest = latest_checkpoint(checkpoint)
        if latest is None:
            raise FileNotFoundError(f"reward model {path}: neither a checkpoint (no {META}) nor a root with a 'latest'")
        checkpoint = Path(latest)
    if not (checkpoint / CONFIG).is_file():
        raise FileNotFoundError(
            f"reward model {checkpoint}: no {CONFIG}; give a checkpoint written by the rm recipe (it saves its config)"
        )
    try:
        config = load_config(RMRunConfig, checkpoint / CONFIG)
    except ConfigError as error:
        raise ConfigError(f"reward model {checkpoint} is not a checkpoint of the rm recipe: {error}") from None
    # No initial weights (random or imported): the checkpoint's replace them all.
    model = build_model(architecture_of(config.model), num_value_outputs=config.rm.num_outputs, init_weights=False)
    load_model_weights(checkpoint, model, state_name=REWARD_MODEL_STATE)
    names = list(config.rm.attribute_names) if config.rm.kind == "regression" else []
    return model.requires_grad_(False).eval(), names
