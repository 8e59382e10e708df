"""The online loop's data pieces: rollouts as training rows, row splits, rollout joins, update metrics, configs."""

import pytest
import torch

from aligner.config import ConfigError, load_config
from aligner.generation.base import Rollouts
from aligner.trainers.rollouts import combine_update_metrics, fit_width, split_rows, training_rows

PAD = 0


def _rollouts() -> Rollouts:
    # row 0: prompt [5, 6], response [7, 8, 2] (ended on eos 2); row 1: prompt [9], response [3, 4] (cut)
    tokens = torch.tensor([[5, 6, 7, 8, 2], [9, 3, 4, PAD, PAD]])
    logprobs = torch.tensor([[0.0, -0.1, -0.2, -0.3], [-0.4, -0.5, 0.0, 0.0]])
    return Rollouts(
        tokens=tokens,
        prompt_lengths=torch.tensor([2, 1]),
        lengths=torch.tensor([5, 3]),
        is_end=torch.tensor([True, False]),
        stop_reason=["eos", "length"],
        logprobs=logprobs,
        weights_version=3,
        metrics={"generate_s": 1.0, "tokens_per_s": 5.0},
    )


def test_training_rows_label_exactly_the_response_tokens_with_the_engine_logprobs_in_place():
    batch = training_rows(_rollouts(), pad_token_id=PAD, pad_to_multiple_of=4)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 2, 0, 0, 0], [9, 3, 4, 0, 0, 0, 0, 0]]
    # labels[t] = token t + 1 where it is a response token
    assert batch["labels"].tolist() == [
        [-100, 7, 8, 2, -100, -100, -100, -100],
        [3, 4, -100, -100, -100, -100, -100, -100],
    ]
    assert batch["loss_mask"].tolist() == [[0, 1, 1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0]]
    expected = [[0.0, -0.1, -0.2, -0.3, 0, 0, 0, 0], [-0.4, -0.5, 0, 0, 0, 0, 0, 0]]
    torch.testing.assert_close(batch["generation_logprobs"], torch.tensor(expected))
    assert batch["is_end"].tolist() == [True, False]


def test_split_rows_trims_each_part_to_its_longest_row():
    batch = training_rows(_rollouts(), pad_token_id=PAD)
    batch["advantages"] = torch.tensor([1.0, -1.0])
    first, second = split_rows(batch, 1, pad_to_multiple_of=2)
    assert first["input_ids"].shape == (1, 5) and second["input_ids"].shape == (1, 4)  # never wider than the batch
    assert second["labels"].tolist() == [[3, 4, -100, -100]]
    assert first["advantages"].tolist() == [1.0] and second["advantages"].tolist() == [-1.0]
    with pytest.raises(ValueError, match="do not split"):
        split_rows(batch, 3)
    assert fit_width(second["loss_mask"], 5).shape == (1, 5) and fit_width(first["loss_mask"], 3).shape == (1, 3)


def test_rollouts_select_and_cat_keep_rows_and_their_layout():
    rollouts = _rollouts()
    picked = rollouts.select(torch.tensor([False, True]))
    assert picked.tokens.tolist() == [[9, 3, 4]] and picked.logprobs.shape == (1, 2)
    joined = Rollouts.cat([picked, rollouts.select([0])], pad_token_id=PAD)
    assert joined.tokens.tolist() == [[9, 3, 4, 0, 0], [5, 6, 7, 8, 2]]
    assert joined.stop_reason == ["length", "eos"] and joined.lengths.tolist() == [3, 5]
    assert torch.equal(joined.response_mask, torch.stack([rollouts.response_mask[1], rollouts.response_mask[0]]))
    other = Rollouts(**{**vars(picked), "weights_version": 4})
    with pytest.raises(ValueError, match="weights versions"):
        Rollouts.cat([picked, other], pad_token_id=PAD)


