"""Supervised fine-tuning: token-mean NLL of the response tokens over the global batch.

    torchrun --nproc_per_node=2 -m aligner.recipes.sft --config configs/sft_tiny.yaml trainer.max_steps=50

Data: ``{"input", "output"}`` or ``{"messages": [...]}`` jsonl (every assistant
turn is trained, system and user turns are masked). The loss of a step is
``sum of NLL over every trained token of the global batch / their number``
(:func:`aligner.algorithms.sft.sft_loss`; the trainer normalizes globally).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from aligner.algorithms.logprobs import sequence_logprobs
from aligner.algorithms.sft import sft_loss
from aligner.config import CheckpointConfig, LoggingConfig, OptimConfig, ParallelConfig, TrainerConfig, load_config
from aligner.recipes.common import (
    DataSection,
    ModelSection,
    fit,
    make_loaders,
    parse_command_line,
    prepare_run,
    report,
    tensor_parallel_group,
)


@dataclass
class SFTRunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def make_forward_step(vocab_size: int, tp_group):
    """The trainer's ``forward_step`` for SFT: (summed NLL, trained tokens, metrics)."""

    def forward_step(batch, model):
        logits = model(batch["input_ids"], None, None)  # [B, S, V / tp] on the last stage

        def loss_func(logits: torch.Tensor):
            token_logps, _, _ = sequence_logprobs(logits, batch["labels"], vocab_size=vocab_size, tp_group=tp_group)
            nll, metrics = sft_loss(token_logps, batch["labels"] != -100)
            return nll.sum(), metrics["num_tokens"], {}

        return logits, loss_func

    return forward_step


def run(config: SFTRunConfig):
    """Train; returns the fitted :class:`~aligner.trainers.offline.OfflineTrainer` (``summary``, ``model``)."""
    train, val, model = prepare_run(config, "sft")
    forward_step = make_forward_step(model.aligner_config.vocab_size, tensor_parallel_group())
    return fit(config, model, forward_step, *make_loaders(config, train, val))


def main(argv: Sequence[str] | None = None) -> None:
    path, overrides = parse_command_line(argv, "Supervised fine-tuning (SFT)")
    report("sft", run(load_config(SFTRunConfig, path, overrides)))


if __name__ == "__main__":
    main()
