"""The torch generation engine against plain forwards of the model, the float64 sampler reference, and itself.

Generation needs megatron, initialized once per process, so each parallel
layout runs in its own spawned world (``run_distributed``) that does every
case for that layout and returns the raw outputs; the tests compare them here.

The model's weights come from a fixed seed: these cases compare discrete
choices (argmax, draws) made from logits computed along different float paths
(KV cache vs. full forward, one row vs. a batch, TP=2 vs. TP=1), and an
accidental near-tie between two logits would make such a comparison flaky.
"""

import random
import re

import pytest
import torch
from distributed import run_distributed
from megatron.core import parallel_state
from sampling_reference import reference_logprobs

from aligner.generation.base import SamplingParams, StaleWeightsError
from aligner.generation.torch_engine import TorchEngine, generate
from aligner.models.config import ModelConfig

# Odd vocabulary padded to 64 at TP=1 and TP=2, so padding columns exist on both.
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
PROMPTS = [[5, 17, 3, 44], [9], [12, 30, 7, 7, 50, 21, 2], [33, 8]]
MAX_NEW = 9
SMALL_VOCAB = 40  # generate(vocab_size=...) below the model's: tokens at or above it must never be drawn
SAMPLE_SEED = 7
WEIGHTS_SEED = 2024  # fixed: see the module docstring
GREEDY = SamplingParams(max_new_tokens=MAX_NEW, greedy=True)
# Log-probs as drawn: the engine's float32 log_softmax of the very logits it drew from vs float64.
AS_DRAWN_ATOL = 1e-5
# Engine vs a trainer's recompute (full forward, no cache) and TP=2 vs TP=1: the logits themselves
# differ by float32 rounding along the two paths (|logits| of a few units here).
RECOMPUTE_ATOL = 1e-4
LOGPROB_CASES = {
    "greedy": GREEDY,
    "t1.5_top_p": SamplingParams(max_new_tokens=MAX_NEW, temperature=1.5, top_p=0.95, seed=SAMPLE_SEED),
    "t0.7_top_k": SamplingParams(max_new_tokens=MAX_NEW, temperature=0.7, top_k=5, seed=SAMPLE_SEED),
}


