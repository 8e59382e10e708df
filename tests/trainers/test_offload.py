"""aligner.trainers.offload on CPU: what it would move (the slots), and that nothing moves off a CPU model.

The moves themselves run on a GPU: tests/cuda/test_offload_cuda.py.
"""

import torch
from distributed import run_distributed

from aligner.models.config import ModelConfig

CONFIG = ModelConfig(
    num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64, vocab_size=50
)


def offload_worker():
    from aligner.config import OptimConfig
    from aligner.models.gpt import build_model
    from aligner.parallel import destroy, initialize
    from aligner.trainers.offload import gpu_resident, optimizer_off_gpu, optimizer_slots
    from aligner.trainers.state import build_train_state
    from aligner.trainers.step import train_step

    initialize(seed=3)
    state = build_train_state(build_model(CONFIG), OptimConfig(lr=1e-2), total_steps=2)
    before_step = optimizer_slots(state, "cpu")
    ids = torch.randint(0, CONFIG.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))

    def forward_step(batch, model):
        output = model(batch["input_ids"], None, None, labels=batch["input_ids"])

        def loss_func(per_token):
            return per_token.sum(), torch.tensor(per_token.numel()), {}

        return output, loss_func

    train_step(state, [{"input_ids": ids}], forward_step)
    slots = optimizer_slots(state, "cpu")
    model_params = {id(p) for p in state.model.parameters()}
    weights = {name: p.detach().clone() for name, p in state.model.named_parameters()}
    with optimizer_off_gpu(state, enabled=True) as moved, gpu_resident(state.model, enabled=True) as resident:
        on_cpu = all(p.device.type == "cpu" for p in state.model.parameters())
    unchanged = all(torch.equal(weights[name], p) for name, p in state.model.named_parameters())
    result = {
        "slots_before_step": len(before_step),
        "slot_kinds": sorted({key for _, key in slots}),
        "moves_model_params": any(key == "data" and id(holder) in model_params for holder, key in slots),
        "num_params": sum(1 for _ in state.model.parameters()),
        "num_slots": len(slots),
        "moved": moved,
        "resident": resident,
        "on_cpu": on_cpu,
        "unchanged": unchanged,
    }
    destroy()
    return result


def test_slots_are_the_optimizer_state_never_the_models_parameters_and_cpu_models_stay():
    (result,) = run_distributed(offload_worker, 1)
    # fp32 training without the distributed optimizer: the optimizer's parameters are the model's (the engine
    # reads them), so only Adam's two moments of every parameter are slots, and only once a step made them
    assert result["slots_before_step"] == 0
    assert result["slot_kinds"] == ["exp_avg", "exp_avg_sq"]
    assert not result["moves_model_params"]
    assert result["num_slots"] == 2 * result["num_params"]
    # on the CPU nothing moves
    assert result["moved"] == 0 and result["resident"] == 0
    assert result["on_cpu"] and result["unchanged"]
