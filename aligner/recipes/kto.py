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

from aligner.algorithms.kto import kto_loss, kto_reference_point
from aligner.algorithms.logprobs import sequence_logprobs
from aligner.config import CheckpointConfig, LoggingConfig, OptimConfig, ParallelConfig, TrainerConfig, load_config
from aligner.recipes.common import (
    Annotated,
    DataSection,
    ModelSection,
    fit,
    forward_only_sequence_logprobs,
    frozen_copy,
    make_loaders,
    parse_command_line,
    prepare_run,
    report,
    tensor_parallel_group,
    to_device,
)


@dataclass
class KTOSection:
    """The KTO objective.

    Attributes:
        beta: inverse temperature.
        desirable_weight, undesirable_weight: class weights; the KTO paper advises
            ``desirable_weight * n_desirable ~ undesirable_weight * n_undesirable`` (up to 4:3).
        use_kl_reference_point: estimate ``z`` from mismatched pairs; False uses ``z = 0``.
    """

    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    use_kl_reference_point: bool = True

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"kto.beta must be > 0, got {self.beta}")
        if self.desirable_weight < 0 or self.undesirable_weight < 0:
            raise ValueError("kto.desirable_weight and kto.undesirable_weight must be >= 0")


@dataclass
class KTORunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    kto: KTOSection = field(default_factory=KTOSection)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def reference_annotator(kto: KTOSection, policy, reference_model, *, vocab_size: int, tp_group, dp_group):
    """``annotate`` for :class:`~aligner.recipes.common.Annotated`: adds ``ref_logps`` and ``reference_point``.

    Per micro-batch: the reference's sequence log-probs, and ``z`` from the
    mismatched pairs of this micro-batch on every data-parallel rank (one
    all-reduce of two numbers among the last pipeline stage's replicas), the
    policy's log-probs taken with its current weights and no gradient.
    """
    device = next(reference_model.parameters()).device

    def sums(model, batch, input_key, labels_key):
        return forward_only_sequence_logprobs(
            model, batch, input_key=input_key, labels_key=labels_key, vocab_size=vocab_size, tp_group=tp_group
        )

    def annotate(micro_batches: list[dict]) -> list[dict]:
        annotated = []
        for batch in micro_batches:
            on_device = to_device(batch, device)
            ref_logps = sums(reference_model, on_device, "input_ids", "labels")
            if kto.use_kl_reference_point:
                kl_policy = sums(policy, on_device, "kl_input_ids", "kl_labels")
                kl_ref = sums(reference_model, on_device, "kl_input_ids", "kl_labels")
            if ref_logps is None:  # not the last pipeline stage: the loss is not computed here
                annotated.append(batch)
                continue
            reference_point = torch.zeros((), dtype=torch.float64, device=device)
            if kto.use_kl_reference_point:
                total, count = kto_reference_point(kl_policy, kl_ref)
                packed = torch.stack([total.double(), count.double()])
                dist.all_reduce(packed, group=dp_group)
                reference_point = packed[0] / packed[1].clamp(min=1)
            annotated.append({**batch, "ref_logps": ref_logps, "reference_point": reference_point})
        return annotated

    return annotate


def make_forward_step(kto: KTOSection, vocab_size: int, tp_group):
    """The trainer's ``forward_step``: (summed per-example loss, examples, metrics).

    ``batch`` carries ``ref_logps`` and ``reference_point`` (:func:`reference_annotator`).
    """

    def forward_step(batch, model):
        logits = model(batch["input_ids"], None, None)

        def loss_func(logits: torch.Tensor):  # on the last pipeline stage, where the batch is annotated
            ref_logps, reference_point = batch["ref_logps"], batch["reference_point"]
            _, policy_logps, _ = sequence_logprobs(logits, batch["labels"], vocab_size=vocab_size, tp_group=tp_group)
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

        return logits, loss_func

    return forward_step


def run(config: KTORunConfig):
    """Train; returns the fitted :class:`~aligner.trainers.offline.OfflineTrainer` (``summary``, ``model``)."""
    train, val, model = prepare_run(config, "kto")
    from megatron.core import parallel_state

    reference_model = frozen_copy(model)  # initial weights: the trainer resumes a checkpoint later
    annotate = reference_annotator(
        config.kto,
        model,
        reference_model,
        vocab_size=model.aligner_config.vocab_size,
        tp_group=tensor_parallel_group(),
        dp_group=parallel_state.get_data_parallel_group(),
    )
    train_loader, val_loader = make_loaders(config, train, val)
    val_loader = None if val_loader is None else Annotated(val_loader, annotate)
    forward_step = make_forward_step(config.kto, model.aligner_config.vocab_size, tensor_parallel_group())
    return fit(config, model, forward_step, Annotated(train_loader, annotate), val_loader)


def main(argv: Sequence[str] | None = None) -> None:
    path, overrides = parse_command_line(argv, "KTO on unpaired desirable/undesirable examples")
    report("kto", run(load_config(KTORunConfig, path, overrides)))


if __name__ == "__main__":
    main()