def full_state_dict(config: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """Random weights in the full (TP=1) layout, large enough for peaked next-token distributions."""
    gen = torch.Generator().manual_seed(seed)
    h, d = config.hidden_size, config.head_dim
    qkv_rows = (config.num_attention_heads + 2 * config.num_query_groups) * d

    def normal(*shape, mean=0.0, std=0.2):
        return torch.randn(*shape, generator=gen) * std + mean

    sd = {
        "embedding.word_embeddings.weight": normal(config.vocab_size, h, std=1.0),
        "decoder.final_layernorm.weight": normal(h, mean=1.0, std=0.1),
        "output_layer.weight": normal(config.vocab_size, h, std=0.5),
    }
    for i in range(config.num_layers):
        p = f"decoder.layers.{i}."
        sd[p + "input_layernorm.weight"] = normal(h, mean=1.0, std=0.1)
        sd[p + "self_attention.linear_qkv.weight"] = normal(qkv_rows, h, std=0.3)
        sd[p + "self_attention.linear_proj.weight"] = normal(h, config.num_attention_heads * d)
        sd[p + "pre_mlp_layernorm.weight"] = normal(h, mean=1.0, std=0.1)
        sd[p + "mlp.linear_fc1.weight"] = normal(2 * config.ffn_hidden_size, h)
        sd[p + "mlp.linear_fc2.weight"] = normal(h, config.ffn_hidden_size)
    return sd


def test_context_parallel_is_refused(monkeypatch):
    # (a model that holds one pipeline stage is refused too: tests/generation/test_refit.py, with real stages)
    monkeypatch.setattr(parallel_state, "get_context_parallel_world_size", lambda: 2)
    with pytest.raises(NotImplementedError, match="does not support context parallelism"):
        TorchEngine(torch.nn.Linear(2, 2), eos_token_id=1, pad_token_id=0)


# ---------------------------------------------------------------- workers (spawned worlds)


def _detokenize(ids) -> str:
    return "".join(f"<{i}>" for i in ids)


def _argmax_reference(model, prompt: list[int], steps: int, vocab_size: int) -> list[int]:
    """Greedy decoding with a full forward of the growing sequence per step (no cache, no batch)."""
    from aligner.models.gpt import mask_padded_vocab

    ids = list(prompt)
    for _ in range(steps):
        logits = model(torch.tensor([ids]), None, None, runtime_gather_output=True)[0, -1]
        ids.append(int(mask_padded_vocab(logits, vocab_size).argmax()))
    return ids


def _full_forward_logits(model, out) -> list[torch.Tensor]:
    """Per row, the ``[length - 1, vocab]`` logits a trainer computes for the rollout (no cache)."""
    rows = []
    for b in range(len(out.lengths)):
        ids = out.tokens[b : b + 1, : int(out.lengths[b])]
        rows.append(model(ids, None, None, runtime_gather_output=True)[0, :-1, : CONFIG.vocab_size].float())
    return rows


def _error(fn) -> str:
    try:
        fn()
    except (ValueError, NotImplementedError, KeyError, StaleWeightsError) as err:
        return f"{type(err).__name__}: {err}"
    return "no error"


class _CaptureLogits:
    """Record the gathered logits ``[batch, padded_vocab]`` every draw of ``engine`` is made from, until ``remove()``.

    They are formed from the hidden states each draw gets, also where the draw itself does not form
    them (greedy on the fused head: :func:`aligner.ops.linear_greedy`).
    """

    def __init__(self, engine: TorchEngine, store: list):
        draw = engine._draw

        def recording(hidden, sampling, generator):
            store.append(engine._head(hidden).clone())
            return draw(hidden, sampling, generator)

        engine._draw = recording
        self.engine = engine

    def remove(self) -> None:
        del self.engine._draw  # the class's method again


def tp1_worker(state_dict):
    from transformers import LlamaForCausalLM

    from aligner.generation.refit import bucket_named_tensors
    from aligner.models.gpt import build_model
    from aligner.models.hf import config_to_hf, import_hf, megatron_to_hf
    from aligner.models.sharding import gather_full_state_dict, load_full_state_dict
    from aligner.parallel import destroy, initialize

    initialize()
    model = build_model(CONFIG, init_weights=False)
    load_full_state_dict(model, state_dict)
    engine = TorchEngine(model, eos_token_id=[], pad_token_id=PAD, detokenize=_detokenize, version=3)
    model.train()
    result = {"greedy": engine.generate(PROMPTS, GREEDY), "training_after": model.training}
    model.eval()
    with torch.no_grad():
        result["argmax"] = [_argmax_reference(model, p, MAX_NEW, CONFIG.vocab_size) for p in PROMPTS]
    result["solo"] = [engine.generate([p], GREEDY) for p in PROMPTS]
    # greedy draws on the fused head (CPU float32, one rank); the same run through the logits
    result["fused_head"] = engine._fused_greedy_weight(torch.zeros(1, CONFIG.hidden_size)) is not None
    engine._fused_greedy_weight = lambda hidden: None
    result["greedy_through_logits"] = engine.generate(PROMPTS, GREEDY)
    del engine._fused_greedy_weight

    # log-probs: the logits each draw was made from, and a trainer's recompute
    result["as_drawn"] = {}
    for name, sampling in LOGPROB_CASES.items():
        logits: list[torch.Tensor] = []
        handle = _CaptureLogits(engine, logits)
        out = engine.generate(PROMPTS, sampling)
        handle.remove()
        with torch.no_grad():
            result["as_drawn"][name] = {"out": out, "logits": logits, "recompute": _full_forward_logits(model, out)}

    # stops: eos (a separate engine), a stop token, a stop string
    greedy_rows = result["argmax"]
    eos_token = greedy_rows[0][len(PROMPTS[0]) + 3]  # row 0's 4th greedy token
    result["eos_token"] = eos_token
    eos_engine = TorchEngine(model, eos_token_id=eos_token, pad_token_id=PAD)
    batch_sizes: list[torch.Tensor] = []
    handle = _CaptureLogits(eos_engine, batch_sizes)
    result["eos"] = eos_engine.generate(PROMPTS, GREEDY)
    handle.remove()
    result["eos_batch_sizes"] = [len(logits) for logits in batch_sizes]
    stop_token = greedy_rows[1][len(PROMPTS[1]) + 2]
    result["stop_token"] = stop_token
    result["stop_token_out"] = engine.generate(
        PROMPTS, SamplingParams(max_new_tokens=MAX_NEW, greedy=True, stop_token_ids=[stop_token])
    )
    first, second = greedy_rows[2][len(PROMPTS[2]) + 1 : len(PROMPTS[2]) + 3]
    stop_string = f"{first}><{second}"  # starts inside one token's text, ends inside the next
    result["stop_string"] = stop_string
    result["stop_string_out"] = engine.generate(
        PROMPTS, SamplingParams(max_new_tokens=MAX_NEW, greedy=True, stop_strings=[stop_string])
    )

    # sampling: reproducible by seed or generator, within the vocabulary asked for
    sampled = SamplingParams(max_new_tokens=MAX_NEW, temperature=1.5, top_p=0.95, seed=SAMPLE_SEED)
    result["sampled"] = [engine.generate(PROMPTS, sampled) for _ in range(2)]
    result["sampled_generator"] = engine.generate(
        PROMPTS, sampled, generator=torch.Generator().manual_seed(SAMPLE_SEED)
    )
    small_prompts = [[t % SMALL_VOCAB for t in p] for p in PROMPTS]
    result["small_vocab"] = generate(
        model,
        small_prompts,
        max_new_tokens=MAX_NEW,
        eos_token_id=[],
        pad_token_id=PAD,
        temperature=1.5,
        top_p=0.95,
        vocab_size=SMALL_VOCAB,
    )

    # versions: stale is an error; a refit from the engine's own model is a no-op
    versions = {"stale": _error(lambda: engine.generate(PROMPTS, GREEDY, expected_version=4))}
    before = {name: (p.data_ptr(), p.detach().clone()) for name, p in model.named_parameters()}
    versions["refit_s"] = engine.refit(model, 4)
    versions["same_tensors"] = all(
        p.data_ptr() == before[name][0] and torch.equal(p, before[name][1]) for name, p in model.named_parameters()
    )
    versions["version"] = engine.version
    versions["rollouts_version"] = engine.generate(PROMPTS[:1], GREEDY, expected_version=4).weights_version
    versions["older"] = _error(lambda: engine.refit(model, 2))
    result["versions"] = versions

    # refit of another model: Hugging Face-named buckets, whole or shuffled into many small ones
    other = TorchEngine(build_model(CONFIG), eos_token_id=[], pad_token_id=PAD)
    result["before_refit"] = other.generate(PROMPTS, GREEDY)
    result["refit_s"] = other.refit(model, 1)
    result["refit_params_equal"] = all(
        torch.equal(p, q) for p, q in zip(other.model.parameters(), model.parameters(), strict=True)
    )
    result["refit"] = {"greedy": other.generate(PROMPTS, GREEDY, expected_version=1)}
    result["refit"]["sampled"] = other.generate(PROMPTS, sampled)
    hf_items = list(megatron_to_hf(state_dict, CONFIG).items())
    random.Random(0).shuffle(hf_items)
    shuffled = TorchEngine(build_model(CONFIG), eos_token_id=[], pad_token_id=PAD)
    shuffled.refit_from_hf_buckets(bucket_named_tensors(hf_items, 2048), 1)
    result["refit_shuffled"] = shuffled.generate(PROMPTS, GREEDY)
    result["refit_bucket_count"] = len(list(bucket_named_tensors(hf_items, 2048)))
    broken = TorchEngine(build_model(CONFIG), eos_token_id=[], pad_token_id=PAD)
    result["refit_errors"] = {
        "missing": _error(lambda: broken.refit_from_hf_buckets([hf_items[1:]], 1)),
        "after_missing": _error(lambda: broken.generate(PROMPTS, GREEDY)),
        "extra": _error(lambda: broken.refit_from_hf_buckets([[*hf_items, ("model.bogus.weight", torch.zeros(1))]], 1)),
        "twice": _error(lambda: broken.refit_from_hf_buckets([hf_items, hf_items[:1]], 1)),
    }
    # a Hugging Face model's own state dict (random, untied): the refit equals import_hf
    hf_model = LlamaForCausalLM(config_to_hf(CONFIG))
    imported = import_hf(hf_model)
    from_hf = TorchEngine(build_model(CONFIG), eos_token_id=[], pad_token_id=PAD)
    from_hf.refit_from_hf_buckets(bucket_named_tensors(hf_model.state_dict().items(), 4096), 1)
    # (import_hf pads the vocabulary by its own multiple: compare the full, unpadded tensors)
    mine, theirs = gather_full_state_dict(from_hf.model), gather_full_state_dict(imported)
    result["hf_params_equal"] = mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)

    value_model = build_model(CONFIG, num_value_outputs=2)
    result["errors"] = {
        "value_model": _error(lambda: TorchEngine(value_model, eos_token_id=[], pad_token_id=PAD)),
        "out_of_vocab": _error(lambda: engine.generate([[1, CONFIG.vocab_size]], GREEDY)),
        "empty_prompt": _error(lambda: engine.generate([[1], []], GREEDY)),
        "no_new_tokens": _error(lambda: generate(model, [[1]], max_new_tokens=0, eos_token_id=[], pad_token_id=PAD)),
        "too_long": _error(lambda: engine.generate([[1] * 60], SamplingParams(max_new_tokens=5))),
        "stop_string_without_detokenize": _error(
            lambda: eos_engine.generate([[1]], SamplingParams(stop_strings=["x"]))
        ),
        "stop_token_out_of_vocab": _error(lambda: engine.generate([[1]], SamplingParams(stop_token_ids=[99]))),
    }
    destroy()
    return result


