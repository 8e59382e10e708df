"""A checkpoint written on one tensor/pipeline/data-parallel layout resumes on another (2 gloo ranks).

A run is interrupted after its step-2 checkpoint and resumed on a different
layout. Right after the load, the new layout's weights and Adam moments,
gathered to full tensors, are bitwise the ones the old layout held when it
saved (megatron's distributed checkpoint stores slices of the full tensors and
reslices them). The resumed steps then equal an uninterrupted single-process
run's to the tolerance of test_offline_parallel (sharding reorders fp32 sums).

The same holds with megatron's distributed optimizer (the GPU configuration:
Adam state and fp32 main weights sharded over data-parallel ranks, saved in its
``fully_reshardable`` form). It accepts parameters by their type string alone
(``torch.cuda.FloatTensor``); reporting CPU tensors as such lets its sharding
and checkpoint code run here on the CPU, under aligner.parallel.megatron_cpu.
On the layout that wrote it, its resume is bitwise the uninterrupted run.
"""

import contextlib

import pytest
import torch
from distributed import run_distributed
from lm_task import Interrupted, OfflineLoop, TokenSteps, lm_forward_step, make_model, optimizer_shards

STEPS, SAVED_AT, GLOBAL_BATCH, MICRO_BATCH = 4, 2, 8, 2
LOSS_RTOL = 1e-5  # as test_offline_parallel: a few ulps per re-associated fp32 sum, over 4 steps
ADAM_EPS = 1e-3  # as test_offline_parallel: keeps Adam's update continuous in near-zero gradients
MOMENTS = ("exp_avg", "exp_avg_sq")


def _gather_moment(model, optimizer, key: str) -> dict[str, torch.Tensor]:
    """Adam's ``key`` moment of every weight, as full tensors (a tensor-parallel collective)."""
    from aligner.models.sharding import gather_full_state_dict

    state = {}
    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        state.update(chained.optimizer.state)
    params = list(model.parameters())
    originals = [param.data for param in params]
    try:
        for param in params:  # gather the moments through the weights' own sharding rules
            param.data = state[param][key]
        return gather_full_state_dict(model)
    finally:
        for param, data in zip(params, originals, strict=True):
            param.data = data


def _report_cpu_tensors_as_cuda() -> None:
    """Make ``Tensor.type()`` name CPU float tensors as CUDA ones (for the rest of this worker process)."""
    names = {
        torch.float32: "torch.cuda.FloatTensor",
        torch.bfloat16: "torch.cuda.BFloat16Tensor",
        torch.float16: "torch.cuda.HalfTensor",
    }
    real_type = torch.Tensor.type

    def type_as_cuda(self, *args, **kwargs):
        if not args and not kwargs and self.device.type == "cpu" and self.dtype in names:
            return names[self.dtype]
        return real_type(self, *args, **kwargs)

    torch.Tensor.type = type_as_cuda


def worker(
    tp: int, pp: int, seed: int, checkpoint_dir: str | None, fail_at: int | None, distributed_optimizer: bool = False
):
    """Train to STEPS (resuming from ``checkpoint_dir`` if it has a checkpoint), stopping at ``fail_at``."""
    from megatron.core import parallel_state

    from aligner.config import CheckpointConfig, OptimConfig, TrainerConfig
    from aligner.models.sharding import gather_full_state_dict
    from aligner.parallel import initialize

    initialize(tp=tp, pp=pp)
    if distributed_optimizer:
        _report_cpu_tensors_as_cuda()
    dp = {"dp_rank": parallel_state.get_data_parallel_rank(), "dp_size": parallel_state.get_data_parallel_world_size()}
    trainer = OfflineLoop(
        make_model(seed),
        lm_forward_step,
        TokenSteps(STEPS, GLOBAL_BATCH, MICRO_BATCH, seed=seed, fail_at=fail_at, **dp),
        trainer=TrainerConfig(global_batch_size=GLOBAL_BATCH, micro_batch_size=MICRO_BATCH, max_steps=STEPS),
        optim=OptimConfig(
            lr=1e-2,
            warmup_steps=1,
            weight_decay=0.1,
            adam_eps=ADAM_EPS,
            clip_grad=0.5,
            distributed_optimizer=distributed_optimizer,
        ),
        checkpoint=CheckpointConfig(dir=checkpoint_dir, save_every=SAVED_AT),
    )
    assert bool(trainer.optimizer.config.use_distributed_optimizer) == distributed_optimizer

    def snapshot() -> dict:
        state = {"weights": gather_full_state_dict(trainer.model), "step": trainer.step}
        if trainer.step > 0 and not distributed_optimizer:
            for key in MOMENTS:
                state[key] = _gather_moment(trainer.model, trainer.optimizer, key)
        return state

    at_start = snapshot()  # collectives: every rank takes part
    shards_at_start = optimizer_shards(trainer.optimizer) if distributed_optimizer and at_start["step"] else None
    with contextlib.suppress(Interrupted):
        trainer.fit()
    at_end = snapshot()
    first_replica = (
        parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_data_parallel_rank() == 0
    )
    return {
        "start": at_start if first_replica else None,
        "end": at_end if first_replica else None,
        "history": trainer.summary.history,
        "shards": (shards_at_start, optimizer_shards(trainer.optimizer)) if distributed_optimizer else None,
    }


