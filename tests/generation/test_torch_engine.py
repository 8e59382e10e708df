"""The torch generation engine: sampling helpers against references, generation against plain forwards.

The sampling helpers are pure and tested in this process. Generation needs
megatron, initialized once per process, so each parallel layout runs in its
own spawned world (``run_distributed``) that does every case for that layout
and returns the raw outputs; the tests compare them here.

The model's weights come from a fixed seed: these cases compare discrete
choices (argmax, draws) made from logits computed along different float paths
(KV cache vs. full forward, one row vs. a batch, TP=2 vs. TP=1), and an
accidental near-tie between two logits would make such a comparison flaky.
"""

import re

import pytest
import torch
from distributed import run_distributed
from megatron.core import parallel_state

from aligner.generation.torch_engine import generate, sample_next_token, sampling_probs
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
# Probabilities: float32 softmax of the same values along two code paths.
PROB_ATOL = 1e-6
# Draws: SAMPLES draws from one row; a frequency may miss its probability by FREQ_SIGMAS standard errors.
SAMPLES, FREQ_SIGMAS = 20000, 5.0


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


# ---------------------------------------------------------------- sampling helpers


def reference_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Row by row in float64: temperature, keep the top-k set, then the nucleus, renormalize."""
    out = torch.zeros(logits.shape, dtype=torch.float64)
    for row, values in enumerate(logits.double() / temperature):
        order = sorted(range(values.numel()), key=lambda i: -values[i].item())
        keep = set(order)
        if top_k:
            kth = values[order[top_k - 1]].item()
            keep = {i for i in order if values[i].item() >= kth}
        kept = torch.tensor(sorted(keep))
        probs = torch.zeros_like(values)
        probs[kept] = torch.softmax(values[kept], dim=0)
        if top_p < 1:
            nucleus, mass = [], 0.0
            for i in sorted(keep, key=lambda i: -probs[i].item()):
                if mass >= top_p:
                    break
                nucleus.append(i)
                mass += probs[i].item()
            kept = torch.tensor(nucleus)
            probs = torch.zeros_like(values)
            probs[kept] = torch.softmax(values[kept], dim=0)
        out[row] = probs
    return out


@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0), (1.0, 0, 0.8), (0.5, 10, 0.9), (2.0, 1, 1.0), (1.0, 3, 0.05)],
)
def test_sampling_probs_match_reference(temperature, top_k, top_p):
    logits = torch.randn(6, 37) * 3
    probs = sampling_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(
        probs.double(), reference_probs(logits, temperature, top_k, top_p), atol=PROB_ATOL, rtol=0
    )


def test_top_k_keeps_ties_at_the_boundary():
    logits = torch.tensor([[3.0, 1.0, 1.0, 0.0]])
    probs = sampling_probs(logits, top_k=2)
    assert probs[0, 3] == 0 and probs[0, 1] > 0 and probs[0, 2] > 0


def test_bf16_logits_and_masked_padding_columns():
    logits = torch.randn(3, 20).bfloat16()
    logits[:, 15:] = torch.finfo(torch.bfloat16).min  # what mask_padded_vocab writes
    for temperature in (0.3, 1.0, 3.0):
        probs = sampling_probs(logits, temperature=temperature, top_p=0.95)
        assert torch.isfinite(probs).all()
        assert (probs[:, 15:] == 0).all()
        torch.testing.assert_close(probs.sum(-1), torch.ones(3))


def test_greedy_is_argmax():
    logits = torch.randn(8, 50)
    assert torch.equal(sample_next_token(logits, greedy=True), logits.argmax(-1))
    assert torch.equal(sample_next_token(logits, top_k=1), logits.argmax(-1))


def test_draws_follow_the_filtered_distribution():
    row = torch.randn(1, 12) * 2
    settings = {"temperature": 0.8, "top_k": 8, "top_p": 0.9}
    expected = reference_probs(row, **settings)[0]
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    draws = sample_next_token(row.expand(SAMPLES, -1), generator=gen, **settings)
    freq = torch.bincount(draws, minlength=12).double() / SAMPLES
    assert (freq[expected == 0] == 0).all(), "a filtered-out token was drawn"
    sigma = (expected * (1 - expected) / SAMPLES).sqrt()
    assert ((freq - expected).abs() <= FREQ_SIGMAS * sigma + 1e-12).all(), (freq, expected)


def test_same_generator_state_same_draws():
    logits = torch.randn(16, 30)
    seed = int(torch.randint(0, 2**31, ()))
    first = sample_next_token(logits, top_p=0.9, generator=torch.Generator().manual_seed(seed))
    second = sample_next_token(logits, top_p=0.9, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(first, second)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
    ],
)
def test_bad_sampling_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_next_token(torch.randn(2, 5), **kwargs)


def test_bad_logits():
    with pytest.raises(ValueError, match="logits"):
        sample_next_token(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="logits"):
        sampling_probs(torch.ones(2, 5, dtype=torch.long))


@pytest.mark.parametrize("getter", ["get_pipeline_model_parallel_world_size", "get_context_parallel_world_size"])
def test_pipeline_or_context_parallel_is_refused(monkeypatch, getter):
    monkeypatch.setattr(parallel_state, "get_pipeline_model_parallel_world_size", lambda: 1)
    monkeypatch.setattr(parallel_state, "get_context_parallel_world_size", lambda: 1)
    monkeypatch.setattr(parallel_state, getter, lambda: 2)
    with pytest.raises(NotImplementedError, match="tensor parallelism only"):
        generate(torch.nn.Linear(2, 2), [[1]], max_new_tokens=1, eos_token_id=1, pad_token_id=0)


# ---------------------------------------------------------------- generation in spawned worlds


def _argmax_reference(model, prompt: list[int], steps: int, eos: set[int], vocab_size: int) -> list[int]:
    """Greedy decoding with a full forward of the growing sequence per step (no cache, no batch)."""
    from aligner.models.gpt import mask_padded_vocab

    ids = list(prompt)
    for _ in range(steps):
        logits = model(torch.tensor([ids]), None, None, runtime_gather_output=True)[0, -1]
        ids.append(int(mask_padded_vocab(logits, vocab_size).argmax()))
        if ids[-1] in eos:
            break
    return ids


def _error(fn) -> str:
    try:
        fn()
    except (ValueError, NotImplementedError) as err:
        return f"{type(err).__name__}: {err}"
    return "no error"


def tp1_worker(state_dict):
    from aligner.models.gpt import build_model
    from aligner.models.sharding import load_full_state_dict
    from aligner.parallel import destroy, initialize

    initialize()
    model = build_model(CONFIG, init_weights=False)
    load_full_state_dict(model, state_dict)
    common = {"eos_token_id": [], "pad_token_id": PAD}
    model.train()
    greedy = generate(model, PROMPTS, max_new_tokens=MAX_NEW, greedy=True, **common)
    result = {"greedy": greedy, "training_after": model.training}
    model.eval()
    with torch.no_grad():
        result["argmax"] = [_argmax_reference(model, p, MAX_NEW, set(), CONFIG.vocab_size) for p in PROMPTS]
    # An eos id that row 0 reaches: the 4th token it generates without one.
    eos_token = result["argmax"][0][len(PROMPTS[0]) + 3]
    result["eos_token"] = eos_token
    result["solo"] = [generate(model, [p], max_new_tokens=MAX_NEW, greedy=True, **common) for p in PROMPTS]
    result["eos"] = generate(
        model, PROMPTS, max_new_tokens=MAX_NEW, greedy=True, eos_token_id=eos_token, pad_token_id=PAD
    )
    sampled = {"max_new_tokens": MAX_NEW, "temperature": 1.5, "top_p": 0.95, **common}
    result["sampled"] = [
        generate(model, PROMPTS, generator=torch.Generator().manual_seed(SAMPLE_SEED), **sampled) for _ in range(2)
    ]
    small_prompts = [[t % SMALL_VOCAB for t in p] for p in PROMPTS]
    result["small_vocab"] = generate(model, small_prompts, vocab_size=SMALL_VOCAB, **sampled)
    value_model = build_model(CONFIG, num_value_outputs=2)
    result["errors"] = {
        "value_model": _error(lambda: generate(value_model, [[1]], max_new_tokens=1, **common)),
        "out_of_vocab": _error(lambda: generate(model, [[1, CONFIG.vocab_size]], max_new_tokens=1, **common)),
        "empty_prompt": _error(lambda: generate(model, [[1], []], max_new_tokens=1, **common)),
        "no_new_tokens": _error(lambda: generate(model, [[1]], max_new_tokens=0, **common)),
        "too_long": _error(lambda: generate(model, [[1] * 60], max_new_tokens=5, **common)),
    }
    destroy()
    return result


def tp2_worker(state_dict):
    from aligner.models.gpt import build_model
    from aligner.models.sharding import load_full_state_dict
    from aligner.parallel import destroy, initialize

    initialize(tp=2)
    model = build_model(CONFIG, init_weights=False)
    load_full_state_dict(model, state_dict)
    common = {"max_new_tokens": MAX_NEW, "eos_token_id": [], "pad_token_id": PAD}
    result = {
        "greedy": generate(model, PROMPTS, greedy=True, **common),
        # Different generator seeds per rank: the source rank's draws must win everywhere.
        "sampled": generate(
            model,
            PROMPTS,
            temperature=1.5,
            top_p=0.95,
            generator=torch.Generator().manual_seed(SAMPLE_SEED + parallel_state.get_tensor_model_parallel_rank()),
            **common,
        ),
    }
    destroy()
    return result


@pytest.fixture(scope="module")
def weights():
    return full_state_dict(CONFIG, seed=2024)


@pytest.fixture(scope="module")
def tp1(weights):
    return run_distributed(tp1_worker, 1, args=(weights,))[0]


def _rows(out) -> list[list[int]]:
    return [out.tokens[b, : int(out.lengths[b])].tolist() for b in range(len(out.lengths))]


def _check_layout(out, prompts, max_new):
    """Shapes, prompt copy, right padding and length limits of a GenerationOutput."""
    batch = len(prompts)
    assert out.tokens.shape == (batch, int(out.lengths.max()))
    assert out.prompt_lengths.tolist() == [len(p) for p in prompts]
    assert out.is_end.dtype == torch.bool and out.lengths.dtype == torch.long
    for b, prompt in enumerate(prompts):
        length = int(out.lengths[b])
        assert len(prompt) < length <= len(prompt) + max_new
        assert out.tokens[b, : len(prompt)].tolist() == prompt
        assert (out.tokens[b, length:] == PAD).all()


@pytest.mark.slow
def test_greedy_equals_stepwise_argmax_of_full_forwards(tp1):
    out = tp1["greedy"]
    _check_layout(out, PROMPTS, MAX_NEW)
    assert _rows(out) == tp1["argmax"]
    assert not out.is_end.any(), "no eos id was given: every row runs to max_new_tokens"
    assert (out.lengths - out.prompt_lengths == MAX_NEW).all()
    assert tp1["training_after"], "generate must restore the model's training mode"


@pytest.mark.slow
def test_batch_of_mixed_prompt_lengths_equals_each_row_alone(tp1):
    assert [_rows(solo)[0] for solo in tp1["solo"]] == _rows(tp1["greedy"])


@pytest.mark.slow
def test_rows_stop_at_eos(tp1):
    eos, out = tp1["eos_token"], tp1["eos"]
    _check_layout(out, PROMPTS, MAX_NEW)
    assert out.is_end[0] and int(out.lengths[0]) == len(PROMPTS[0]) + 4
    for b, full in enumerate(_rows(tp1["greedy"])):
        response = full[len(PROMPTS[b]) :]
        if eos in response:
            expected, ended = full[: len(PROMPTS[b]) + response.index(eos) + 1], True
        else:
            expected, ended = full, False
        assert _rows(out)[b] == expected
        assert bool(out.is_end[b]) == ended


@pytest.mark.slow
def test_sampling_is_reproducible_and_respects_vocab_size(tp1):
    first, second = tp1["sampled"]
    _check_layout(first, PROMPTS, MAX_NEW)
    assert torch.equal(first.tokens, second.tokens) and torch.equal(first.lengths, second.lengths)
    assert _rows(first) != _rows(tp1["greedy"]), "temperature 1.5 should leave the greedy path somewhere"
    small = tp1["small_vocab"]
    for b in range(len(PROMPTS)):
        assert (small.tokens[b, : int(small.lengths[b])] < SMALL_VOCAB).all()


@pytest.mark.slow
@pytest.mark.parametrize(
    "case,match",
    [
        ("value_model", "ValueError: .*language model"),
        ("out_of_vocab", "ValueError: prompts\\[0\\].*61"),
        ("empty_prompt", "ValueError: .*non-empty"),
        ("no_new_tokens", "ValueError: max_new_tokens"),
        ("too_long", "ValueError: .*max_position_embeddings 64"),
    ],
)
def test_bad_arguments(tp1, case, match):
    assert re.match(match, tp1["errors"][case]), tp1["errors"][case]


@pytest.mark.slow
def test_tensor_parallel_generation_equals_one_rank(weights, tp1):
    ranks = run_distributed(tp2_worker, 2, args=(weights,))
    for rank in ranks:
        assert _rows(rank["greedy"]) == _rows(tp1["greedy"])
    # Each rank drew with its own seed; the broadcast makes them agree (on the source rank's draws).
    assert _rows(ranks[0]["sampled"]) == _rows(ranks[1]["sampled"])
    assert torch.equal(ranks[0]["sampled"].is_end, ranks[1]["sampled"].is_end)
    # Rank 0 used the TP=1 run's seed: the same draws from (numerically) the same distributions.
    assert _rows(ranks[0]["sampled"]) == _rows(tp1["sampled"][0])
