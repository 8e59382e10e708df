"""The sampler (aligner.generation.sampling) against float64 references, in this process."""

import pytest
import torch
from sampling_reference import reference_logprobs, reference_probs

from aligner.generation.sampling import draw, filtered_logits, sample_with_logprobs, sampling_probs

# Probabilities: float32 softmax of the same values along two code paths.
PROB_ATOL = 1e-6
# Log-probs: float32 log_softmax of the same logits against float64; |logit| <= ~12 here.
LOGPROB_ATOL = 1e-5
# Draws: SAMPLES draws from one row; a frequency may miss its probability by FREQ_SIGMAS standard errors.
SAMPLES, FREQ_SIGMAS = 20000, 5.0

SETTINGS = [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0), (1.0, 0, 0.8), (0.5, 10, 0.9), (2.0, 1, 1.0), (1.0, 3, 0.05)]


@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
def test_sampling_probs_match_reference(temperature, top_k, top_p):
    logits = torch.randn(6, 37) * 3
    probs = sampling_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(
        probs.double(), reference_probs(logits, temperature, top_k, top_p), atol=PROB_ATOL, rtol=0
    )


@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
def test_filtered_logits_are_tempered_logits_or_minus_infinity(temperature, top_k, top_p):
    logits = torch.randn(4, 29) * 3
    z = filtered_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    kept = reference_probs(logits, temperature, top_k, top_p) > 0
    assert torch.equal(torch.isfinite(z), kept)
    torch.testing.assert_close(z[kept], logits[kept] / temperature)


@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
def test_logprobs_are_those_of_the_distribution_drawn_from(temperature, top_k, top_p):
    logits = torch.randn(64, 37) * 3
    tokens, logprobs = sample_with_logprobs(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    assert tokens.dtype == torch.long and logprobs.dtype == torch.float32
    expected = reference_logprobs(logits, tokens, temperature, top_k, top_p, greedy=False)
    assert torch.isfinite(expected).all(), "a filtered-out token was drawn"
    torch.testing.assert_close(logprobs.double(), expected, atol=LOGPROB_ATOL, rtol=0)


def test_greedy_is_argmax_with_its_untempered_logprob():
    logits = torch.randn(8, 50) * 3
    tokens, logprobs = sample_with_logprobs(logits, greedy=True, temperature=0.3, top_k=2)
    assert torch.equal(tokens, logits.argmax(-1))
    expected = reference_logprobs(logits, tokens, 1.0, 0, 1.0, greedy=True)
    torch.testing.assert_close(logprobs.double(), expected, atol=LOGPROB_ATOL, rtol=0)
    top1, _ = sample_with_logprobs(logits, top_k=1)
    assert torch.equal(top1, logits.argmax(-1))


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
        tokens, logprobs = sample_with_logprobs(logits, temperature=temperature)
        assert (tokens < 15).all() and torch.isfinite(logprobs).all()


def test_draws_follow_the_filtered_distribution():
    row = torch.randn(1, 12) * 2
    settings = {"temperature": 0.8, "top_k": 8, "top_p": 0.9}
    expected = reference_probs(row, **settings)[0]
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    draws, _ = sample_with_logprobs(row.expand(SAMPLES, -1), generator=gen, **settings)
    freq = torch.bincount(draws, minlength=12).double() / SAMPLES
    assert (freq[expected == 0] == 0).all(), "a filtered-out token was drawn"
    sigma = (expected * (1 - expected) / SAMPLES).sqrt()
    assert ((freq - expected).abs() <= FREQ_SIGMAS * sigma + 1e-12).all(), (freq, expected)


def test_same_generator_state_same_draws():
    logits = torch.randn(16, 30)
    seed = int(torch.randint(0, 2**31, ()))
    first = sample_with_logprobs(logits, top_p=0.9, generator=torch.Generator().manual_seed(seed))
    second = sample_with_logprobs(logits, top_p=0.9, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


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
        sample_with_logprobs(torch.randn(2, 5), **kwargs)


def test_bad_logits():
    with pytest.raises(ValueError, match="logits"):
        sample_with_logprobs(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="logits"):
        sampling_probs(torch.ones(2, 5, dtype=torch.long))


def test_draw_over_several_blocks_follows_the_distribution():
    probs = torch.rand(700) + 0.1  # 700: two full blocks and a padded third; ~28 draws per entry
    probs[torch.randperm(700)[:100]] = 0
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    draws = draw(probs.expand(SAMPLES, -1), generator=gen)
    expected = (probs / probs.sum()).double()
    freq = torch.bincount(draws, minlength=700).double() / SAMPLES
    assert (freq[expected == 0] == 0).all(), "an entry of 0 was drawn"
    sigma = (expected * (1 - expected) / SAMPLES).sqrt()
    assert ((freq - expected).abs() <= FREQ_SIGMAS * sigma + 1e-12).all()


def test_draw_gives_tiny_shares_their_intervals(monkeypatch):
    """A dominant entry and a tail of 2e-8 shares after it: uniforms aimed (in float64) at the middle of
    tail entries' intervals draw those entries. One float32 running sum steps by ~6e-8 near 1 and would
    give every such entry an empty interval."""
    vocab = 1000
    probs = torch.full((vocab,), 2e-8)
    probs[3] = 1.0 - 2e-8 * (vocab - 1)
    targets = torch.randperm(vocab - 300)[:50] + 300  # tail entries past the dominant one's block
    p = probs.double()
    block_mass = torch.nn.functional.pad(p, (0, 24)).view(-1, 256).sum(-1)
    uniforms = []
    for j in targets.tolist():
        k, offset = divmod(j, 256)
        before_block = float(block_mass[:k].sum())
        within = float(p[k * 256 : j].sum())
        uniforms.append(
            [
                (before_block + 0.5 * float(block_mass[k])) / float(block_mass.sum()),
                (within + 0.5 * float(p[j])) / float(block_mass[k]),
            ]
        )
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.tensor(uniforms, dtype=torch.float64))
    assert draw(probs.expand(len(targets), -1)).tolist() == targets.tolist()


def test_draw_edges(monkeypatch):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    one_hot = torch.zeros(5, 300)
    one_hot[torch.arange(5), torch.tensor([0, 299, 255, 256, 17])] = 0.25  # any positive scale
    assert draw(one_hot, generator=gen).tolist() == [0, 299, 255, 256, 17]
    assert draw(torch.tensor([[3.0]]), generator=gen).tolist() == [0]
    # uniforms at their largest: the target may round up to the sum; the last entry with weight is taken
    last = torch.zeros(2, 600)
    last[:, 10] = last[:, 400] = 1.0
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.full((2, 2), 1.0 - 2**-53, dtype=torch.float64))
    assert draw(last).tolist() == [400, 400]