def tp2_worker(state_dict):
    from aligner.generation.refit import bucket_named_tensors
    from aligner.models.gpt import build_model
    from aligner.models.hf import megatron_to_hf
    from aligner.models.sharding import load_full_state_dict
    from aligner.parallel import destroy, initialize

    initialize(tp=2)
    model = build_model(CONFIG, init_weights=False)
    load_full_state_dict(model, state_dict)
    engine = TorchEngine(model, eos_token_id=[], pad_token_id=PAD)
    rank = parallel_state.get_tensor_model_parallel_rank()
    sampled = SamplingParams(max_new_tokens=MAX_NEW, temperature=1.5, top_p=0.95)
    result = {
        "greedy": engine.generate(PROMPTS, GREEDY),
        # Different generator seeds per rank: the source rank's draws must win everywhere.
        "sampled": engine.generate(PROMPTS, sampled, generator=torch.Generator().manual_seed(SAMPLE_SEED + rank)),
    }
    refit = TorchEngine(build_model(CONFIG), eos_token_id=[], pad_token_id=PAD)
    refit.refit_from_hf_buckets(bucket_named_tensors(megatron_to_hf(state_dict, CONFIG).items(), 4096), 1)
    result["refit"] = refit.generate(PROMPTS, GREEDY)
    destroy()
    return result


