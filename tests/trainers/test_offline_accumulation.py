"""A global batch of 8 as 4 accumulated micro-batches of 2 makes the same step as one micro-batch of 8.

Rows have random lengths and prompt lengths, so the micro-batches hold different
numbers of trained tokens. The first step's loss and gradient are also checked
against plain autograd of the global token mean on an unwrapped copy of the
model, and that reference is shown to differ from the gradient of a mean of
per-micro-batch means (the bug this guards against).
"""

import pytest
import torch
from distributed import run_distributed
from lm_task import OfflineLoop, TokenSteps, lm_forward_step, make_model

GLOBAL_BATCH, MICRO_BATCH, STEPS = 8, 2, 2
# fp32: splitting the batch only re-associates the sums of losses and gradients
# (a few ulps); the weights move by lr * (that difference) / (sqrt(v) + eps).
LOSS_RTOL = 1e-6
GRAD_ATOL, GRAD_RTOL = 1e-7, 1e-5
WEIGHT_ATOL = 1e-6
# Adam's first steps are nearly lr * sign(grad): an eps well above the rounding
# noise of near-zero gradient entries keeps the update continuous in the gradient,
# so a tiny re-association difference cannot flip an entry's whole step.
ADAM_EPS = 1e-3


def _final_grads(trainer) -> dict[str, torch.Tensor]:
    """The last step's gradient (megatron's main_grad, already divided by the global token count)."""
    from aligner.models.sharding import gather_full_state_dict

    weights = {name: p.data for name, p in trainer.model.named_parameters()}
    for param in trainer.model.parameters():
        param.data = param.main_grad
    grads = gather_full_state_dict(trainer.model)
    for name, param in trainer.model.named_parameters():
        param.data = weights[name]
    return grads


def _autograd_reference(seed: int, rows: dict[str, torch.Tensor]) -> dict:
    """Loss and gradients of the global token mean and of a mean of micro-batch means, by plain autograd."""
    model = make_model(seed)
    logits = model(rows["input_ids"], None, None).float()
    mask = rows["labels"] != -100
    nll = -torch.log_softmax(logits, -1).gather(-1, rows["labels"].clamp(min=0)[..., None])[..., 0] * mask
    token_mean = nll.sum() / mask.sum()
    micro_means = [nll[i : i + MICRO_BATCH].sum() / mask[i : i + MICRO_BATCH].sum() for i in range(0, len(nll), 2)]
    mean_of_means = torch.stack(micro_means).mean()
    names, params = zip(*model.named_parameters(), strict=True)
    grads = torch.autograd.grad(token_mean, params, retain_graph=True)
    mean_of_means_grads = torch.autograd.grad(mean_of_means, params)
    return {
        "loss": token_mean.item(),
        "grads": dict(zip(names, grads, strict=True)),
        "mean_of_means_grads": dict(zip(names, mean_of_means_grads, strict=True)),
    }


def worker(seed: int):
    from aligner.config import OptimConfig, TrainerConfig
    from aligner.models.sharding import gather_full_state_dict
    from aligner.parallel import initialize

    initialize()
    data_seed = seed + 1

    def run(micro_batch_size: int, steps: int, clip_grad: float):
        trainer = OfflineLoop(
            make_model(seed),
            lm_forward_step,
            TokenSteps(STEPS, GLOBAL_BATCH, micro_batch_size, seed=data_seed),
            trainer=TrainerConfig(global_batch_size=GLOBAL_BATCH, micro_batch_size=micro_batch_size, max_steps=steps),
            optim=OptimConfig(lr=1e-2, weight_decay=0.1, adam_eps=ADAM_EPS, clip_grad=clip_grad),
        )
        summary = trainer.fit()
        return {
            "history": summary.history,
            "grads": _final_grads(trainer),
            "weights": gather_full_state_dict(trainer.model),
        }

    rows = TokenSteps(STEPS, GLOBAL_BATCH, GLOBAL_BATCH, seed=data_seed).global_batch(0)
    return {
        "reference": _autograd_reference(seed, rows),
        "first_step": run(MICRO_BATCH, steps=1, clip_grad=0.0),  # unclipped gradient of step 1
        "accumulated": run(MICRO_BATCH, steps=STEPS, clip_grad=0.5),
        "single": run(GLOBAL_BATCH, steps=STEPS, clip_grad=0.5),
    }


@pytest.mark.slow
def test_accumulated_micro_batches_equal_one_big_batch(fresh_seed):
    (result,) = run_distributed(worker, 1, args=(fresh_seed,))
    reference, first_step = result["reference"], result["first_step"]
    accumulated, single = result["accumulated"], result["single"]

    # Step 1 through the trainer (4 accumulated micro-batches) = autograd of the global token mean.
    assert first_step["history"][0]["loss"] == pytest.approx(reference["loss"], rel=LOSS_RTOL)
    for name, want in reference["grads"].items():
        torch.testing.assert_close(first_step["grads"][name], want, atol=GRAD_ATOL, rtol=GRAD_RTOL, msg=name)
    # ... and a mean of micro-batch means would be far outside that tolerance on this data.
    difference = torch.cat([(reference["mean_of_means_grads"][n] - g).flatten() for n, g in reference["grads"].items()])
    reference_norm = torch.cat([g.flatten() for g in reference["grads"].values()]).norm()
    assert difference.norm() > 100 * GRAD_RTOL * reference_norm

    for got, want in zip(accumulated["history"], single["history"], strict=True):
        assert got["count"] == want["count"]
        assert got["loss"] == pytest.approx(want["loss"], rel=LOSS_RTOL)
        assert got["accuracy"] == pytest.approx(want["accuracy"], rel=LOSS_RTOL)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=GRAD_RTOL)
    # Clipping at 0.5 is active, so the clipped update is compared too.
    assert all(step["grad_norm"] > 0.5 for step in single["history"])
    for name, want in single["grads"].items():
        torch.testing.assert_close(accumulated["grads"][name], want, atol=GRAD_ATOL, rtol=GRAD_RTOL, msg=name)
    for name, want in single["weights"].items():
        torch.testing.assert_close(accumulated["weights"][name], want, atol=WEIGHT_ATOL, rtol=0, msg=name)
