"""Greedy decoding throughput: aligner's torch engine against Hugging Face ``generate``, same weights, CPU.

    python bench/generation_speed.py                 # prints the tables, writes its section of bench/RESULTS.md
    python bench/generation_speed.py --repeats 7 --no-write

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
Hugging Face runs with aligner's CPU shim lifted (:func:`aligner.parallel.megatron_cpu.suspended`):
it needs none of it, and the shim's torch-function mode would slow it down; the engine runs as
aligner runs it.

Where the time goes: one more run of each implementation per case under ``torch.profiler``;
the table lists the ops with the most self CPU time (by input shapes), as a share of the run's
total self CPU time.
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
TARGET_SPEEDUP = 2.0  # engine tokens/s over transformers', in both cases
PROFILE_TOP = 6  # ops listed per implementation and case
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
    from aligner.parallel import megatron_cpu

    start = time.perf_counter()
    with torch.no_grad(), megatron_cpu.suspended():
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
def plant_early_eos(model, hf, prompts: list[list[int]]) -> int:
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
        # Hugging Face's head over [batch, positions, hidden]; the last position is each row's next token
        # (left padding, no stops: every forward holds every row)
        hidden.append(args[0][:, -1].float())
        best.append(output[:, -1, : ARCH["vocab_size"]].float().max(dim=-1).values)

    handle = hf.lm_head.register_forward_hook(record)
    _, responses, _ = run_hf(hf, prompts, None)
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


def profile_run(fn) -> dict:
    """Self CPU time of ``fn()`` by op and input shapes (``torch.profiler``).

    Returns ``top``: ``(op and input shapes, self CPU ms, calls, share of the run's self CPU time)`` of the
    PROFILE_TOP largest, and ``output_layer``: the share of the output layer (the matmuls against the
    ``[hidden, V]`` weight, or the engine's fused greedy head ``aligner::linear_argmax``).
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    events = prof.key_averages(group_by_input_shape=True)
    total = sum(event.self_cpu_time_total for event in events)
    heads = ([ARCH["hidden_size"], ARCH["vocab_size"]], [ARCH["vocab_size"], ARCH["hidden_size"]])  # W.T or W
    output_layer = sum(
        e.self_cpu_time_total
        for e in events
        if (e.key == "aten::mm" and any(head in e.input_shapes for head in heads)) or e.key == "aligner::linear_argmax"
    )
    top = sorted(events, key=lambda event: event.self_cpu_time_total, reverse=True)[:PROFILE_TOP]
    return {
        "top": [
            (f"{e.key} {e.input_shapes}", e.self_cpu_time_total / 1e3, e.count, e.self_cpu_time_total / total)
            for e in top
        ],
        "output_layer": output_layer / total,
    }


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
    profiles = {
        "engine": profile_run(lambda: run_engine(engine, prompts)),
        "hf": profile_run(lambda: run_hf(hf, prompts, eos)),
    }
    return {
        "profiles": profiles,
        "label": label,
        "times": times,
        "tokens": tokens,
        "rows": {"engine": our_rows, "hf": their_rows},
        "identical": ours == theirs,
        "mismatched_rows": [b for b, (a, c) in enumerate(zip(ours, theirs, strict=True)) if a != c],
        "lengths": [len(r) for r in ours],
    }


def report(results: list[dict]) -> tuple[str, bool]:
    """The markdown body (timing table, targets, profiles) and whether the tokens were identical."""
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
    lines = [harness.markdown_table(header, body), ""]

    full, early = results
    engine_full, engine_early = (statistics.median(r["times"]["engine"]) for r in results)
    ended = sum(length < NEW_TOKENS for length in early["lengths"])
    lines.append(
        f"early eos: {ended}/{BATCH} rows stop before {NEW_TOKENS} tokens (median response "
        f"{statistics.median(early['lengths']):.0f}); the engine computes "
        f"{early['rows']['engine'] / full['rows']['engine']:.0%} of the no-eos row-steps in "
        f"{engine_early / engine_full:.0%} of its no-eos time"
    )
    lines += ["", "### Targets", ""]
    targets = []
    identical = True
    for result in results:
        speedup = statistics.median(result["times"]["hf"]) / statistics.median(result["times"]["engine"])
        verdict = "met" if speedup >= TARGET_SPEEDUP else "MISSED"
        targets.append([result["label"], f"tokens/s >= {TARGET_SPEEDUP:g}x transformers'", f"{speedup:.2f}x", verdict])
        same = "identical" if result["identical"] else f"rows {result['mismatched_rows']} differ"
        targets.append(
            [
                result["label"],
                "greedy tokens identical to transformers'",
                same,
                "met" if result["identical"] else "MISSED",
            ]
        )
        identical = identical and result["identical"]
    lines.append(harness.markdown_table(["case", "target", "measured", "verdict"], targets))

    lines += ["", "### Where the time goes (torch.profiler, one run each)", ""]
    rows = []
    for result in results:
        for impl, name in (("hf", "transformers"), ("engine", "aligner")):
            for op, ms, calls, share in result["profiles"][impl]["top"]:
                rows.append([result["label"], name, f"`{op}`", f"{ms:.0f}", str(calls), f"{share:.0%}"])
    lines.append(harness.markdown_table(["case", "impl", "op [input shapes]", "self CPU ms", "calls", "share"], rows))
    shares = "; ".join(
        f"{r['label']}: aligner {r['profiles']['engine']['output_layer']:.0%}, "
        f"transformers {r['profiles']['hf']['output_layer']:.0%}"
        for r in results
    )
    lines += [
        "",
        f"The output layer (`aten::mm` against the [{ARCH['vocab_size']}, {ARCH['hidden_size']}] weight, all row "
        f"counts, or `aligner::linear_argmax`) as a share of self CPU time: {shares}. Hugging Face computes the "
        "logits as `x @ W.T` (`nn.Linear`), copies them and takes their argmax; the engine's greedy step is one "
        "fused `aligner::linear_argmax` (`aligner.ops.linear_greedy`: argmax and log-prob without the logits).",
    ]
    return "\n".join(lines), identical


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print the tables only; leave RESULTS.md alone")
    args = parser.parse_args()
    torch.set_num_threads(harness.NUM_THREADS)

    from aligner.generation.torch_engine import TorchEngine

    busy_before, own_before = harness.busy_cpu_seconds(), time.process_time()
    started = time.perf_counter()
    model, hf, prompts = build(SEED)
    no_eos = TorchEngine(model, eos_token_id=[], pad_token_id=PAD)
    results = [measure("no eos", no_eos, hf, prompts, None, args.repeats)]
    eos = plant_early_eos(model, hf, prompts)
    with_eos = TorchEngine(model, eos_token_id=eos, pad_token_id=PAD)
    results.append(measure(f"early eos (id {eos})", with_eos, hf, prompts, eos, args.repeats))

    import transformers

    info = harness.provenance(torch.device("cpu"))
    info["torch"] += f", transformers {transformers.__version__}"
    info["runtime"] = f"{time.perf_counter() - started:.0f} s"
    busy_after = harness.busy_cpu_seconds()
    if busy_before is not None and busy_after is not None:
        others = max(0.0, busy_after - busy_before - (time.process_time() - own_before))
        info["CPU used by other processes during the run"] = f"{others:.0f} s (noisy timings if not ~0)"
    body, identical = report(results)
    body = (
        f"Greedy decoding, {BATCH} prompts of {PROMPT_LENGTHS[0]}-{PROMPT_LENGTHS[1]} tokens, {NEW_TOKENS} new "
        f"tokens, batch {BATCH}, random Llama (hidden {ARCH['hidden_size']}, {ARCH['num_layers']} layers, "
        f"V = {ARCH['vocab_size']}, float32); {args.repeats} timed runs per implementation and case, "
        "alternating. See the docstring of `bench/generation_speed.py`.\n\n" + body
    )
    print("\n".join(f"- {name}: `{value}`" for name, value in info.items()))
    print()
    print(body)
    print("greedy tokens identical to transformers in both cases" if identical else "FAILED: tokens differ")
    if not args.no_write:
        title = "Generation engine: greedy decoding vs transformers (CPU)"
        harness.write_results(harness.RESULTS_PATH, "cpu-generation", title, info, body)
        print(f"\nwrote {harness.RESULTS_PATH}", file=sys.stderr)
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
