"""Supervised fine-tuning: token-mean NLL of the response tokens over the global batch.

    torchrun --nproc_per_node=2 -m aligner.recipes.sft --config configs/sft_tiny.yaml trainer.max_steps=50

Data: ``{"input", "output"}`` or ``{"messages": [...]}`` jsonl (every assistant
turn is trained, system and user turns are masked). The loss of a step is
``sum of NLL over every trained token of the global batch / their number``
(:func:`aligner.algorithms.sft.sft_loss`; the step normalizes globally). Token
log-probs come from the final hidden states through the fused LM head: the
``[batch, seq, vocab]`` logits are never held.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from aligner import cli
from aligner.algorithms.sft import sft_loss
from aligner.config import RunConfig
from aligner.data import IGNORE_INDEX
from aligner.data.splits import load_splits, make_loaders
from aligner.models.lm_head import lm_hidden_states, lm_token_logprobs
from aligner.models.loading import build_model_from, check_vocab
from aligner.parallel import initialize
from aligner.trainers.fit import fit_model
from aligner.trainers.run import Run


@dataclass
class SFTRunConfig(RunConfig):
    """Supervised fine-tuning: the shared sections only."""


def forward_step(batch, model):
    """The step's ``forward_step`` for SFT: (summed NLL, trained tokens, no metrics)."""
    hidden = lm_hidden_states(model, batch["input_ids"])

    def loss_func(hidden):
        token_logps = lm_token_logprobs(model, hidden, batch["labels"])
        nll, metrics = sft_loss(token_logps, batch["labels"] != IGNORE_INDEX)
        return nll.sum(), metrics["num_tokens"], {}

    return hidden, loss_func


def run(config: SFTRunConfig) -> Run:
    """Train; returns the finished :class:`~aligner.trainers.run.Run` (``summary``, ``states["policy"]``)."""
    initialize(tp=config.parallel.tp, pp=config.parallel.pp, seed=config.trainer.seed)
    # data
    tokenizer, train, val = load_splits(config.model, config.data, "sft")
    train_loader, val_loader = make_loaders(config.trainer, config.data, train, val)
    # model
    model = build_model_from(config.model, tp=config.parallel.tp, pp=config.parallel.pp)
    check_vocab(tokenizer, model)
    # loop; a collapsed model's token NLL is ln(vocab_size)
    uniform_loss = math.log(model.aligner_config.vocab_size)
    return fit_model(config, model, forward_step, train_loader, val_loader, uniform_loss=uniform_loss)


RECIPE = cli.Recipe("sft", "Supervised fine-tuning (SFT)", SFTRunConfig, run)


def main(argv: Sequence[str] | None = None) -> None:
    cli.main(RECIPE, argv)


if __name__ == "__main__":
    main()