# Layouts besides CONFIG's that the engine's layer loop must reproduce (Qwen2's bias, tied head,
# Llama-3.1 RoPE scaling, bf16 weights).
VARIANTS = {
    "qkv_bias": {"qkv_bias": True},
    "tied": {"tie_word_embeddings": True},
    "rope_scaling": {"rope_scaling_factor": 8.0},
    "bf16": {"params_dtype": "bfloat16"},
    "qk_layernorm": {"qk_layernorm": True},
    "qkv_bias_qk_layernorm_tied": {"qkv_bias": True, "qk_layernorm": True, "tie_word_embeddings": True},
}
# bf16: the engine and the full forward round differently; logits of a few units have a bf16 spacing of ~0.03.
BF16_LOGPROB_ATOL = 0.25


def variants_worker(seed: int):
    from dataclasses import replace

    from aligner.models.gpt import build_model
    from aligner.parallel import destroy, initialize

    initialize(seed=seed)
    result = {}
    for name, changes in VARIANTS.items():
        model = build_model(replace(CONFIG, **changes))
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                norm = "norm" in param_name
                param.normal_(1.0 if norm else 0.0, 0.1 if norm else 0.5)
        model.eval()
        out = TorchEngine(model, eos_token_id=[], pad_token_id=PAD).generate(PROMPTS, GREEDY)
        with torch.no_grad():
            result[name] = {"out": out, "recompute": _full_forward_logits(model, out)}
    # what the decode step does not reproduce is refused, not generated wrongly
    refusals = {}
    model = build_model(CONFIG)
    model.config.rotary_interleaved = True
    refusals["rotary_interleaved"] = _error(lambda: TorchEngine(model, eos_token_id=[], pad_token_id=PAD))
    model = build_model(CONFIG)
    model.decoder.layers[1].mlp.linear_fc1 = torch.nn.Linear(CONFIG.hidden_size, 2 * CONFIG.ffn_hidden_size)
    refusals["linear_fc1"] = _error(lambda: TorchEngine(model, eos_token_id=[], pad_token_id=PAD))
    destroy()
    return result, refusals


