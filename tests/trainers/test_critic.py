"""A critic's pieces for PPO: its values in the rollout rows' layout and its update (value_forward_step)."""

import torch
from distributed import run_distributed

from aligner.models.config import ModelConfig

CONFIG = ModelConfig(
    num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64, vocab_size=50
)
ROWS, WIDTH, STEPS = 4, 10, 25
# float32, the same forward in eval mode alone and split over micro-batches: summation order only.
FP32_TOL = 1e-5


def critic_worker(seed: int):
    from aligner.config import OptimConfig
    from aligner.models.gpt import build_model
    from aligner.parallel import destroy, initialize
    from aligner.trainers.online import value_forward_step
    from aligner.trainers.rollouts import split_rows, token_values
    from aligner.trainers.state import build_train_state
    from aligner.trainers.step import train_step

    initialize(seed=seed)
    critic = build_train_state(build_model(CONFIG, num_value_outputs=1), OptimConfig(lr=1e-2), total_steps=STEPS)
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, CONFIG.vocab_size, (ROWS, WIDTH), generator=gen)
    loss_mask = torch.zeros(ROWS, WIDTH)
    for row, (start, end) in enumerate([(3, 9), (2, 5), (4, 10), (1, 2)]):
        loss_mask[row, start:end] = 1.0
    batch = {"input_ids": input_ids, "loss_mask": loss_mask, "lengths": torch.full((ROWS,), WIDTH)}
    micro_batches = split_rows(batch, 2)
    values = token_values(critic.ddp_model, micro_batches)
    critic.model.eval()
    with torch.no_grad():
        direct = critic.model(input_ids, None, None)[..., 0].float()
    critic.model.train()
    returns = torch.randn(ROWS, WIDTH, generator=gen)
    batch.update(old_values=values, returns=returns)
    losses = [train_step(critic, split_rows(batch, 2), value_forward_step(clip=None))["loss"] for _ in range(STEPS)]
    destroy()
    return {"values": values, "direct": direct, "returns": returns, "mask": loss_mask, "losses": losses}


def test_values_in_row_layout_and_the_critic_learns_its_returns():
    seed = int(torch.randint(0, 2**31, ()))
    (result,) = run_distributed(critic_worker, 1, args=(seed,))
    torch.testing.assert_close(result["values"], result["direct"], atol=FP32_TOL, rtol=FP32_TOL)
    # the first step's loss: token mean of 0.5 (V - R)^2 over the mask, at the values just read
    mask = result["mask"]
    want = (0.5 * (result["values"] - result["returns"]) ** 2 * mask).sum() / mask.sum()
    assert abs(result["losses"][0] - want.item()) < FP32_TOL * max(1.0, want.item())
    assert result["losses"][-1] < 0.5 * result["losses"][0], result["losses"]
