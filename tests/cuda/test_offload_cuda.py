"""aligner.trainers.offload on a GPU: frozen models and optimizer state leave the GPU and come back unchanged.

Two runs of the same three training steps, one with the optimizer state and gradient
buffers moved off the GPU between steps 1 and 2 and a frozen copy held off it outside
its passes: the freed memory shows in ``torch.cuda.memory_allocated``, and the weights
after step 3 are bitwise those of the run that moved nothing.
"""

import torch
from distributed import run_distributed

from aligner.models.config import ModelConfig

CONFIG = ModelConfig(
    num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128, vocab_size=96
)


def offload_worker(offload: bool):
    from aligner.config import OptimConfig
    from aligner.models.gpt import build_model
    from aligner.models.loading import frozen_copy
    from aligner.parallel import destroy, initialize
    from aligner.trainers.offload import gpu_resident, offload_frozen, optimizer_off_gpu
    from aligner.trainers.state import build_train_state
    from aligner.trainers.step import train_step

    initialize(seed=3)
    state = build_train_state(build_model(CONFIG), OptimConfig(lr=1e-2), total_steps=3)
    reference = frozen_copy(state.model)
    ids = torch.randint(0, CONFIG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0)).cuda()

    def forward_step(batch, model):
        output = model(batch["input_ids"], None, None, labels=batch["input_ids"])
        return output, lambda per_token: (per_token.sum(), torch.tensor(per_token.numel(), device="cuda"), {})

    with torch.no_grad():
        want_logits = reference(ids, None, None).float().cpu()
    train_step(state, [{"input_ids": ids}], forward_step)
    result = {"device": str(next(state.model.parameters()).device)}
    if offload:
        torch.cuda.synchronize()
        result["frozen_freed"] = offload_frozen([reference])
        result["frozen_on_cpu"] = all(p.device.type == "cpu" for p in reference.parameters())
        before = torch.cuda.memory_allocated()
        with optimizer_off_gpu(state, enabled=True) as moved:
            result["optimizer_moved"] = moved
            result["optimizer_memory_drop"] = before - torch.cuda.memory_allocated()
            result["model_on_gpu"] = all(p.is_cuda for p in state.model.parameters())
        result["restored"] = torch.cuda.memory_allocated() - (before - result["optimizer_memory_drop"])
        with gpu_resident(reference, enabled=True) as resident, torch.no_grad():
            result["resident"] = resident
            result["logits"] = reference(ids, None, None).float().cpu()
        result["frozen_back_on_cpu"] = all(p.device.type == "cpu" for p in reference.parameters())
        result["want_logits"] = want_logits
    for _ in range(2):
        train_step(state, [{"input_ids": ids}], forward_step)
    result["weights"] = {name: p.detach().cpu().clone() for name, p in state.model.named_parameters()}
    destroy()
    return result


def test_offloaded_state_and_frozen_models_come_back_bitwise():
    (moved,) = run_distributed(offload_worker, 1, args=(True,), gpus=True)
    (kept,) = run_distributed(offload_worker, 1, args=(False,), gpus=True)
    assert moved["device"].startswith("cuda")
    params = sum(t.numel() for t in moved["weights"].values())
    # the frozen copy: every fp32 parameter (4 bytes each) leaves the GPU
    assert moved["frozen_freed"] == 4 * params and moved["frozen_on_cpu"]
    # Adam's two fp32 moments (8 bytes per parameter; plus fp32 main shards and the gradient buffer when present)
    assert moved["optimizer_moved"] >= 8 * params
    assert moved["optimizer_memory_drop"] >= 8 * params  # the allocator released at least the moments
    assert moved["model_on_gpu"]  # the engine's weights never move
    assert moved["restored"] >= 8 * params
    assert moved["resident"] == 4 * params and moved["frozen_back_on_cpu"]
    torch.testing.assert_close(moved["logits"], moved["want_logits"], rtol=0, atol=0)
    for name, want in kept["weights"].items():
        assert torch.equal(moved["weights"][name], want), name