# ---------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def weights():
    return full_state_dict(CONFIG, seed=WEIGHTS_SEED)


@pytest.fixture(scope="module")
def tp1(weights):
    return run_distributed(tp1_worker, 1, args=(weights,))[0]


def _rows(out) -> list[list[int]]:
    return [out.tokens[b, : int(out.lengths[b])].tolist() for b in range(len(out.lengths))]


def _responses(out) -> list[list[int]]:
    return [row[len(prompt) :] for row, prompt in zip(_rows(out), PROMPTS, strict=True)]


def _check_layout(out, prompts, max_new):
    """Shapes, prompt copy, right padding, length limits and log-prob layout of Rollouts."""
    batch = len(prompts)
    width = int(out.lengths.max())
    assert out.tokens.shape == (batch, width) and out.logprobs.shape == (batch, width - 1)
    assert out.prompt_lengths.tolist() == [len(p) for p in prompts]
    assert out.is_end.dtype == torch.bool and out.lengths.dtype == torch.long
    assert out.logprobs.dtype == torch.float32
    assert out.is_end.tolist() == [reason != "length" for reason in out.stop_reason]
    for b, prompt in enumerate(prompts):
        length = int(out.lengths[b])
        assert len(prompt) < length <= len(prompt) + max_new
        assert out.tokens[b, : len(prompt)].tolist() == prompt
        assert (out.tokens[b, length:] == PAD).all()
    assert (out.logprobs[~out.response_mask] == 0).all()
    assert (out.logprobs[out.response_mask] <= 0).all()


def _expected_stop(response: list[int], stops) -> int:
    """Tokens kept of a greedy ``response`` when ``stops(prefix)`` says where it ends (all if never)."""
    for n in range(1, len(response) + 1):
        if stops(response[:n]):
            return n
    return len(response)


@pytest.mark.slow
def test_greedy_equals_stepwise_argmax_of_full_forwards(tp1):
    out = tp1["greedy"]
    _check_layout(out, PROMPTS, MAX_NEW)
    assert _rows(out) == tp1["argmax"]
    assert out.stop_reason == ["length"] * len(PROMPTS) and not out.is_end.any()
    assert (out.lengths - out.prompt_lengths == MAX_NEW).all()
    assert tp1["training_after"], "generate must restore the model's training mode"


@pytest.mark.slow
def test_greedy_on_the_fused_head_equals_greedy_through_the_logits(tp1):
    assert tp1["fused_head"], "a CPU float32 single-rank model should take the fused head"
    fused, through_logits = tp1["greedy"], tp1["greedy_through_logits"]
    assert _rows(fused) == _rows(through_logits)
    torch.testing.assert_close(fused.logprobs, through_logits.logprobs, atol=AS_DRAWN_ATOL, rtol=0)


@pytest.mark.slow
def test_batch_of_mixed_prompt_lengths_equals_each_row_alone(tp1):
    assert [_rows(solo)[0] for solo in tp1["solo"]] == _rows(tp1["greedy"])


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(LOGPROB_CASES))
def test_logprobs_are_those_of_the_logits_drawn_from(tp1, case):
    sampling, record = LOGPROB_CASES[case], tp1["as_drawn"][case]
    out, logits = record["out"], record["logits"]
    _check_layout(out, PROMPTS, MAX_NEW)
    # No stops: every forward holds every row in order, and forward t draws response token t.
    assert len(logits) == MAX_NEW and all(step.shape[0] == len(PROMPTS) for step in logits)
    for t, step_logits in enumerate(logits):
        columns = out.prompt_lengths + t
        tokens = out.tokens[torch.arange(len(PROMPTS)), columns]
        expected = reference_logprobs(
            step_logits[:, : CONFIG.vocab_size], tokens, sampling.temperature, sampling.top_k, sampling.top_p,
            sampling.greedy,
        )  # fmt: skip
        got = out.logprobs[torch.arange(len(PROMPTS)), columns - 1].double()
        torch.testing.assert_close(got, expected, atol=AS_DRAWN_ATOL, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(LOGPROB_CASES))
