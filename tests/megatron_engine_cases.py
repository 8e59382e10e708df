"""The megatron generation engine against the torch engine on one tiny model: one spawned world, every case.

Shared by tests/generation/test_megatron_engine.py (CPU, ``allow_cpu=True``) and
tests/cuda/test_megatron_engine_cuda.py (the GPU): :func:`engine_cases_worker` runs in a
process of its own (``run_distributed``) and returns raw outputs; the tests compare them.

The weights come from a fixed seed with a sharpened head: greedy comparisons between the
two engines' float paths (megatron's attention over its cache vs. the torch engine's
``scaled_dot_product_attention``) must not hinge on a near-tie of two logits.
"""

import dataclasses
import random

import torch

from aligner.generation.base import SamplingParams, StaleWeightsError
from aligner.models.config import ModelConfig

# Odd vocabulary padded to 64: padding columns exist and must never be drawn.
CONFIG = ModelConfig(
    num_layers=2,
    hidden_size=32,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=64,
    vocab_size=61,
    vocab_pad_multiple=16,
    max_position_embeddings=64,
)
PAD = 0
PROMPTS = [[5, 17, 3, 44], [9], [12, 30, 7, 7, 50, 21, 2], [33, 8], [40, 41, 42]]
SAME_LENGTH_PROMPTS = [[5, 17, 3], [9, 1, 60], [12, 30, 7]]
MAX_NEW = 9
CHUNK = 3  # the engine's max_batch_size: PROMPTS run in two chunks
WEIGHTS_SEED, NEW_WEIGHTS_SEED, SAMPLE_SEED = 2024, 7, 11
HEAD_SHARPENING = 6.0  # logits of several units: peaked next-token distributions, no near-ties
GREEDY = SamplingParams(max_new_tokens=MAX_NEW, greedy=True)
SAMPLED = SamplingParams(max_new_tokens=MAX_NEW, temperature=1.3, top_k=20, top_p=0.9, seed=SAMPLE_SEED)


def engine_weights(seed: int) -> dict[str, torch.Tensor]:
    """Full-layout weights of CONFIG (tests/model_weights.py) with the output layer scaled up."""
    from model_weights import random_full_state_dict

    weights = random_full_state_dict(CONFIG, seed)
    weights["output_layer.weight"] *= HEAD_SHARPENING
    return weights


def _error(fn) -> str:
    try:
        fn()
    except (ValueError, KeyError, StaleWeightsError) as err:
        return f"{type(err).__name__}: {err}"
    return "no error"


