"""A run with two trained models and a registered controller (the shape of PPO), resumed bitwise.

The loop is written here from the shared pieces, as an online recipe writes its
own: per step the actor takes a train_step, the critic's values are read with
forward_only, then the critic takes a train_step, and a controller updated from
the step's metrics is registered with the run. An interrupted and resumed run
must equal an uninterrupted one: both models' weights and Adam states, the
controller, the data position and every metric.
"""

import contextlib

import pytest
import torch
from distributed import run_distributed
from lm_task import CONFIG, SEQ, Interrupted, LoopConfig, TokenSteps, lm_forward_step, make_model

STEPS, GLOBAL_BATCH, MICRO_BATCH = 5, 4, 2


class Controller:
    """An adaptive coefficient that follows the actor's loss (stands in for a KL controller)."""

    def __init__(self) -> None:
        self.value = 1.0
        self.updates = 0

    def update(self, loss: float) -> None:
        self.value = 0.9 * self.value + 0.1 * loss
        self.updates += 1

    def state_dict(self) -> dict:
        return {"value": self.value, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.updates = state["value"], state["updates"]


def value_forward_step(batch, model):
    """Squared error of the last-token value against the row's relative length."""
    from aligner.algorithms.logprobs import last_token_values

    values = model(batch["input_ids"], None, None)  # [B, S, 1]

    def loss_func(values):
        predicted = last_token_values(values.float(), batch["lengths"])[:, 0]
        target = batch["lengths"].float() / SEQ
        return ((predicted - target) ** 2).sum(), torch.tensor(predicted.shape[0]), {}

    return values, loss_func


def values_step(batch, model):
    values = model(batch["input_ids"], None, None)
    return values, lambda values: values[..., 0].float().clone()


def worker(seed: int, checkpoint_dir: str | None, fail_at: int | None):
    from aligner.config import CheckpointConfig, OptimConfig, TrainerConfig
    from aligner.models.gpt import build_model
    from aligner.models.schedule import forward_only
    from aligner.models.sharding import gather_full_state_dict
    from aligner.parallel import initialize
    from aligner.trainers.rollouts import SamplingGenerator
    from aligner.trainers.run import Run
    from aligner.trainers.state import build_train_state
    from aligner.trainers.step import train_step

    initialize(seed=seed)
    optim = OptimConfig(lr=1e-2, warmup_steps=1, weight_decay=0.1)
    actor = build_train_state(make_model(seed, hidden_dropout=0.1), optim, total_steps=STEPS)
    critic = build_train_state(build_model(CONFIG, num_value_outputs=1), optim, total_steps=STEPS)
    config = LoopConfig(
        trainer=TrainerConfig(global_batch_size=GLOBAL_BATCH, micro_batch_size=MICRO_BATCH, max_steps=STEPS),
        optim=optim,
        checkpoint=CheckpointConfig(dir=checkpoint_dir, save_every=1),
    )
    rows_per_rank = GLOBAL_BATCH // torch.distributed.get_world_size()  # (data-parallel replicas see alike rows)
    data = TokenSteps(STEPS, rows_per_rank, MICRO_BATCH, seed=seed, fail_at=fail_at)
    controller = Controller()
    run = Run(config, {"actor": actor, "critic": critic}, total_steps=STEPS, data=data)
    run.register("controller", controller)
    stream = SamplingGenerator(seed)  # differs per data-parallel rank, as an engine's sampling stream
    run.register("stream", stream, per_rank=True)
    start = run.step
    resumed_from = run.resume()
    value_sums, draws = [], []
    with contextlib.suppress(Interrupted), run:
        for micro_batches in run.steps(data):
            draws.append(torch.rand(1, generator=stream.generator).item())
            actor_metrics = train_step(actor, micro_batches, lm_forward_step)
            values = forward_only(critic.ddp_model, micro_batches, values_step)
            value_sums.append(float(sum(v.sum() for v in values)))
            critic_metrics = train_step(critic, micro_batches, value_forward_step)
            controller.update(actor_metrics["loss"])
            run.end_step({**actor_metrics, "critic_loss": critic_metrics["loss"], "coef": controller.value})
            run.save_if_due()
        run.finish()
    return {
        "start": start,
        "resumed_from": None if resumed_from is None else resumed_from.name,
        "history": run.summary.history,
        "value_sums": value_sums,
        "draws": draws,
        "controller": controller.state_dict(),
        "state_steps": (actor.step, critic.step),
        "actor": gather_full_state_dict(actor.model),
        "critic": gather_full_state_dict(critic.model),
    }


@pytest.mark.slow
def test_two_models_and_a_controller_resume_bitwise(tmp_path, fresh_seed):
    (straight,) = run_distributed(worker, 1, args=(fresh_seed, None, None))
    root = str(tmp_path / "ckpt")
    (first,) = run_distributed(worker, 1, args=(fresh_seed, root, 2))
    (second,) = run_distributed(worker, 1, args=(fresh_seed, root, None))

    assert len(first["history"]) == 2 and second["resumed_from"] == "step_000002"
    assert second["state_steps"] == straight["state_steps"] == (STEPS, STEPS)
    resumed = first["history"] + second["history"]
    for key in ("loss", "critic_loss", "coef", "grad_norm", "lr"):
        assert [h[key] for h in resumed] == [h[key] for h in straight["history"]], key
    assert first["value_sums"] + second["value_sums"] == straight["value_sums"]
    assert second["controller"] == straight["controller"] and straight["controller"]["updates"] == STEPS
    for model in ("actor", "critic"):
        for name, want in straight[model].items():
            assert torch.equal(second[model][name], want), (model, name)
    assert first["draws"] + second["draws"] == straight["draws"]
    meta = (tmp_path / "ckpt" / "step_000005" / "meta.json").read_text()
    assert '"actor"' in meta and '"critic"' in meta


@pytest.mark.slow
def test_each_data_parallel_rank_resumes_its_own_stream(tmp_path, fresh_seed):
    """A per-rank registered state (each replica's sampling stream) comes back to the rank that saved it."""
    straight = run_distributed(worker, 2, args=(fresh_seed, None, None))
    root = str(tmp_path / "ckpt")
    first = run_distributed(worker, 2, args=(fresh_seed, root, 2))
    second = run_distributed(worker, 2, args=(fresh_seed, root, None))
    for rank in range(2):
        assert second[rank]["resumed_from"] == "step_000002"
        assert first[rank]["draws"] + second[rank]["draws"] == straight[rank]["draws"], rank
    assert straight[0]["draws"] != straight[1]["draws"]  # the replicas draw differently: the test is not vacuous
