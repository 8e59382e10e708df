"""Greedy decoding throughput: aligner's torch engine against Hugging Face ``generate``, same weights, CPU.

    python bench/generation_speed.py                 # prints the tables; writes nothing
    python bench/generation_speed.py --repeats 5

The workload: 32 prompts of 8-24 random tokens, 64 new tokens each, greedy, batch of 32, on a
random Llama (hidden 256, 4 layers, 4 heads / 2 KV heads, SwiGLU FFN 688, V = 32768, float32),
``torch.set_num_threads(2)``. The weights are megatron-core's (``build_model``); Hugging Face's
``LlamaForCausalLM`` gets the same tensors through :func:`aligner.models.hf.megatron_to_hf`.
The output layer is drawn with std 0.5 (not 0.02) so that the next-token distributions are
peaked: with near-flat logits, argmax would be decided by float rounding and the two
implementations could not be held to identical tokens.

Two cases, both engines on the same prompts:

1. no eos: every row runs the full 64 tokens; the two must produce identical tokens.
2. early eos: an eos id is planted in the output layer (:func:`plant_early_eos`) so that 3/4 of
   the rows draw it within 8 tokens and the rest run on. Both implementations stop each row at
   its first eos; the torch engine also drops it from the batch, Hugging Face keeps it (padding)
   until every row has stopped. Tokens must again be identical, and the engine's time should
   fall with the work left (its ``decode_rows``: row-steps computed).

Timing: one untimed warm-up run per implementation and case, then ``--repeats`` runs
alternating between the two implementations (so drifting machine load hits both alike); the
table gives the median and the range. Tokens/s counts response tokens actually generated (up to
and including eos), the same count for both. A mismatch in tokens fails the run (exit status 1).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

BATCH, PROMPT_LENGTHS, NEW_TOKENS, SEED, PAD = 32, (8, 24), 64, 1234, 0
ARCH = dict(
    num_layers=4,
    hidden_size=256,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=688,
    vocab_size=32768,
    max_position_embeddings=256,
)
OUTPUT_STD = 0.5
EARLY_STEPS, EARLY_FRACTION = 8, 0.75  # case 2: this fraction of the rows stops within this many tokens


def build(seed: int):
    """(megatron model, Hugging Face model with the same weights, prompts)."""
    from transformers import LlamaForCausalLM

    from aligner.models.config import ModelConfig
    from aligner.models.gpt import build_model
    from aligner.models.hf import config_to_hf, megatron_to_hf
    from aligner.models.sharding import gather_full_state_dict
    from aligner.parallel import initialize

    initialize(seed=seed)
    config = ModelConfig(**ARCH)
    model = build_model(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.output_layer.weight.normal_(0.0, OUTPUT_STD, generator=gen)
    hf = LlamaForCausalLM(config_to_hf(config, bos_token_id=None, eos_token_id=None, pad_token_id=PAD)).eval()
    hf.load_state_dict(megatron_to_hf(gather_full_state_dict(model), config))
    hf.generation_config.eos_token_id = None
    lengths = torch.randint(PROMPT_LENGTHS[0], PROMPT_LENGTHS[1] + 1, (BATCH,), generator=gen).tolist()
    prompts = [torch.randint(1, ARCH["vocab_size"], (n,), generator=gen).tolist() for n in lengths]
    return model, hf, prompts


def run_engine(engine, prompts: list[list[int]]) -> tuple[float, list[list[int]], float]:
    """(seconds, responses, decode row-steps)."""
    from aligner.generation.base import SamplingParams

    start = time.perf_counter()
    out = engine.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS, greedy=True))
    seconds = time.perf_counter() - start
    responses = [out.tokens[b, int(out.prompt_lengths[b]) : int(out.lengths[b])].tolist() for b in range(len(prompts))]
    return seconds, responses, out.metrics["decode_rows"]


def run_hf(hf, prompts: list[list[int]], eos: int | None) -> tuple[float, list[list[int]], float]:
    """(seconds, responses cut after their first eos, decode row-steps)."""
    longest = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), longest), PAD, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for b, prompt in enumerate(prompts):  # left padding: what decoder-only generate expects
        input_ids[b, longest - len(prompt) :] = torch.tensor(prompt)
        attention_mask[b, longest - len(prompt) :] = 1
    start = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=PAD,
        )
    seconds = time.perf_counter() - start
    responses = []
    for row in out[:, longest:].tolist():
        if eos is not None and eos in row:
            row = row[: row.index(eos) + 1]
        responses.append(row)
    steps = out.shape[1] - longest - 1  # forwards after the prefill, each over the whole batch
    return seconds, responses, float(steps * len(prompts))


@torch.no_grad()
def plant_early_eos(model, hf, engine, prompts: list[list[int]]) -> int:
    """Make a token an eos that greedy decoding reaches within EARLY_STEPS tokens in EARLY_FRACTION of the rows.

    The token is one that no greedy response of the unchanged model contains; its output row becomes
    ``scale * u``, ``u`` the unit mean of the final hidden states of those responses. Its logit at a step
    is then ``scale * (u . h)``, and until it wins a step every token, hence every hidden state, is what it
    was: row b stops at the first step where ``scale * (u . h) > max logit``, which the recorded states
    give for any scale. The scale lies between two rows' thresholds (a geometric mean), so no row is
    decided by a near-tie that float rounding in the other implementation could flip.
    """
    hidden, best = [], []

    def record(module, args, output):
        hidden.append(args[0][-1].float())  # [batch, hidden]: no stops, so every forward holds every row
        best.append(output[0][-1, :, : ARCH["vocab_size"]].float().max(dim=-1).values)

    handle = model.output_layer.register_forward_hook(record)
    _, responses, _ = run_engine(engine, prompts)
    handle.remove()
    states, top = torch.stack(hidden, dim=1), torch.stack(best, dim=1)  # [B, T, hidden], [B, T]
    direction = states.mean(dim=(0, 1))
    direction /= direction.norm()
    along = (states @ direction)[:, :EARLY_STEPS]
    needed = torch.where(along > 0, top[:, :EARLY_STEPS] / along, torch.inf).min(dim=1).values.sort().values
    k = round(EARLY_FRACTION * len(prompts))
    scale = float((needed[k - 1] * needed[k]).sqrt())
    used = {token for response in responses for token in response}
    eos = min(set(range(1, ARCH["vocab_size"])) - used)
    model.output_layer.weight[eos] = scale * direction
    hf.lm_head.weight[eos] = scale * direction
    return eos


def measure(label: str, engine, hf, prompts, eos: int | None, repeats: int) -> dict:
    run_engine(engine, prompts)  # warm-up
    run_hf(hf, prompts, eos)
    times = {"engine": [], "hf": []}
    for _ in range(repeats):
        seconds, ours, our_rows = run_engine(engine, prompts)
        times["engine"].append(seconds)
        seconds, theirs, their_rows = run_hf(hf, prompts, eos)
        times["hf"].append(seconds)
    tokens = sum(len(r) for r in ours)
    return {
        "label": label,
        "times": times,
        "tokens": tokens,
        "rows": {"engine": our_rows, "hf": their_rows},
        "identical": ours == theirs,
        "mismatched_rows": [b for b, (a, c) in enumerate(zip(ours, theirs, strict=True)) if a != c],
        "lengths": [len(r) for r in ours],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(harness.NUM_THREADS)

    from aligner.generation.torch_engine import TorchEngine

    busy_before, own_before = harness.busy_cpu_seconds(), time.process_time()
    model, hf, prompts = build(SEED)
    no_eos = TorchEngine(model, eos_token_id=[], pad_token_id=PAD)
    results = [measure("no eos", no_eos, hf, prompts, None, args.repeats)]
    eos = plant_early_eos(model, hf, no_eos, prompts)
    with_eos = TorchEngine(model, eos_token_id=eos, pad_token_id=PAD)
    results.append(measure(f"early eos (id {eos})", with_eos, hf, prompts, eos, args.repeats))

    body = []
    for result in results:
        hf_median = statistics.median(result["times"]["hf"])
        for impl, name in (("hf", "transformers generate"), ("engine", "aligner TorchEngine")):
            times = result["times"][impl]
            median = statistics.median(times)
            body.append(
                [
                    result["label"] if impl == "hf" else "",
                    name,
                    f"{median:.3f}",
                    f"{min(times):.3f}–{max(times):.3f}",
                    str(result["tokens"]),
                    f"{result['tokens'] / median:.0f}",
                    f"{result['rows'][impl]:.0f}",
                    f"{hf_median / median:.2f}x",
                ]
            )
    header = ["case", "impl", "median s", "min–max s", "response tokens", "tokens/s", "decode row-steps", "vs HF"]
    print(f"# Greedy generation, {BATCH} prompts of {PROMPT_LENGTHS[0]}-{PROMPT_LENGTHS[1]} tokens, {NEW_TOKENS} new")
    for key, value in harness.provenance(torch.device("cpu")).items():
        print(f"- {key}: `{value}`")
    busy_after = harness.busy_cpu_seconds()
    if busy_before is not None and busy_after is not None:
        others = busy_after - busy_before - (time.process_time() - own_before)
        print(f"- CPU used by other processes during the run: `{others:.0f} s` (noisy timings if not ~0)")
    print()
    print(harness.markdown_table(header, body))
    print()
    full, early = results
    engine_full, engine_early = (statistics.median(r["times"]["engine"]) for r in results)
    ended = sum(length < NEW_TOKENS for length in early["lengths"])
    print(
        f"early eos: {ended}/{BATCH} rows stop before {NEW_TOKENS} tokens (median response "
        f"{statistics.median(early['lengths']):.0f}); the engine computes "
        f"{early['rows']['engine'] / full['rows']['engine']:.0%} of the no-eos row-steps in "
        f"{engine_early / engine_full:.0%} of its no-eos time"
    )
    ok = True
    for result in results:
        if not result["identical"]:
            ok = False
            print(f"MISMATCH ({result['label']}): rows {result['mismatched_rows']} differ from transformers")
    print("greedy tokens identical to transformers in both cases" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
