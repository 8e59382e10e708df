"""Generation for a pipeline-parallel trainer: the engine's full-depth copy, the stages' buckets, and the rollouts.

A trainer at pipeline size 2 (two processes, tp=1) holds half the layers on each
rank. Each rank builds a full-depth engine model
(:func:`aligner.generation.refit.build_engine_model`), refits it from the trainer's
stages (:func:`aligner.generation.refit.hf_weight_buckets` over the pipeline group)
and generates; the reference is one process at pipeline size 1 generating with a
model of the same weights. The trainer's weights then change (a new state loaded
into every stage in place, as an optimizer step would), and after a refit the
engine must follow.

The weights are fresh each run (``module_seed``): both sides run the same
full-depth model through the same engine on identical weights, so no near-tie
between logits can flip a comparison.
"""

import re
from dataclasses import replace
from functools import partial

import pytest
import torch
from distributed import run_distributed
from model_weights import random_full_state_dict

from aligner.generation.base import SamplingParams
from aligner.models.config import ModelConfig

# Four layers: two per stage, so the stages' local layer numbers (0, 1) differ from the global ones.
CONFIG = ModelConfig(
    num_layers=4,
    hidden_size=32,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=64,
    vocab_size=61,
    vocab_pad_multiple=16,
    max_position_embeddings=64,
)
# Tied: the last stage's output layer is a copy of the first stage's embedding; only the embedding travels.
VARIANTS = {"untied": CONFIG, "tied": replace(CONFIG, tie_word_embeddings=True)}
PAD = 0
PROMPTS = [[5, 17, 3, 44], [9], [12, 30, 7, 7, 50, 21, 2], [33, 8]]
MAX_NEW = 8
SAMPLE_SEED = 11
GREEDY = SamplingParams(max_new_tokens=MAX_NEW, greedy=True)
SAMPLED = SamplingParams(max_new_tokens=MAX_NEW, temperature=1.5, top_p=0.95, seed=SAMPLE_SEED)
BUCKET_BYTES = 4096  # small: the stages' weights travel in many buckets
# The pp=2 engine and the pp=1 reference run the same float32 ops on bit-identical weights (a refit only
# regroups tensors); this leaves room for nothing but a kernel's run-to-run rounding.
SAME_PATH_ATOL = 1e-6


def _error(fn) -> str:
    try:
        fn()
    except (ValueError, NotImplementedError) as err:
        return f"{type(err).__name__}: {err}"
    return "no error"


def _generations(engine, rank: int = 0) -> dict:
    """Greedy, seeded sampling, and sampling from a generator seeded differently on each rank."""
    generator = torch.Generator().manual_seed(SAMPLE_SEED + rank)
    return {
        "greedy": engine.generate(PROMPTS, GREEDY),
        "sampled": engine.generate(PROMPTS, SAMPLED),
        "own_generator": engine.generate(PROMPTS, replace(SAMPLED, seed=None), generator=generator),
    }


def reference_worker(states: dict) -> dict:
    """Pipeline size 1, one process: the engine over the model itself, before and after the weight change."""
    from aligner.generation.refit import build_engine_model
    from aligner.generation.torch_engine import TorchEngine
    from aligner.models.gpt import build_model
    from aligner.models.sharding import load_full_state_dict
    from aligner.parallel import destroy, initialize

    initialize()
    result = {}
    for name, config in VARIANTS.items():
        model = build_model(config, init_weights=False)
        load_full_state_dict(model, states["before"])
        engine_model = build_engine_model(model)
        engine = TorchEngine(engine_model, eos_token_id=[], pad_token_id=PAD)
        record = {"same_object": engine_model is model, "before": _generations(engine)}
        load_full_state_dict(model, states["after"])
        record["after"] = _generations(engine)
        result[name] = record
    value_model = build_model(CONFIG, num_value_outputs=1)
    result["value_model"] = _error(partial(build_engine_model, value_model))
    destroy()
    return result


def pipeline_worker(states: dict) -> dict:
    """Pipeline size 2: the trainer's stage, its engine copy, the buckets, the rollouts before and after a change."""
    from megatron.core import parallel_state

    from aligner.generation.refit import build_engine_model, hf_weight_buckets
    from aligner.generation.torch_engine import TorchEngine
    from aligner.models.gpt import build_model
    from aligner.models.sharding import gather_full_state_dict, load_full_state_dict
    from aligner.parallel import destroy, initialize

    initialize(pp=2)
    rank = parallel_state.get_pipeline_model_parallel_rank()
    result = {}
    for name, config in VARIANTS.items():
        trainer = build_model(config, init_weights=False)
        load_full_state_dict(trainer, states["before"])
        trainer_params = {id(param) for param in trainer.parameters()}
        record = {"stage_refused": _error(partial(TorchEngine, trainer, eos_token_id=[], pad_token_id=PAD))}

        engine_model = build_engine_model(trainer)
        record["copy"] = {
            "is_trainer": engine_model is trainer,
            "layers": [layer.layer_number for layer in engine_model.decoder.layers],
            "ends": (engine_model.pre_process, engine_model.post_process),
            "requires_grad": any(param.requires_grad for param in engine_model.parameters()),
            "shares_trainer_params": any(id(param) in trainer_params for param in engine_model.parameters()),
            "pipeline_after": (
                parallel_state.get_pipeline_model_parallel_world_size(),
                parallel_state.get_pipeline_model_parallel_rank(),
            ),
            "trainer_layers": len(trainer.decoder.layers),
        }
        record["buckets"] = [list(bucket) for bucket in hf_weight_buckets(trainer, bucket_bytes=BUCKET_BYTES)]

        engine = TorchEngine(engine_model, eos_token_id=[], pad_token_id=PAD)
        engine.refit(trainer, version=1)
        record["refit_state"] = gather_full_state_dict(engine_model)
        record["before"] = _generations(engine, rank)

        load_full_state_dict(trainer, states["after"])  # the trainer's weights change in place
        engine.refit(trainer, version=2)
        record["after"] = _generations(engine, rank)
        record["after_version"] = record["after"]["greedy"].weights_version
        result[name] = record
    destroy()
    return result