def test_update_metrics_take_extremes_sums_and_the_last_learning_rate():
    steps = [
        {"loss": 1.0, "ratio_min": 0.9, "ratio_max": 1.1, "lr": 0.1, "tokens": 10.0, "step_time_s": 1.0},
        {"loss": 3.0, "ratio_min": 0.8, "ratio_max": 1.05, "lr": 0.2, "tokens": 30.0, "step_time_s": 1.0},
    ]
    combined = combine_update_metrics(steps)
    assert combined == {
        "updates": 2.0,
        "loss": 2.0,
        "ratio_min": 0.8,
        "ratio_max": 1.1,
        "lr": 0.2,
        "tokens": 40.0,
        "step_time_s": 2.0,
        "tokens_per_s": 20.0,
    }


# --- configs ----------------------------------------------------------------------------------------

GRPO_BASE = ["model.config.vocab_size=8", "data.train=x", "reward.terms=[{function: 'a.b:c'}]"]


def _grpo(*overrides):
    from aligner.recipes.grpo import GRPORunConfig

    return load_config(GRPORunConfig, None, [*GRPO_BASE, "trainer.global_batch_size=32", *overrides])


def test_grpo_variants_give_their_defaults_and_explicit_keys_win():
    dapo = _grpo("grpo.variant=dapo", "generation.max_new_tokens=8192", "data.max_length=9000").grpo.loss_config()
    assert (dapo.policy.eps_low, dapo.policy.eps_high, dapo.policy.dual_clip) == (0.2, 0.28, 10.0)
    assert dapo.dynamic_sampling and dapo.overlong_buffer_len == 4096 and dapo.policy.kl_coef == 0.0
    tuned = _grpo(
        "grpo.variant=dapo", "grpo.overlong_buffer_len=4", "grpo.eps_high=0.3", "grpo.dual_clip=0", "grpo.kl_coef=0.1"
    ).grpo.loss_config()
    assert (tuned.overlong_buffer_len, tuned.policy.eps_high, tuned.policy.dual_clip) == (4, 0.3, None)
    assert tuned.policy.kl_coef == 0.1 and tuned.dynamic_sampling
    dr = _grpo("grpo.variant=dr_grpo").grpo.loss_config()
    assert dr.scale is None and dr.policy.aggregation == "seq-mean-token-sum-norm"
    assert _grpo("grpo.variant=dr_grpo", "grpo.normalize_std=true").grpo.loss_config().scale == "std"
    gspo = _grpo("grpo.variant=gspo").grpo.loss_config()
    assert gspo.policy.ratio_level == "sequence" and gspo.policy.eps_high == 4e-4
    grpo = _grpo().grpo.loss_config()
    assert grpo.scale == "std" and grpo.policy.kl_coef == 0.01 and grpo.policy.kl_estimator == "k3"


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["grpo.variant=ppo"], "grpo.variant"),
        (["grpo.variant=dapo"], "overlong_buffer_len"),  # 4096 tokens of shaping in a 256-token response
        (["trainer.global_batch_size=24"], "must divide the 32 rollouts"),
        (["data.max_length=256"], "data.max_length"),
        (["grpo.eps_low=1.5"], "eps_low"),
        (["grpo.aggregation=mean"], "aggregation"),
        (["reward.terms=[]"], "reward.terms is empty"),
        (["generation.temperature=0"], "temperature"),
        (["generation.backend=vllm"], "generation.backend"),
    ],
)
def test_grpo_config_errors_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        _grpo(*overrides)


def test_reinforce_variants_and_errors():
    from aligner.recipes.reinforce import ReinforceRunConfig

    def config(*overrides):
        return load_config(ReinforceRunConfig, None, [*GRPO_BASE, "trainer.global_batch_size=32", *overrides])

    reinforce = config().reinforce
    assert reinforce.setting("kl_coef") == 0.01 and reinforce.setting("mask_unfinished")
    rloo = config("reinforce.variant=rloo").reinforce
    assert rloo.setting("kl_coef") == 0.0 and not rloo.setting("baseline_valid_only")
    assert config("reinforce.variant=rloo", "reinforce.kl_coef=0.05").reinforce.setting("kl_coef") == 0.05
    for overrides, match in [
        (["reinforce.samples_per_prompt=1"], "samples_per_prompt"),
        (["reinforce.kl_estimator=k3"], "kl_estimator"),
        (["reinforce.kl_reduction=max"], "kl_reduction"),
        (["reinforce.kl_coef=-1"], "kl_coef"),
    ]:
        with pytest.raises(ConfigError, match=match):
            config(*overrides)
