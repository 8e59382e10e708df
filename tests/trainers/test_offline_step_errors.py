"""A non-finite loss stops the run with a message naming the step, before any update; bad step shapes are refused."""

import pytest
import torch
from distributed import run_distributed
from lm_task import OfflineLoop, TokenSteps, lm_forward_step, make_model

GLOBAL_BATCH, MICRO_BATCH = 4, 2


def worker(seed: int):
    from aligner.config import OptimConfig, TrainerConfig
    from aligner.models.sharding import gather_full_state_dict
    from aligner.parallel import initialize

    initialize()

    def trainer(data, max_steps, micro_batch_size=MICRO_BATCH):
        return OfflineLoop(
            make_model(seed),
            lm_forward_step,
            data,
            trainer=TrainerConfig(
                global_batch_size=GLOBAL_BATCH, micro_batch_size=micro_batch_size, max_steps=max_steps
            ),
            optim=OptimConfig(lr=1e-2),
        )

    result = {}
    # Step 2's batch makes the loss infinite.
    poisoned = trainer(TokenSteps(4, GLOBAL_BATCH, MICRO_BATCH, seed=seed, bad_step=1), max_steps=4)
    try:
        poisoned.fit()
    except FloatingPointError as error:
        result["non_finite"] = str(error)
    result["steps_done"] = poisoned.step
    result["weights_after_failure"] = gather_full_state_dict(poisoned.model)
    clean = trainer(TokenSteps(4, GLOBAL_BATCH, MICRO_BATCH, seed=seed), max_steps=1)
    clean.fit()
    result["weights_after_step_1"] = gather_full_state_dict(clean.model)

    # The sampler cuts micro-batches of 2 but the trainer is told 4: 2 micro-batches instead of 1.
    mismatched = trainer(TokenSteps(4, GLOBAL_BATCH, MICRO_BATCH, seed=seed), max_steps=1, micro_batch_size=4)
    try:
        mismatched.fit()
    except ValueError as error:
        result["mismatch"] = str(error)
    return result


@pytest.fixture(scope="module")
def outcome():
    return run_distributed(worker, 1, args=(1234,))[0]


@pytest.mark.slow
def test_non_finite_loss_names_step_and_value_and_skips_the_update(outcome):
    message = outcome["non_finite"]
    assert message.startswith("step 2: the loss is inf")
    assert outcome["steps_done"] == 1
    for name, want in outcome["weights_after_step_1"].items():
        assert torch.equal(outcome["weights_after_failure"][name], want), name


@pytest.mark.slow
def test_wrong_number_of_micro_batches_is_refused(outcome):
    assert "got 2 micro-batches, expected" in outcome["mismatch"]
