"""A tiny next-token task for trainer tests, independent of aligner.data and aligner.algorithms.

- :class:`TokenSteps`: a resumable data source in the trainer's format (per step,
  this rank's list of micro-batch dicts following the batch contract:
  right-padded ``input_ids``, ``labels`` = next token on response positions and
  -100 elsewhere, ``lengths``). Rows have random lengths and prompt lengths, so
  micro-batches carry different numbers of trained tokens.
- :func:`lm_forward_step`: summed next-token NLL over trained tokens with a
  token-count-weighted accuracy metric.
- :func:`random_full_state_dict` / :func:`make_model`: the same weights on any
  tensor/pipeline layout.
- :func:`optimizer_shards`: a distributed optimizer's state on one rank, for checkpoint tests.
- :class:`OfflineLoop`: the offline loop as a recipe composes it (train state, run,
  :func:`aligner.trainers.fit.fit`), behind one object the trainer tests drive.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from model_weights import random_full_state_dict

from aligner.config import CheckpointConfig, LoggingConfig, OptimConfig, TrainerConfig
from aligner.models.config import ModelConfig

CONFIG = ModelConfig(
    num_layers=2,
    hidden_size=32,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=64,
    vocab_size=64,
    max_position_embeddings=64,
)
SEQ = 16
PAD_ID = 0


def make_model(seed: int, **config_changes):
    """This rank's shard of CONFIG (with ``config_changes``) holding :func:`random_full_state_dict` weights."""
    from aligner.models.gpt import build_model
    from aligner.models.sharding import load_full_state_dict

    config = replace(CONFIG, **config_changes)
    model = build_model(config, init_weights=False)
    load_full_state_dict(model, random_full_state_dict(config, seed))
    return model


def make_rows(generator: torch.Generator, rows: int) -> dict[str, torch.Tensor]:
    """``rows`` right-padded sequences of random length with a random prompt part."""
    input_ids = torch.full((rows, SEQ), PAD_ID, dtype=torch.long)
    labels = torch.full((rows, SEQ), -100, dtype=torch.long)
    lengths = torch.randint(3, SEQ + 1, (rows,), generator=generator)
    for row, length in enumerate(lengths.tolist()):
        input_ids[row, :length] = torch.randint(1, CONFIG.vocab_size, (length,), generator=generator)
        prompt = int(torch.randint(1, length - 1, (), generator=generator))
        # label t = token t+1 for response tokens t+1 in [prompt, length)
        labels[row, prompt - 1 : length - 1] = input_ids[row, prompt:length]
    return {"input_ids": input_ids, "labels": labels, "lengths": lengths}


class TokenSteps:
    """``steps_per_epoch`` global batches per epoch, drawn from ``(seed, step index)``; resumable.

    Each global batch has ``global_batch_size`` rows, cut into micro-batches of
    ``micro_batch_size``; data-parallel rank r gets micro-batches r, r + dp, ...
    ``fail_at`` raises :class:`Interrupted` when that (0-based) step is requested,
    standing in for a crash.
    """

    def __init__(
        self,
        steps_per_epoch: int,
        global_batch_size: int,
        micro_batch_size: int,
        *,
        seed: int = 0,
        dp_rank: int = 0,
        dp_size: int = 1,
        fail_at: int | None = None,
        bad_step: int | None = None,
    ):
        self.steps_per_epoch = steps_per_epoch
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.fail_at = fail_at
        self.bad_step = bad_step
        self.position = 0

    def __len__(self) -> int:
        return self.steps_per_epoch

    def global_batch(self, index: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + index)
        return make_rows(generator, self.global_batch_size)

    def __iter__(self):
        epoch_end = (self.position // self.steps_per_epoch + 1) * self.steps_per_epoch
        while self.position < epoch_end:
            if self.position == self.fail_at:
                raise Interrupted(f"simulated crash before step {self.position + 1}")
            rows = self.global_batch(self.position)
            if self.position == self.bad_step:
                rows["poison"] = torch.tensor(True)
            self.position += 1
            micro = [
                {k: (v[s : s + self.micro_batch_size] if v.dim() else v) for k, v in rows.items()}
                for s in range(0, self.global_batch_size, self.micro_batch_size)
            ]
            yield micro[self.dp_rank :: self.dp_size]

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = state["position"]


class Interrupted(Exception):
    pass


def lm_forward_step(batch, model):
    """Next-token NLL summed over trained tokens; ``count`` = trained tokens.

    A batch with ``poison`` set makes the loss infinite (for the non-finite test).
    """
    logits = model(batch["input_ids"], None, None, runtime_gather_output=True)

    def loss_func(logits):  # [b, s, vocab] on the last stage
        labels = batch["labels"]
        mask = labels != -100
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        picked = logprobs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        nll = -(picked * mask).sum()
        if "poison" in batch:
            nll = nll + float("inf")
        count = mask.sum()
        correct = ((logits.argmax(-1) == labels) & mask).sum()
        return nll, count, {"accuracy": torch.stack([correct, count]), "rows": torch.tensor(float(labels.shape[0]))}

    return logits, loss_func


def optimizer_shards(optimizer) -> list[torch.Tensor]:
    """A distributed optimizer's state on this rank, on the CPU: its fp32 main weight shards and their Adam moments."""
    tensors = []
    for chained in optimizer.chained_optimizers:
        for group in chained.optimizer.param_groups:
            for param in group["params"]:
                tensors.append(param.detach().cpu().clone())
                tensors.extend(chained.optimizer.state[param][key].cpu().clone() for key in ("exp_avg", "exp_avg_sq"))
    return tensors


@dataclass
class LoopConfig:
    """The sections a run reads; a dataclass, so that checkpoints write it as config.yaml."""

    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=lambda: LoggingConfig(progress_bar=False))


class OfflineLoop:
    """One trained model on ``data``, composed as the recipes do; resumes on construction, trains on :meth:`fit`."""

    def __init__(self, model, forward_step, data, *, trainer, optim, checkpoint=None, logging=None, val_data=None):
        from aligner.trainers.run import Run, run_length
        from aligner.trainers.state import build_train_state

        config = LoopConfig(trainer, optim, checkpoint or CheckpointConfig())
        if logging is not None:
            config.logging = logging
        steps = run_length(trainer, data)
        self.state = build_train_state(model, optim, total_steps=steps, bf16=trainer.bf16)
        self.run = Run(config, {"policy": self.state}, total_steps=steps, data=data)
        self.run.resume()
        self.forward_step, self.data, self.val_data = forward_step, data, val_data

    def fit(self):
        from aligner.trainers.fit import fit

        return fit(self.run, self.state, self.forward_step, self.data, self.val_data).summary

    @property
    def model(self):
        return self.state.model

    @property
    def optimizer(self):
        return self.state.optimizer

    @property
    def step(self) -> int:
        return self.run.step

    @property
    def summary(self):
        return self.run.summary