def test_logprobs_match_a_trainers_recompute(tp1, case):
    sampling, record = LOGPROB_CASES[case], tp1["as_drawn"][case]
    out = record["out"]
    for b, row_logits in enumerate(record["recompute"]):
        start, end = int(out.prompt_lengths[b]) - 1, int(out.lengths[b]) - 1
        tokens = out.tokens[b, start + 1 : end + 1]
        expected = reference_logprobs(
            row_logits[start:end], tokens, sampling.temperature, sampling.top_k, sampling.top_p, sampling.greedy
        )
        torch.testing.assert_close(out.logprobs[b, start:end].double(), expected, atol=RECOMPUTE_ATOL, rtol=0)


@pytest.mark.slow
def test_rows_stop_at_eos_and_leave_the_batch(tp1):
    eos, out = tp1["eos_token"], tp1["eos"]
    _check_layout(out, PROMPTS, MAX_NEW)
    assert out.stop_reason[0] == "eos" and int(out.lengths[0]) == len(PROMPTS[0]) + 4
    # A row that ended early does not change the others: each is its no-eos greedy row, cut at its eos.
    expected_lengths = []
    for b, response in enumerate(_responses(tp1["greedy"])):
        kept = _expected_stop(response, lambda prefix: prefix[-1] == eos)
        expected_lengths.append(kept)
        assert _responses(out)[b] == response[:kept]
        assert out.stop_reason[b] == ("eos" if eos in response else "length")
    # Finished rows cost nothing: forward t (t >= 1) computes exactly the rows still generating.
    alive = [sum(kept > t for kept in expected_lengths) for t in range(max(expected_lengths))]
    assert tp1["eos_batch_sizes"] == alive
    assert out.metrics["forwards"] == max(expected_lengths)
    assert out.metrics["decode_rows"] == sum(kept - 1 for kept in expected_lengths)
    assert out.metrics["decode_rows"] < tp1["greedy"].metrics["decode_rows"] == len(PROMPTS) * (MAX_NEW - 1)


@pytest.mark.slow
def test_stop_token_ids(tp1):
    stop, out = tp1["stop_token"], tp1["stop_token_out"]
    _check_layout(out, PROMPTS, MAX_NEW)
    for b, response in enumerate(_responses(tp1["greedy"])):
        kept = _expected_stop(response, lambda prefix: prefix[-1] == stop)
        assert _responses(out)[b] == response[:kept]
        assert out.stop_reason[b] == ("stop_token" if stop in response else "length")
    assert out.stop_reason[1] == "stop_token"


@pytest.mark.slow
def test_stop_strings_end_at_the_token_that_completes_them(tp1):
    stop, out = tp1["stop_string"], tp1["stop_string_out"]
    _check_layout(out, PROMPTS, MAX_NEW)
    for b, response in enumerate(_responses(tp1["greedy"])):
        kept = _expected_stop(response, lambda prefix: stop in _detokenize(prefix))
        assert _responses(out)[b] == response[:kept]
        assert out.stop_reason[b] == ("stop_string" if stop in _detokenize(response) else "length")
    assert out.stop_reason[2] == "stop_string" and len(_responses(out)[2]) <= 3


@pytest.mark.slow
def test_sampling_is_reproducible_and_respects_vocab_size(tp1):
    first, second = tp1["sampled"]
    _check_layout(first, PROMPTS, MAX_NEW)
    assert _rows(first) == _rows(second) and torch.equal(first.logprobs, second.logprobs)
    assert _rows(tp1["sampled_generator"]) == _rows(first), "seed=s and a generator seeded s draw alike"
    assert _rows(first) != _rows(tp1["greedy"]), "temperature 1.5 should leave the greedy path somewhere"
    small = tp1["small_vocab"]
    for b in range(len(PROMPTS)):
        assert (small.tokens[b, : int(small.lengths[b])] < SMALL_VOCAB).all()


@pytest.mark.slow
def test_versions_stale_weights_and_the_no_op_refit(tp1):
    versions = tp1["versions"]
    assert re.match("StaleWeightsError: .*version 3 but version 4 is required", versions["stale"])
    assert tp1["greedy"].weights_version == 3
    assert versions["same_tensors"] and versions["refit_s"] == 0.0
    assert versions["version"] == 4 and versions["rollouts_version"] == 4
    assert re.match("ValueError: refit to version 2 is older", versions["older"])