def engine_cases_worker(allow_cpu: bool) -> dict:
    """Every case, on the GPU when one is visible (else the CPU, with ``allow_cpu``); tensors come back on the CPU."""
    from aligner.generation.megatron_engine import MegatronEngine
    from aligner.generation.refit import bucket_named_tensors
    from aligner.generation.torch_engine import TorchEngine
    from aligner.models.gpt import build_model
    from aligner.models.hf import megatron_to_hf
    from aligner.models.sharding import load_full_state_dict
    from aligner.parallel import destroy, initialize

    on_gpu = torch.cuda.is_available()
    if on_gpu:  # fp32 matmuls in fp32: the engines are compared token for token
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    initialize()
    model = build_model(CONFIG, init_weights=False)
    load_full_state_dict(model, engine_weights(WEIGHTS_SEED))

    def engines(**kwargs):
        torch_engine = TorchEngine(model, pad_token_id=PAD, detokenize=_detokenize, **kwargs)
        megatron_engine = MegatronEngine(
            model, pad_token_id=PAD, detokenize=_detokenize, max_batch_size=CHUNK, allow_cpu=allow_cpu, **kwargs
        )
        return torch_engine, megatron_engine

    def both(sampling, prompts=PROMPTS, **kwargs):
        torch_engine, megatron_engine = engines(**kwargs)
        return {
            "torch": torch_engine.generate(prompts, sampling).cpu(),
            "megatron": megatron_engine.generate(prompts, sampling).cpu(),
        }

    result = {"device": str(next(model.parameters()).device)}
    _, engine = engines(eos_token_id=[], version=3)
    model.train()
    result["greedy"] = both(GREEDY, eos_token_id=[])
    result["training_after"] = model.training
    result["sampled"] = both(SAMPLED, prompts=SAME_LENGTH_PROMPTS, eos_token_id=[])
    # the online loop passes its own (checkpointed) generator instead of a seed
    device = next(model.parameters()).device
    unseeded = dataclasses.replace(SAMPLED, seed=None)
    result["sampled_generator"] = (
        engines(eos_token_id=[])[1]
        .generate(SAME_LENGTH_PROMPTS, unseeded, generator=torch.Generator(device=device).manual_seed(SAMPLE_SEED))
        .cpu()
    )

    # stops: an eos id (also as one of several), a stop token, a stop string, each taken from the greedy rows
    greedy = result["greedy"]["torch"]
    eos = int(greedy.tokens[0, len(PROMPTS[0]) + 3])
    stop_token = int(greedy.tokens[1, len(PROMPTS[1]) + 2])
    first, second = greedy.tokens[2, len(PROMPTS[2]) + 1 : len(PROMPTS[2]) + 3].tolist()
    result["stop_ids"] = {"eos": eos, "stop_token": stop_token}
    result["stops"] = {
        "eos": both(GREEDY, eos_token_id=eos),
        "eos_ids": both(GREEDY, eos_token_id=[PAD + 1, eos]),
        "stop_token": both(
            SamplingParams(max_new_tokens=MAX_NEW, greedy=True, stop_token_ids=[stop_token]), eos_token_id=[]
        ),
        "stop_string": both(
            SamplingParams(max_new_tokens=MAX_NEW, greedy=True, stop_strings=[f"{first}><{second}"]), eos_token_id=[]
        ),
    }

    # versions: stale is an error; refit from the engine's own model records the version
    result["versions"] = {
        "stale": _error(lambda: engine.generate(PROMPTS, GREEDY, expected_version=4)),
        "refit_s": engine.refit(model, 4),
        "version": engine.version,
        "rollouts_version": engine.generate(PROMPTS[:1], GREEDY, expected_version=4).weights_version,
        "older": _error(lambda: engine.refit(model, 2)),
    }
    result["errors"] = {
        "too_long_for_cache": _error(
            lambda: MegatronEngine(
                model, eos_token_id=[], pad_token_id=PAD, max_sequence_length=8, allow_cpu=allow_cpu
            ).generate([[1] * 4], SamplingParams(max_new_tokens=5))
        ),
        "out_of_vocab": _error(lambda: engine.generate([[1, CONFIG.vocab_size]], GREEDY)),
    }

    # refit from Hugging Face-named buckets (shuffled, small) into a separate model, then new weights
    other = build_model(CONFIG)
    other_engine = MegatronEngine(other, eos_token_id=[], pad_token_id=PAD, allow_cpu=allow_cpu)
    hf_items = list(megatron_to_hf(engine_weights(NEW_WEIGHTS_SEED), CONFIG).items())
    random.Random(0).shuffle(hf_items)
    result["refit_missing"] = _error(lambda: other_engine.refit_from_hf_buckets([hf_items[1:]], 1))
    result["after_failed_refit"] = _error(lambda: other_engine.generate(PROMPTS, GREEDY))
    other_engine.refit_from_hf_buckets(bucket_named_tensors(hf_items, 2048), 1)
    new_model = build_model(CONFIG, init_weights=False)
    load_full_state_dict(new_model, engine_weights(NEW_WEIGHTS_SEED))
    result["refit"] = {
        "megatron": other_engine.generate(PROMPTS, GREEDY, expected_version=1).cpu(),
        "torch": TorchEngine(new_model, eos_token_id=[], pad_token_id=PAD).generate(PROMPTS, GREEDY).cpu(),
    }

    # sleep / wake: the KV cache goes and comes back; generation is unchanged afterwards
    memory = torch.cuda.memory_allocated if on_gpu else (lambda: 0)
    engine.generate(PROMPTS, GREEDY)
    sleep = {"allocated_awake": engine.kv_cache_allocated(), "memory_awake": memory()}
    engine.sleep()
    sleep.update(allocated_asleep=engine.kv_cache_allocated(), memory_asleep=memory())
    engine.wake()
    sleep.update(allocated_woken=engine.kv_cache_allocated(), memory_woken=memory())
    sleep["after_wake"] = engine.generate(PROMPTS, GREEDY).cpu()
    engine.sleep()
    sleep["without_wake"] = engine.generate(PROMPTS, GREEDY).cpu()  # the cache comes back at the first forward
    result["sleep"] = sleep
    destroy()
    return result


def _detokenize(ids) -> str:
    return "".join(f"<{i}>" for i in ids)


# ---------------------------------------------------------------- checks (the tests of both files call them)

# Log-probs of the same tokens from the two engines: the logits come from two float32 paths
# (megatron's attention vs scaled_dot_product_attention, different summation orders) that
# differ by rounding, |logits| of tens of units here: 1e-6 relative of that, with headroom.
ENGINE_LOGPROB_ATOL = 1e-4


def _rows(out) -> list[list[int]]:
    return [out.tokens[b, : int(out.lengths[b])].tolist() for b in range(len(out.lengths))]


