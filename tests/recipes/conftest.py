"""The demo data and tokenizer (prepare_demo) for the recipe runs, and the starts the online recipes share.

``demo``: written once per test module. ``rl_demo``: written once per session, with
``sft_start`` (the demo's SFT model, exported to Hugging Face format) and ``demo_rm``
(the demo's pairwise reward model) trained in it once and shared by the online
recipes' modules (GRPO, REINFORCE, PPO, SPIN, rejection sampling).
"""

from pathlib import Path

import pytest
from distributed import run_distributed
from online_starts import stage_overrides, stage_worker

# The start of every online run: the demo's SFT model, trained long enough that it answers
# about a third of the held-out problems (greedy) and ends its responses.
SFT_STEPS = 225


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    from aligner.recipes.prepare_demo import prepare_demo

    out = tmp_path_factory.mktemp("demo")
    prepare_demo(out)
    return out


@pytest.fixture(scope="session")
def rl_demo(tmp_path_factory) -> Path:
    """The demo data and tokenizer the online recipes' starts are trained on (one per session)."""
    from aligner.recipes.prepare_demo import prepare_demo

    out = tmp_path_factory.mktemp("rl_demo")
    prepare_demo(out)
    return out


@pytest.fixture(scope="session")
def sft_start(rl_demo) -> Path:
    """The SFT model the online runs start from, exported to Hugging Face format (``<rl_demo>/runs/sft/hf``)."""
    overrides = [
        *stage_overrides(rl_demo, "sft", "sft"),
        f"trainer.max_steps={SFT_STEPS}",
        "trainer.max_epochs=100",
        "trainer.val_every=0",
    ]
    run_distributed(stage_worker, 1, args=("sft", "sft_tiny.yaml", overrides))
    return rl_demo / "runs" / "sft" / "hf"


@pytest.fixture(scope="session")
def demo_rm(rl_demo) -> Path:
    """The demo's pairwise reward model (configs/rm_tiny.yaml, ~0.9 held-out accuracy): its checkpoint root."""
    run_distributed(stage_worker, 1, args=("rm", "rm_tiny.yaml", stage_overrides(rl_demo, "preference", "rm")))
    return rl_demo / "runs" / "rm"