@pytest.mark.slow
def test_refit_from_hf_buckets_generates_as_the_source(tp1):
    assert _rows(tp1["before_refit"]) != _rows(tp1["greedy"]), "the fresh model must start out different"
    assert tp1["refit_params_equal"] and tp1["refit_s"] > 0
    assert _rows(tp1["refit"]["greedy"]) == _rows(tp1["greedy"])
    assert tp1["refit"]["greedy"].weights_version == 1
    assert _rows(tp1["refit"]["sampled"]) == _rows(tp1["sampled"][0])
    assert tp1["refit_bucket_count"] > 5
    assert _rows(tp1["refit_shuffled"]) == _rows(tp1["greedy"])
    assert tp1["hf_params_equal"], "a refit from a Hugging Face state dict loads what import_hf loads"


@pytest.mark.slow
@pytest.mark.parametrize(
    "case,match",
    [
        ("missing", "KeyError: .*buckets ended before every weight of"),
        ("after_missing", "StaleWeightsError: the last refit failed"),
        ("extra", "ValueError: refit: tensors with no place in the model: \\['model.bogus.weight'\\]"),
        ("twice", "ValueError: refit: .* arrived twice"),
    ],
)
def test_bad_refits(tp1, case, match):
    assert re.match(match, tp1["refit_errors"][case]), tp1["refit_errors"][case]


@pytest.mark.slow
@pytest.mark.parametrize(
    "case,match",
    [
        ("value_model", "ValueError: .*language model"),
        ("out_of_vocab", "ValueError: prompts\\[0\\].*61"),
        ("empty_prompt", "ValueError: .*non-empty"),
        ("no_new_tokens", "ValueError: max_new_tokens"),
        ("too_long", "ValueError: .*max_position_embeddings 64"),
        ("stop_string_without_detokenize", "ValueError: stop_strings need a detokenize"),
        ("stop_token_out_of_vocab", "ValueError: stop_token_ids.*99"),
    ],
)
def test_bad_arguments(tp1, case, match):
    assert re.match(match, tp1["errors"][case]), tp1["errors"][case]


@pytest.mark.slow
def test_other_layouts_match_the_full_forward():
    ((result, refusals),) = run_distributed(variants_worker, 1, args=(WEIGHTS_SEED,))
    assert (
        refusals["rotary_interleaved"].startswith("NotImplementedError")
        and "rotary_interleaved" in (refusals["rotary_interleaved"])
    )
    assert "layer 1's linear_fc1 of type Linear" in refusals["linear_fc1"], refusals
    for name, record in result.items():
        out = record["out"]
        _check_layout(out, PROMPTS, MAX_NEW)
        for b, row_logits in enumerate(record["recompute"]):
            start, end = int(out.prompt_lengths[b]) - 1, int(out.lengths[b]) - 1
            tokens = out.tokens[b, start + 1 : end + 1]
            expected = row_logits[start:end].double().log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)
            atol = BF16_LOGPROB_ATOL if name == "bf16" else RECOMPUTE_ATOL
            torch.testing.assert_close(out.logprobs[b, start:end].double(), expected, atol=atol, rtol=0, msg=name)
            if name != "bf16":  # bf16 rounding may flip a near-tie; float32 must pick the same argmax
                assert torch.equal(row_logits[start:end].argmax(-1), tokens), name


@pytest.mark.slow
def test_tensor_parallel_generation_equals_one_rank(weights, tp1):
    ranks = run_distributed(tp2_worker, 2, args=(weights,))
    for rank in ranks:
        assert _rows(rank["greedy"]) == _rows(tp1["greedy"])
        torch.testing.assert_close(rank["greedy"].logprobs, tp1["greedy"].logprobs, atol=RECOMPUTE_ATOL, rtol=0)
        assert _rows(rank["refit"]) == _rows(tp1["greedy"]), "a refit at TP=2 loads each rank's shard"
    # Each rank drew with its own seed; the broadcast makes them agree (on the source rank's draws).
    assert _rows(ranks[0]["sampled"]) == _rows(ranks[1]["sampled"])
    assert torch.equal(ranks[0]["sampled"].logprobs, ranks[1]["sampled"].logprobs)
    # Rank 0 used the TP=1 run's seed: the same draws from (numerically) the same distributions.
    assert _rows(ranks[0]["sampled"]) == _rows(tp1["sampled"][0])
