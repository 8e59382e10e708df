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

The reference is the initial policy, frozen and run on every micro-batch; the
mismatched pairs need full forward passes of both models before the loss, so
KTO runs with pipeline size 1 (tensor and data parallelism as usual).
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
    DataSection,
    ModelSection,
    build_model_from,
    check_vocab,
    fit,
    frozen_copy,
    load_dataset_split,
    load_tokenizer_for,
    make_loaders,
    parse_command_line,
    report,
    setup,
    tensor_parallel_group,
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


def make_forward_step(kto: KTOSection, vocab_size: int, tp_group, reference_model, dp_group):
    """The trainer's ``forward_step``: (summed per-example loss, examples, metrics)."""

    def sums(model, input_ids, labels):
        logits = model(input_ids, None, None)
        return sequence_logprobs(logits, labels, vocab_size=vocab_size, tp_group=tp_group)[1]

    def forward_step(batch, model):
        with torch.no_grad():
            ref_logps = sums(reference_model, batch["input_ids"], batch["labels"])
            reference_point = torch.zeros((), dtype=torch.float64)
            if kto.use_kl_reference_point:
                kl_policy = sums(model, batch["kl_input_ids"], batch["kl_labels"])
                kl_ref = sums(reference_model, batch["kl_input_ids"], batch["kl_labels"])
                total, count = kto_reference_point(kl_policy, kl_ref)
                packed = torch.stack([total.double(), count.double()])
                dist.all_reduce(packed, group=dp_group)
                reference_point = packed[0] / packed[1].clamp(min=1)
        logits = model(batch["input_ids"], None, None)

        def loss_func(logits: torch.Tensor):
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
    if config.parallel.pp > 1:
        raise ValueError("KTO runs with parallel.pp=1 (see aligner.recipes.kto)")
    setup(config.parallel, config.trainer)
    from megatron.core import parallel_state

    tokenizer = load_tokenizer_for(config.model, config.data)
    train = load_dataset_split(config.data.train, "kto", tokenizer, config.data)
    val = None if config.data.val is None else load_dataset_split(config.data.val, "kto", tokenizer, config.data)
    model = build_model_from(config.model, tp=config.parallel.tp, pp=config.parallel.pp)
    check_vocab(tokenizer, model)
    reference_model = frozen_copy(model)  # initial weights: the trainer resumes a checkpoint later
    forward_step = make_forward_step(
        config.kto,
        model.aligner_config.vocab_size,
        tensor_parallel_group(),
        reference_model,
        parallel_state.get_data_parallel_group(),
    )
    return fit(config, model, forward_step, *make_loaders(config, train, val))


def main(argv: Sequence[str] | None = None) -> None:
    path, overrides = parse_command_line(argv, "KTO on unpaired desirable/undesirable examples")
    report("kto", run(load_config(KTORunConfig, path, overrides)))


if __name__ == "__main__":
    main()
