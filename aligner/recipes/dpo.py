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

from aligner.algorithms.dpo import LOSS_TYPES, preference_loss, sft_term, split_pairs
from aligner.algorithms.logprobs import sequence_logprobs
from aligner.config import CheckpointConfig, LoggingConfig, OptimConfig, ParallelConfig, TrainerConfig, load_config
from aligner.recipes.common import (
    REFERENCE_MODES,
    DataSection,
    ModelSection,
    fit,
    frozen_copy,
    make_loaders,
    parse_command_line,
    precompute_sequence_logprobs,
    prepare_run,
    report,
    tensor_parallel_group,
    weighted_metrics,
    with_reference_model,
    with_reference_table,
)

REFERENCE_FREE = ("simpo", "orpo")


@dataclass
class DPOSection:
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
            raise ValueError(f"dpo.loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.reference not in REFERENCE_MODES:
            raise ValueError(f"dpo.reference must be one of {REFERENCE_MODES}, got {self.reference!r}")
        if self.beta <= 0:
            raise ValueError(f"dpo.beta must be > 0, got {self.beta}")
        if self.sft_weight < 0:
            raise ValueError(f"dpo.sft_weight must be >= 0, got {self.sft_weight}")

    @property
    def uses_reference(self) -> bool:
        return self.loss_type not in REFERENCE_FREE

    @property
    def averages(self) -> bool:
        return self.length_normalize or self.loss_type in REFERENCE_FREE


@dataclass
class DPORunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    dpo: DPOSection = field(default_factory=DPOSection)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def make_forward_step(dpo: DPOSection, vocab_size: int, tp_group):
    """The trainer's ``forward_step``: (summed per-pair loss, pairs, metrics).

    Reference log-prob sums come from ``batch["ref_logps"]`` (from the precomputed
    table or the reference model, see :func:`run`).
    """

    def forward_step(batch, model):
        logits = model(batch["input_ids"], None, None)  # [2B, S, V / tp]: chosen rows, then rejected
        ref_sums = batch.get("ref_logps")

        def loss_func(logits: torch.Tensor):
            _, sums, counts = sequence_logprobs(logits, batch["labels"], vocab_size=vocab_size, tp_group=tp_group)
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

        return logits, loss_func

    return forward_step


def run(config: DPORunConfig):
    """Train; returns the fitted :class:`~aligner.trainers.offline.OfflineTrainer` (``summary``, ``model``)."""
    dpo = config.dpo
    train, val, model = prepare_run(config, "preference")
    vocab_size, tp_group = model.aligner_config.vocab_size, tensor_parallel_group()
    train_loader, val_loader = make_loaders(config, train, val)
    if dpo.uses_reference:
        # The policy holds its initial weights here (the trainer resumes a checkpoint later), so a
        # resumed run gets the same reference as the first.
        reference_model = frozen_copy(model)
        if dpo.reference == "precompute":
            table_args = dict(
                micro_batch_size=config.trainer.micro_batch_size,
                vocab_size=vocab_size,
                tp_group=tp_group,
                data=config.data,
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
            train_loader = with_reference_model(train_loader, reference_model, vocab_size=vocab_size, tp_group=tp_group)
            if val_loader is not None:
                val_loader = with_reference_model(val_loader, reference_model, vocab_size=vocab_size, tp_group=tp_group)
    forward_step = make_forward_step(dpo, vocab_size, tp_group)
    return fit(config, model, forward_step, train_loader, val_loader)


def main(argv: Sequence[str] | None = None) -> None:
    path, overrides = parse_command_line(argv, "DPO-family preference optimization")
    report("dpo", run(load_config(DPORunConfig, path, overrides)))


if __name__ == "__main__":
    main()