def check_layout(out, prompts) -> None:
    """Shapes, dtypes, prompt copy, right padding, is_end and the log-prob layout of Rollouts."""
    batch, width = len(prompts), int(out.lengths.max())
    assert out.tokens.shape == (batch, width) and out.logprobs.shape == (batch, width - 1)
    assert out.tokens.dtype == torch.long and out.lengths.dtype == torch.long and out.is_end.dtype == torch.bool
    assert out.logprobs.dtype == torch.float32
    assert out.prompt_lengths.tolist() == [len(p) for p in prompts]
    assert out.is_end.tolist() == [reason != "length" for reason in out.stop_reason]
    for b, prompt in enumerate(prompts):
        length = int(out.lengths[b])
        assert len(prompt) < length <= len(prompt) + MAX_NEW
        assert out.tokens[b, : len(prompt)].tolist() == prompt
        assert (out.tokens[b, length:] == PAD).all()
        assert (out.tokens[b, len(prompt) : length] < CONFIG.vocab_size).all()
    assert (out.logprobs[~out.response_mask] == 0).all()
    assert (out.logprobs[out.response_mask] <= 0).all()
    for name in ("generate_s", "tokens_per_s", "response_tokens", "forwards", "decode_rows"):
        assert name in out.metrics
    assert out.metrics["response_tokens"] == float((out.lengths - out.prompt_lengths).sum())


def check_same_rollouts(pair: dict, prompts=PROMPTS) -> None:
    """The megatron engine's rollouts equal the torch engine's: tokens, lengths, stops; log-probs closely."""
    mine, reference = pair["megatron"], pair["torch"]
    check_layout(mine, prompts)
    assert _rows(mine) == _rows(reference)
    assert mine.stop_reason == reference.stop_reason
    assert torch.equal(mine.is_end, reference.is_end) and torch.equal(mine.lengths, reference.lengths)
    torch.testing.assert_close(mine.logprobs, reference.logprobs, atol=ENGINE_LOGPROB_ATOL, rtol=0)


def check_greedy(result: dict) -> None:
    check_same_rollouts(result["greedy"])
    assert result["greedy"]["megatron"].stop_reason == ["length"] * len(PROMPTS)
    assert result["training_after"], "generate must restore the model's training mode"
    # two chunks of CHUNK rows: one prefill and MAX_NEW - 1 + (longest - shortest prompt) decodes each
    assert result["greedy"]["megatron"].metrics["forwards"] > 2 * MAX_NEW - 2


def check_sampled(result: dict) -> None:
    # Prompts of one length and no stops: both engines draw for the same rows in the same order from
    # one generator seeded alike, so the draws (and their log-probs as drawn) agree.
    check_same_rollouts(result["sampled"], SAME_LENGTH_PROMPTS)
    check_same_rollouts(
        {"torch": result["sampled"]["torch"], "megatron": result["sampled_generator"]}, SAME_LENGTH_PROMPTS
    )


def check_stops(result: dict) -> None:
    """Each stop rule ends the row that draws it, keeps the stopping token, and marks the row finished."""
    cases = {"eos": "eos", "eos_ids": "eos", "stop_token": "stop_token", "stop_string": "stop_string"}
    for case, reason in cases.items():
        pair = result["stops"][case]
        check_same_rollouts(pair)
        out = pair["megatron"]
        assert reason in out.stop_reason, case
        for b, row_reason in enumerate(out.stop_reason):
            last = int(out.tokens[b, int(out.lengths[b]) - 1])
            if row_reason == "eos":
                assert last == result["stop_ids"]["eos"], case
            if row_reason == "stop_token":
                assert last == result["stop_ids"]["stop_token"], case


def check_versions(result: dict) -> None:
    versions = result["versions"]
    assert versions["stale"].startswith("StaleWeightsError") and "version 3" in versions["stale"]
    assert versions["refit_s"] == 0.0 and versions["version"] == 4 and versions["rollouts_version"] == 4
    assert versions["older"].startswith("ValueError") and "older" in versions["older"]
    assert "max_sequence_length 8" in result["errors"]["too_long_for_cache"]
    assert "outside [0, 61)" in result["errors"]["out_of_vocab"]


def check_refit(result: dict) -> None:
    assert result["refit_missing"].startswith("KeyError")
    assert result["after_failed_refit"].startswith("StaleWeightsError")
    check_same_rollouts(result["refit"])
    assert result["refit"]["megatron"].weights_version == 1


def check_sleep_and_wake(result: dict, reference) -> None:
    """sleep() frees megatron's KV cache, wake() allocates it again; generation is unchanged either way."""
    sleep = result["sleep"]
    assert sleep["allocated_awake"] and not sleep["allocated_asleep"] and sleep["allocated_woken"]
    for name in ("after_wake", "without_wake"):
        assert _rows(sleep[name]) == _rows(reference)