# ---------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def states(module_seed):
    """Weights before and after the change (every tensor moved), in the full (pp=1, tp=1) layout."""
    before = random_full_state_dict(CONFIG, seed=module_seed)
    change = random_full_state_dict(CONFIG, seed=module_seed + 1)
    return {"before": before, "after": {name: before[name] + change[name] for name in before}}


@pytest.fixture(scope="module")
def reference(states):
    return run_distributed(reference_worker, 1, args=(states,))[0]


@pytest.fixture(scope="module")
def stages(states):
    return run_distributed(pipeline_worker, 2, args=(states,))


def _rows(out) -> list[list[int]]:
    return [out.tokens[b, : int(out.lengths[b])].tolist() for b in range(len(out.lengths))]


def _assert_same_rollouts(got, expected, what: str):
    assert _rows(got) == _rows(expected), what
    assert got.stop_reason == expected.stop_reason, what
    torch.testing.assert_close(got.logprobs, expected.logprobs, atol=SAME_PATH_ATOL, rtol=0, msg=what)


def _expected_state(config: ModelConfig, state: dict) -> dict:
    """What a model of ``config`` holds of a full state (a tied model has no output layer of its own)."""
    return {k: v for k, v in state.items() if not (config.tie_word_embeddings and k == "output_layer.weight")}


@pytest.mark.slow
def test_without_pipeline_parallelism_the_engine_model_is_the_trainers(reference):
    assert all(reference[name]["same_object"] for name in VARIANTS)
    assert re.match("ValueError: build_engine_model needs a language model", reference["value_model"])


@pytest.mark.slow
def test_engine_model_is_a_full_depth_copy_without_gradients(stages):
    for rank, result in enumerate(stages):
        for name in VARIANTS:
            copy = result[name]["copy"]
            assert copy["trainer_layers"] == CONFIG.num_layers // 2, "the trainer holds one stage"
            assert not copy["is_trainer"] and not copy["shares_trainer_params"]
            assert copy["layers"] == list(range(1, CONFIG.num_layers + 1)), "every layer, numbered globally"
            assert copy["ends"] == (True, True)
            assert not copy["requires_grad"]
            assert copy["pipeline_after"] == (2, rank), "megatron's pipeline state is restored"


@pytest.mark.slow
def test_a_pipeline_stage_is_refused_by_the_engine(stages):
    for result in stages:
        for name in VARIANTS:
            assert re.match(
                "NotImplementedError: .*needs every layer.*one pipeline stage.*build_engine_model",
                result[name]["stage_refused"],
            )


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_hf_weight_buckets_from_pipeline_stages(stages, states, name):
    from aligner.models.hf import megatron_to_hf

    config = VARIANTS[name]
    expected = megatron_to_hf(_expected_state(config, states["before"]), config)
    per_rank = [result[name]["buckets"] for result in stages]
    assert [[n for n, _ in bucket] for bucket in per_rank[0]] == [[n for n, _ in bucket] for bucket in per_rank[1]]
    for buckets in per_rank:
        got = [(n, tensor) for bucket in buckets for n, tensor in bucket]
        assert sorted(n for n, _ in got) == sorted(expected), "every weight, once, with global layer numbers"
        assert all(torch.equal(tensor, expected[n]) and tensor.device.type == "cpu" for n, tensor in got)
        for bucket in buckets:
            assert len(bucket) == 1 or sum(t.numel() * t.element_size() for _, t in bucket) <= BUCKET_BYTES
    assert len(per_rank[0]) > 2 * CONFIG.num_layers


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_refit_from_pipeline_stages_loads_every_weight(stages, states, name):
    expected = _expected_state(VARIANTS[name], states["before"])
    for result in stages:
        state = result[name]["refit_state"]
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[k], expected[k]) for k in expected), "a refit copies the weights exactly"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_pipeline_parallel_trainer_generates_as_one_process(stages, reference, name):
    expected = reference[name]["before"]
    for rank, result in enumerate(stages):
        got = result[name]["before"]
        _assert_same_rollouts(got["greedy"], expected["greedy"], f"greedy, rank {rank}")
        _assert_same_rollouts(got["sampled"], expected["sampled"], f"sampled, rank {rank}")
        # Each rank drew from its own seed; the first stage's rollouts win on every stage.
        _assert_same_rollouts(got["own_generator"], expected["own_generator"], f"own generator, rank {rank}")
    assert _rows(expected["sampled"]) != _rows(expected["greedy"]), "temperature 1.5 should leave the greedy path"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_generation_follows_the_trainer_after_a_weight_change_and_refit(stages, reference, name):
    expected = reference[name]["after"]
    assert _rows(expected["greedy"]) != _rows(reference[name]["before"]["greedy"]), "the change must show"
    for rank, result in enumerate(stages):
        got = result[name]["after"]
        assert result[name]["after_version"] == 2
        _assert_same_rollouts(got["greedy"], expected["greedy"], f"greedy, rank {rank}")
        _assert_same_rollouts(got["sampled"], expected["sampled"], f"sampled, rank {rank}")
