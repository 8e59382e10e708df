"""Direct preference optimization and its family: DPO, cDPO, IPO, hinge, RPO (reward-aware), SimPO, ORPO.

    torchrun --nproc_per_node=2 -m aligner.recipes.dpo --config configs/dpo_tiny.yaml dpo.loss_type=ipo

Data: preference jsonl (``prompt``/``chosen``/``rejected``, NeMo-Aligner's
``chosen_response``/``rejected_response`` and ``chosen_reward``/``rejected_reward``
for RPO, or TRL's message lists). The per-pair loss is
:func:`aligner.algorithms.dpo.preference_loss` on sequence log-prob sums
(length-normalized for SimPO/ORPO, or with ``dpo.length_normalize``), plus
``dpo.sft_weight`` times the chosen responses' NLL; a step's loss is its mean
over the global batch's pairs.

Reference log-probs come from the initial policy, frozen:
``dpo.reference: precompute`` (default) runs it once over the train and
validation data before training and then frees it (any pipeline size; the
data-parallel replicas share the pass; no second model in memory while
training); ``on_the_fly`` keeps it and runs it on every micro-batch, step by
step (any pipeline size: its forward-only schedule runs before the step's).
SimPO and ORPO use no reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from aligner import cli
from aligner.algorithms.dpo import LOSS_TYPES, REFERENCE_FREE_LOSS_TYPES, preference_loss, sft_term, split_pairs
from aligner.algorithms.logprobs import sum_per_sequence
from aligner.config import ConfigError, RunConfig
from aligner.data.splits import load_splits, make_loaders
from aligner.models.lm_head import lm_hidden_states, lm_token_logprobs
from aligner.models.loading import build_model_from, check_vocab, frozen_copy
from aligner.parallel import initialize
from aligner.trainers.fit import fit_model
from aligner.trainers.reference import precompute_sequence_logprobs, with_reference_model, with_reference_table
from aligner.trainers.run import Run
from aligner.trainers.step import weighted_metrics

REFERENCE_MODES = ("precompute", "on_the_fly")


@dataclass
class DPOConfig:
    """The preference objective.

    Attributes:
        loss_type: one of ``sigmoid`` (DPO; with ``label_smoothing``: cDPO), ``ipo``,
            ``hinge``, ``rpo_sq``, ``rpo_fwd_kl``, ``rpo_bwd_kl`` (need dataset rewards),
            ``simpo``, ``orpo``.
        beta: inverse temperature (ORPO: the odds-ratio weight).
        label_smoothing: cDPO's assumed label-flip rate, in [0, 0.5).
        eta: scale of the dataset reward gap in the ``rpo_*`` losses.
        simpo_gamma: SimPO's target margin.
        sft_weight: weight of an added NLL term on the chosen responses (0: none).
        sft_average: the NLL term per ``token`` (mean over each response) or ``sum``.
        length_normalize: feed per-token average log-probs instead of sums
            (always on for SimPO and ORPO).
        reference: ``precompute`` or ``on_the_fly`` (module docstring).
    """

    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    eta: float = 1.0
    simpo_gamma: float = 0.5
    sft_weight: float = 0.0
    sft_average: str = "token"
    length_normalize: bool = False
    reference: str = "precompute"

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"dpo.loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.reference not in REFERENCE_MODES:
            raise ConfigError(f"dpo.reference must be one of {REFERENCE_MODES}, got {self.reference!r}")
        if self.beta <= 0:
            raise ConfigError(f"dpo.beta must be > 0, got {self.beta}")
        if self.sft_weight < 0:
            raise ConfigError(f"dpo.sft_weight must be >= 0, got {self.sft_weight}")

    @property
    def uses_reference(self) -> bool:
        """The loss compares against a frozen reference policy (all but SimPO and ORPO)."""
        return self.loss_type not in REFERENCE_FREE_LOSS_TYPES

    @property
    def averages(self) -> bool:
        """The loss reads per-token average log-probs instead of sums."""
        return self.length_normalize or self.loss_type in REFERENCE_FREE_LOSS_TYPES


@dataclass
class DPORunConfig(RunConfig):
    """DPO-family preference optimization.

    Attributes:
        dpo: the preference objective and where the reference log-probs come from.
    """

    dpo: DPOConfig = field(default_factory=DPOConfig)


def make_forward_step(dpo: DPOConfig):
    """The step's ``forward_step``: (summed per-pair loss, pairs, metrics).

    Reference log-prob sums come from ``batch["ref_logps"]`` (from the precomputed
    table or the reference model, see :func:`run`).
    """

    def forward_step(batch, model):
        hidden = lm_hidden_states(model, batch["input_ids"])  # 2B rows: chosen, then rejected
        ref_sums = batch.get("ref_logps")

        def loss_func(hidden: torch.Tensor):
            sums, counts = sum_per_sequence(lm_token_logprobs(model, hidden, batch["labels"]), batch["labels"])
            policy = sums / counts.clamp(min=1) if dpo.averages else sums
            reference = (None, None)
            if dpo.uses_reference:
                reference = split_pairs(ref_sums / counts.clamp(min=1) if dpo.averages else ref_sums)
            chosen, rejected = split_pairs(policy)
            loss, metrics = preference_loss(
                chosen,
                rejected,
                *reference,
                beta=dpo.beta,
                loss_type=dpo.loss_type,
                label_smoothing=dpo.label_smoothing,
                chosen_rewards=batch.get("chosen_reward"),
                rejected_rewards=batch.get("rejected_reward"),
                eta=dpo.eta,
                simpo_gamma=dpo.simpo_gamma,
            )
            if dpo.sft_weight:
                chosen_sums, _ = split_pairs(sums)
                chosen_counts, _ = split_pairs(counts)
                nll = sft_term(chosen_sums, chosen_counts, average=dpo.sft_average)
                loss = loss + dpo.sft_weight * nll
                metrics["sft_nll"] = nll.detach().mean()
            pairs = chosen.shape[0]
            return loss.sum(), torch.tensor(pairs), weighted_metrics(metrics, pairs)

        return hidden, loss_func

    return forward_step


def run(config: DPORunConfig) -> Run:
    """Train; returns the finished :class:`~aligner.trainers.run.Run` (``summary``, ``states["policy"]``)."""
    dpo = config.dpo
    initialize(tp=config.parallel.tp, pp=config.parallel.pp, seed=config.trainer.seed)
    # data
    tokenizer, train, val = load_splits(config.model, config.data, "preference")
    train_loader, val_loader = make_loaders(config.trainer, config.data, train, val)
    # models
    model = build_model_from(config.model, tp=config.parallel.tp, pp=config.parallel.pp)
    check_vocab(tokenizer, model)
    # reference: the initial policy (the run resumes a checkpoint later, so a resumed run gets the same one)
    if dpo.uses_reference:
        reference_model = frozen_copy(model)
        if dpo.reference == "precompute":
            table_args = dict(
                micro_batch_size=config.trainer.micro_batch_size, pad_to_multiple_of=config.data.pad_to_multiple_of
            )
            train_loader = with_reference_table(
                train_loader, precompute_sequence_logprobs(reference_model, train, **table_args)
            )
            if val_loader is not None:
                val_loader = with_reference_table(
                    val_loader, precompute_sequence_logprobs(reference_model, val, **table_args)
                )
            del reference_model  # freed before training
        else:
            train_loader = with_reference_model(train_loader, reference_model)
            if val_loader is not None:
                val_loader = with_reference_model(val_loader, reference_model)
    # loop
    return fit_model(config, model, make_forward_step(dpo), train_loader, val_loader)


RECIPE = cli.Recipe("dpo", "DPO-family preference optimization", DPORunConfig, run)


def main(argv: Sequence[str] | None = None) -> None:
    cli.main(RECIPE, argv)


if __name__ == "__main__":
    main()