def _merged(results: list[dict], when: str) -> dict:
    """One full state from the pipeline stages' first replicas."""
    merged: dict = {}
    for result in results:
        if result[when] is None:
            continue
        for key, value in result[when].items():
            if isinstance(value, dict):
                merged.setdefault(key, {}).update(value)
            else:
                merged[key] = value
    return merged


def _assert_bitwise(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == want.keys(), what
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), f"{what}: {name}"


@pytest.fixture(scope="module")
def straight(module_seed):
    """The uninterrupted single-process run."""
    return run_distributed(worker, 1, args=(1, 1, module_seed, None, None))[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    "saved, resumed", [((2, 1), (1, 1)), ((1, 2), (2, 1)), ((1, 1), (1, 2))], ids=["tp2-to-1", "pp2-to-tp2", "1-to-pp2"]
)
def test_resume_on_another_layout(saved, resumed, straight, module_seed, tmp_path):
    world = {(1, 1): 1, (2, 1): 2, (1, 2): 2}
    first = run_distributed(worker, world[saved], args=(*saved, module_seed, str(tmp_path), SAVED_AT))
    second = run_distributed(worker, world[resumed], args=(*resumed, module_seed, str(tmp_path), None))

    saved_state, loaded_state = _merged(first, "end"), _merged(second, "start")
    assert saved_state["step"] == loaded_state["step"] == SAVED_AT
    _assert_bitwise(loaded_state["weights"], saved_state["weights"], "weights")
    for key in MOMENTS:
        _assert_bitwise(loaded_state[key], saved_state[key], key)
    # The weights moved since the start: the comparison above is not vacuous.
    assert not torch.equal(
        saved_state["weights"]["decoder.final_layernorm.weight"],
        _merged(first, "start")["weights"]["decoder.final_layernorm.weight"],
    )

    want = straight["history"]
    for result in second:
        got = result["history"]
        assert [h["step"] for h in got] == [3, 4]
        for key in ("loss", "grad_norm", "lr"):
            assert [h[key] for h in got] == pytest.approx([h[key] for h in want[SAVED_AT:]], rel=LOSS_RTOL), key
        assert [h["count"] for h in got] == [h["count"] for h in want[SAVED_AT:]]


@pytest.fixture(scope="module")
def straight_dp2(module_seed):
    """The uninterrupted run with the distributed optimizer over 2 data-parallel ranks."""
    return run_distributed(worker, 2, args=(1, 1, module_seed, None, None, True))


@pytest.mark.slow
def test_distributed_optimizer_resume_is_bitwise(straight_dp2, module_seed, tmp_path):
    first = run_distributed(worker, 2, args=(1, 1, module_seed, str(tmp_path), SAVED_AT, True))
    second = run_distributed(worker, 2, args=(1, 1, module_seed, str(tmp_path), None, True))

    full_size = sum(t.numel() for t in _merged(first, "end")["weights"].values())
    for rank in range(2):
        saved, loaded = first[rank]["shards"][1], second[rank]["shards"][0]
        assert len(saved) == len(loaded) > 0
        assert all(torch.equal(a, b) for a, b in zip(saved, loaded, strict=True)), f"rank {rank}'s optimizer shard"
        assert 0 < sum(t.numel() for t in saved[::3]) < full_size  # main weights: a part of the model on each rank
    for result, want in zip(second, straight_dp2, strict=True):
        for key in ("loss", "grad_norm", "lr", "accuracy", "count"):
            assert [h[key] for h in result["history"]] == [h[key] for h in want["history"][SAVED_AT:]], key
    _assert_bitwise(_merged(second, "end")["weights"], _merged(straight_dp2, "end")["weights"], "final weights")


@pytest.mark.slow
def test_distributed_optimizer_resume_on_another_layout(straight_dp2, module_seed, tmp_path):
    """Saved over 2 data-parallel ranks, resumed over 2 tensor-parallel ranks (each holding all the state)."""
    first = run_distributed(worker, 2, args=(1, 1, module_seed, str(tmp_path), SAVED_AT, True))
    second = run_distributed(worker, 2, args=(2, 1, module_seed, str(tmp_path), None, True))

    _assert_bitwise(_merged(second, "start")["weights"], _merged(first, "end")["weights"], "weights")
    want = straight_dp2[0]["history"][SAVED_AT:]
    for result in second:
        got = result["history"]
        assert [h["step"] for h in got] == [3, 4]
        for key in ("loss", "grad_norm", "lr"):
            assert [h[key] for h in got] == pytest.approx([h[key] for h in want], rel=LOSS_RTOL), key
