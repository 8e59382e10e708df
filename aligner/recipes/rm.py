"""Reward models: pairwise (Bradley-Terry) or multi-attribute regression (SteerLM / HelpSteer2).

    torchrun --nproc_per_node=2 -m aligner.recipes.rm --config configs/rm_tiny.yaml
    torchrun --nproc_per_node=2 -m aligner.recipes.rm --config configs/rm_regression_tiny.yaml

The model is the backbone with a scalar head (``num_outputs`` per token) read at
each sequence's last real token.

- ``rm.kind: pairwise`` on preference jsonl (``prompt``/``chosen``/``rejected``):
  ``-logsigmoid(r_c - r_r - margin) + centering_coef * (r_c + r_r)^2`` averaged
  over the global batch's pairs; reports accuracy and margins.
- ``rm.kind: regression`` on attribute jsonl (``prompt``/``response``/``attributes``
  or HelpSteer2 columns): squared error over the labelled attributes, averaged
  over every labelled (example, attribute) entry of the global batch; missing
  labels (-100) are masked.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from aligner import cli
from aligner.algorithms.dpo import split_pairs
from aligner.algorithms.logprobs import last_token_values
from aligner.algorithms.reward import pairwise_loss, regression_loss
from aligner.data.splits import load_splits, make_loaders
from aligner.models.loading import build_model_from, check_vocab
from aligner.parallel import initialize
from aligner.rewards.model_config import KINDS, RMConfig, RMRunConfig  # noqa: F401  (KINDS: re-exported)
from aligner.trainers.fit import fit_model
from aligner.trainers.run import Run
from aligner.trainers.step import weighted_metrics


def make_forward_step(rm: RMConfig):
    """The step's ``forward_step``: (summed loss, pairs or labelled entries, metrics)."""

    def forward_step(batch, model):
        values = model(batch["input_ids"], None, None)  # [B, S, num_outputs] on the last stage

        def loss_func(values: torch.Tensor):
            rewards = last_token_values(values.float(), batch["lengths"])  # [B, num_outputs]
            if rm.kind == "pairwise":
                chosen, rejected = split_pairs(rewards[:, 0])
                loss, metrics = pairwise_loss(
                    chosen, rejected, margin=rm.margin or None, centering_coef=rm.centering_coef
                )
                pairs = torch.tensor(chosen.shape[0])
                return loss.sum(), pairs, weighted_metrics(metrics, chosen.shape[0])
            loss, metrics = regression_loss(rewards, batch["attributes"])
            per_attribute = {
                f"mse_{name}": torch.stack([sse, count.double()])
                for name, sse, count in zip(
                    rm.attribute_names,
                    metrics["attribute_mse"].double() * metrics["attribute_count"],
                    metrics["attribute_count"],
                    strict=True,
                )
            }
            return loss.sum(), metrics["num_labels"], per_attribute

        return values, loss_func

    return forward_step


def run(config: RMRunConfig) -> Run:
    """Train; returns the finished :class:`~aligner.trainers.run.Run` (``summary``, ``states["reward_model"]``)."""
    initialize(tp=config.parallel.tp, pp=config.parallel.pp, seed=config.trainer.seed)
    # data
    kind = "preference" if config.rm.kind == "pairwise" else "regression"
    names = config.rm.attribute_names if kind == "regression" else ()
    tokenizer, train, val = load_splits(config.model, config.data, kind, names)
    train_loader, val_loader = make_loaders(config.trainer, config.data, train, val)
    # model: the backbone with a scalar head per output
    model = build_model_from(
        config.model, num_value_outputs=config.rm.num_outputs, tp=config.parallel.tp, pp=config.parallel.pp
    )
    check_vocab(tokenizer, model)
    # loop
    return fit_model(config, model, make_forward_step(config.rm), train_loader, val_loader, name="reward_model")


RECIPE = cli.Recipe("rm", "Reward model training (pairwise or regression)", RMRunConfig, run)


def main(argv: Sequence[str] | None = None) -> None:
    cli.main(RECIPE, argv)


if __name__ == "__main__":
    main()
