"""KTO: preference optimization from unpaired desirable / undesirable examples.

    torchrun --nproc_per_node=2 -m aligner.recipes.kto --config configs/kto_tiny.yaml

Data: ``{"prompt", "response", "label": bool}`` jsonl (TRL's ``completion`` too).
The per-example loss is :func:`aligner.algorithms.kto.kto_loss` with
``r = logp - ref_logp`` (sequence sums) and the reference point ``z`` estimated,
as in the KTO paper and TRL, from mismatched pairs (prompt ``i`` with response
``i + 1`` of the micro-batch): ``z = max(0, mean(logp - ref_logp))`` over the
mismatched pairs of every data-parallel rank's micro-batch (one all-reduce of
two numbers), computed without gradient. A step's loss is the mean over the
global batch's examples.

The reference is the initial policy, frozen. Before each step, forward-only
pipeline schedules run it on the step's micro-batches (and, for ``z``, run both
models on the mismatched pairs, without gradient), so any tensor, pipeline and
data-parallel layout works: the values land on the last pipeline stage, where
the loss is computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from aligner import cli
from aligner.algorithms.kto import kto_loss, kto_reference_point
from aligner.algorithms.logprobs import sum_per_sequence
from aligner.config import ConfigError, RunConfig
from aligner.data.splits import load_splits, make_loaders
from aligner.models.lm_head import lm_hidden_states, lm_token_logprobs
from aligner.models.loading import build_model_from, check_vocab, frozen_copy
from aligner.parallel import initialize
from aligner.trainers.fit import fit_model
from aligner.trainers.reference import Annotated, frozen_sequence_logprobs
from aligner.trainers.run import Run


@dataclass
class KTOConfig:
    """The KTO objective.

    Attributes:
        beta: inverse temperature.
        desirable_weight, undesirable_weight: class weights; the KTO paper advises
            desirable_weight * n_desirable ~ undesirable_weight * n_undesirable (up to 4:3).
        use_kl_reference_point: estimate ``z`` from mismatched pairs; False uses ``z = 0``.
    """

    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    use_kl_reference_point: bool = True

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ConfigError(f"kto.beta must be > 0, got {self.beta}")
        if self.desirable_weight < 0 or self.undesirable_weight < 0:
            raise ConfigError("kto.desirable_weight and kto.undesirable_weight must be >= 0")


@dataclass
class KTORunConfig(RunConfig):
    """KTO on unpaired desirable / undesirable examples.

    Attributes:
        kto: the KTO objective.
    """

    kto: KTOConfig = field(default_factory=KTOConfig)


def reference_annotator(kto: KTOConfig, policy, reference_model):
    """``annotate`` for :class:`~aligner.trainers.reference.Annotated`: adds ``ref_logps`` and ``reference_point``.

    Per micro-batch: the reference's sequence log-probs, and ``z`` from the
    mismatched pairs of this micro-batch on every data-parallel rank (one
    all-reduce of two numbers among the last pipeline stage's replicas), the
    policy's log-probs taken with its current weights and no gradient.
    """
    dp_group = parallel_state.get_data_parallel_group()

    def annotate(micro_batches: list[dict]) -> list[dict]:
        ref_logps = frozen_sequence_logprobs(reference_model, micro_batches)
        if kto.use_kl_reference_point:
            mismatched = dict(input_key="kl_input_ids", labels_key="kl_labels")
            kl_policy = frozen_sequence_logprobs(policy, micro_batches, **mismatched)
            kl_ref = frozen_sequence_logprobs(reference_model, micro_batches, **mismatched)
        if ref_logps is None:  # not the last pipeline stage: the loss is not computed here
            return micro_batches
        annotated = []
        for index, batch in enumerate(micro_batches):
            reference_point = torch.zeros((), dtype=torch.float64, device=ref_logps[index].device)
            if kto.use_kl_reference_point:
                total, count = kto_reference_point(kl_policy[index], kl_ref[index])
                packed = torch.stack([total.double(), count.double()])
                dist.all_reduce(packed, group=dp_group)
                reference_point = packed[0] / packed[1].clamp(min=1)
            annotated.append({**batch, "ref_logps": ref_logps[index], "reference_point": reference_point})
        return annotated

    return annotate


def make_forward_step(kto: KTOConfig):
    """The trainer's ``forward_step``: (summed per-example loss, examples, metrics).

    ``batch`` carries ``ref_logps`` and ``reference_point`` (:func:`reference_annotator`).
    """

    def forward_step(batch, model):
        hidden = lm_hidden_states(model, batch["input_ids"])

        def loss_func(hidden: torch.Tensor):  # on the last pipeline stage, where the batch is annotated
            ref_logps, reference_point = batch["ref_logps"], batch["reference_point"]
            policy_logps, _ = sum_per_sequence(lm_token_logprobs(model, hidden, batch["labels"]), batch["labels"])
            loss, metrics = kto_loss(
                policy_logps,
                ref_logps,
                batch["desirable"],
                beta=kto.beta,
                desirable_weight=kto.desirable_weight,
                undesirable_weight=kto.undesirable_weight,
                reference_point=reference_point.to(policy_logps.dtype),
            )
            desirable = batch["desirable"]
            rewards = kto.beta * (policy_logps.detach() - ref_logps).double()
            reported = {
                "reference_point": torch.stack(
                    [metrics["reference_point"].double(), torch.ones((), dtype=torch.float64)]
                ),
                "desirable_reward": torch.stack([rewards[desirable].sum(), desirable.sum().double()]),
                "undesirable_reward": torch.stack([rewards[~desirable].sum(), (~desirable).sum().double()]),
            }
            examples = policy_logps.shape[0]
            return loss.sum(), torch.tensor(examples), reported

        return hidden, loss_func

    return forward_step


def run(config: KTORunConfig) -> Run:
    """Train; returns the finished :class:`~aligner.trainers.run.Run` (``summary``, ``states["policy"]``)."""
    initialize(tp=config.parallel.tp, pp=config.parallel.pp, seed=config.trainer.seed)
    # data
    tokenizer, train, val = load_splits(config.model, config.data, "kto")
    train_loader, val_loader = make_loaders(config.trainer, config.data, train, val)
    # models
    model = build_model_from(config.model, tp=config.parallel.tp, pp=config.parallel.pp)
    check_vocab(tokenizer, model)
    # reference: the initial policy (the run resumes a checkpoint later), run on each step's micro-batches
    annotate = reference_annotator(config.kto, model, frozen_copy(model))
    train_loader = Annotated(train_loader, annotate)
    val_loader = None if val_loader is None else Annotated(val_loader, annotate)
    # loop
    return fit_model(config, model, make_forward_step(config.kto), train_loader, val_loader)


RECIPE = cli.Recipe("kto", "KTO on unpaired desirable/undesirable examples", KTORunConfig, run)


def main(argv: Sequence[str] | None = None) -> None:
    cli.main(RECIPE, argv)


if __name__ == "__main__":
    main()
