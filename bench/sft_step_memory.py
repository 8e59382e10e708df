"""One SFT training step with the fused LM head against the same step with materialized logits, CPU.

    python bench/sft_step_memory.py                                  # full size (`make bench`); writes RESULTS.md
    python bench/sft_step_memory.py --no-write                       # print only
    ALIGNER_BENCH_QUICK=1 python bench/sft_step_memory.py            # seconds, small shape; never writes

The issue's target: the peak memory of one SFT step at a realistic shape is at most 25% of the
same step with the ``[batch, seq, vocab]`` logits materialized, with the same loss and gradients.

The shape (full size): a Llama-like decoder scaled for a 2-core CPU in its body (hidden 256, 2
layers, 4 heads / 2 KV heads, SwiGLU FFN 688, RoPE, RMSNorm, untied embeddings so the output
weight is its own parameter) but with Llama-3's vocabulary, V = 128256, and 4096 tokens per
micro-batch (4 rows x 1024; one micro-batch per step, so the global batch is the micro-batch),
float32. 4 x 1024 rather than 2 x 2048: megatron's local (CPU) attention materializes the
``[heads, seq, seq]`` scores that flash attention on a GPU never holds, so shorter rows keep that
CPU-only cost from standing in for the model body. Each row has a prompt part (labels -100) and
right padding (ids 0, labels -100), drawn from a seeded generator; both variants get the same batch.

The two variants differ only in the ``forward_step`` handed to
:func:`aligner.trainers.step.train_step`:

- fused: :func:`aligner.recipes.sft.forward_step`, the recipe's own: ``lm_hidden_states`` then
  ``lm_token_logprobs`` (the chunked fused head, :func:`aligner.ops.linear_token_logprobs`);
- materialized: the code the recipes used before it (:func:`materialized_forward_step`):
  ``logits = model(input_ids, None, None)``, then ``sequence_logprobs`` and ``sft_loss``.

Each variant runs in its own fresh subprocess (2 torch threads, no GPU visible), so its memory
is its own: ``initialize`` (a gloo world of one), the same seed, ``build_model``,
``build_train_state`` (megatron DDP, Adam, no gradient clipping so that the compared gradients
are the raw ones), then two steps on the same batch:

- step 1 is the warm-up: Adam allocates its two moment buffers (2 x the parameters) inside the
  first ``optimizer.step``, and the first call of each kernel faults in its code pages and
  thread-pool state. Both variants would pay these once per run, the same amount;
- step 2 is measured: the steady-state step of a training run, on top of a resident train state
  (weights, gradient buffer, Adam moments) that is the same in both variants. The target is
  judged on step 2; step 1's numbers are printed too.

Peak step memory = (peak RSS during the step) - (RSS right before it), in the subprocess: before
the step, ``gc.collect()`` and glibc's ``malloc_trim(0)`` return freed heap pages to the kernel
(so that memory freed by earlier work and reused by the step is not hidden in "before"), then
writing ``5`` to ``/proc/self/clear_refs`` resets the kernel's RSS high-water mark ``VmHWM`` of
``/proc/self/status`` to the current RSS; after the step ``VmHWM`` is the highest RSS of the
process at any instant since the reset. The kernel updates it before every unmap and
``madvise(DONTNEED)``, so no transient peak is missed and nothing is sampled: it is page-exact,
and counts all memory the step touches (tensors, allocator slack, non-tensor buffers of megatron
and gloo), not only tensors. ``ru_maxrss`` cannot be reset, and a polling thread can miss peaks
shorter than its period.

Same loss and gradients: the parent checks that both subprocesses built bitwise identical initial
weights (SHA-256 over every parameter), then compares the losses and gradient norms of both steps
(relative difference <= LOSS_RTOL), and each parameter's gradient of step 1 (same weights: the
cleanest comparison), of step 2, and its update over the two steps (relative L2 error <=
GRAD_RTOL). Float32 throughout; the only differences are summation orders (the fused head sums the
weight gradient chunk by chunk), hence tolerances well above float32 rounding and far below any
real disagreement. A disagreement fails the run (exit status 1).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import hashlib
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUICK = os.environ.get("ALIGNER_BENCH_QUICK") == "1"
THREADS = int(os.environ.get("ALIGNER_BENCH_THREADS", "2"))
SEED = 1234
MEMORY_TARGET = 0.25  # fused peak step memory / materialized
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4
SECTION_KEY = "cpu-sft-step-memory"
SECTION_TITLE = "SFT step: fused LM head vs materialized logits (CPU)"
VARIANTS = ("materialized", "fused")

if QUICK:
    ARCH = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=172)
    VOCAB, ROWS, SEQ = 16384, 2, 256
else:
    ARCH = dict(num_layers=2, hidden_size=256, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=688)
    VOCAB, ROWS, SEQ = 128256, 4, 1024
PAD_ID = 0
IGNORE_INDEX = -100


# ---------------------------------------------------------------- inputs


def model_config():
    from aligner.models.config import ModelConfig

    return ModelConfig(
        **ARCH,
        vocab_size=VOCAB,
        max_position_embeddings=SEQ,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        params_dtype="float32",
    )


def make_batch() -> dict:
    """ROWS right-padded rows of SEQ ids: a prompt (labels -100), a response (labels = next id), padding."""
    import torch

    generator = torch.Generator().manual_seed(SEED)
    input_ids = torch.full((ROWS, SEQ), PAD_ID, dtype=torch.long)
    labels = torch.full((ROWS, SEQ), IGNORE_INDEX, dtype=torch.long)
    lengths = torch.empty(ROWS, dtype=torch.long)
    for row in range(ROWS):
        # the first row fills the sequence, the others are 55-100% of it; prompts are 10-45% of a row
        length = SEQ if row == 0 else int(torch.randint(SEQ * 55 // 100, SEQ + 1, (), generator=generator))
        prompt = max(1, int(length * float(torch.empty(()).uniform_(0.10, 0.45, generator=generator))))
        input_ids[row, :length] = torch.randint(1, VOCAB, (length,), generator=generator)
        labels[row, prompt - 1 : length - 1] = input_ids[row, prompt:length]
        lengths[row] = length
    return {"input_ids": input_ids, "labels": labels, "lengths": lengths}


def materialized_forward_step(batch, model):
    """The baseline: the full ``[B, S, V]`` logits, then log-softmax/gather and the SFT loss."""
    from aligner.algorithms.logprobs import sequence_logprobs
    from aligner.algorithms.sft import sft_loss

    logits = model(batch["input_ids"], None, None)
    vocab_size = model.module.aligner_config.vocab_size

    def loss_func(logits):
        token_logps, _, _ = sequence_logprobs(logits, batch["labels"], vocab_size=vocab_size, tp_group=None)
        nll, metrics = sft_loss(token_logps, batch["labels"] != IGNORE_INDEX)
        return nll.sum(), metrics["num_tokens"], {}

    return logits, loss_func


# ---------------------------------------------------------------- memory probe (Linux /proc)

_STATUS_FIELD = re.compile(r"^(VmRSS|VmHWM):\s+(\d+) kB$", re.MULTILINE)


def rss_and_peak_kib() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in KiB."""
    fields = dict(_STATUS_FIELD.findall(Path("/proc/self/status").read_text()))
    return int(fields["VmRSS"]), int(fields["VmHWM"])


def reset_peak() -> int:
    """Return freed heap to the kernel, reset the RSS high-water mark; the RSS (KiB) it now starts from."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    rss, peak = rss_and_peak_kib()
    if peak > rss + 1024:  # a kernel that ignores "5" leaves the old high-water mark
        raise RuntimeError(f"/proc/self/clear_refs did not reset VmHWM ({peak} KiB, VmRSS {rss} KiB)")
    return rss


# ---------------------------------------------------------------- worker (one subprocess per variant)


def parameter_digest(model) -> str:
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().contiguous().numpy())
    return digest.hexdigest()[:16]


def run_worker(variant: str, out: Path) -> dict:
    import torch

    torch.set_num_threads(THREADS)
    from aligner.config import OptimConfig
    from aligner.models.gpt import build_model
    from aligner.ops.linear import default_chunk_size
    from aligner.parallel import initialize
    from aligner.recipes.sft import forward_step as fused_forward_step
    from aligner.trainers.state import build_train_state
    from aligner.trainers.step import train_step

    forward_step = {"fused": fused_forward_step, "materialized": materialized_forward_step}[variant]
    initialize(tp=1, pp=1, seed=SEED)
    model = build_model(model_config())
    initial = {name: param.detach().clone() for name, param in model.named_parameters()}
    torch.save(initial, out / "initial.pt")
    del initial
    digest = parameter_digest(model)
    # No clipping: the gradients compared are the raw ones (clipping is an in-place scale either way).
    state = build_train_state(model, OptimConfig(lr=1e-4, clip_grad=0.0, warmup_steps=0), total_steps=10)
    batch = make_batch()

    steps = []
    for index in (1, 2):
        before = reset_peak()
        start = time.perf_counter()
        metrics = train_step(state, [batch], forward_step)
        elapsed = time.perf_counter() - start
        _, peak = rss_and_peak_kib()
        grads = {name: param.main_grad.detach().clone() for name, param in model.named_parameters()}
        torch.save(grads, out / f"grads{index}.pt")
        del grads
        steps.append(
            {
                "time_s": elapsed,
                "rss_before_kib": before,
                "peak_kib": peak,
                "step_kib": peak - before,
                "loss": metrics["loss"],
                "grad_norm": metrics["grad_norm"],
                "count": metrics["count"],
            }
        )
    initial = torch.load(out / "initial.pt", mmap=True)
    update = {name: param.detach() - initial[name] for name, param in model.named_parameters()}
    torch.save(update, out / "update.pt")
    numel = {name: param.numel() for name, param in model.named_parameters()}
    return {
        "variant": variant,
        "digest": digest,
        "steps": steps,
        "process_peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "parameters": sum(numel.values()),
        "output_parameters": numel["output_layer.weight"],
        "chunk_rows": default_chunk_size(VOCAB),
        "tokens": ROWS * SEQ,
    }


def spawn_worker(variant: str, out: Path) -> dict:
    out.mkdir()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(THREADS),
        "MKL_NUM_THREADS": str(THREADS),
        "CUDA_VISIBLE_DEVICES": "",  # a CPU measurement, also on a machine with a GPU
        "PYTHONWARNINGS": "ignore",
    }
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # a world of one, whatever launched us
    print(f"running {variant} ...", file=sys.stderr, flush=True)
    done = subprocess.run(
        [sys.executable, __file__, "--worker", variant, "--out", str(out)], env=env, capture_output=True, text=True
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        sys.stderr.write(done.stdout[-5000:] + done.stderr[-5000:])
        raise RuntimeError(f"the {variant} worker failed (exit {done.returncode})")
    return json.loads(lines[-1][len("RESULT ") :])


# ---------------------------------------------------------------- parent: compare and report


def relative_errors(folder: Path, name: str) -> tuple[float, str]:
    """Largest per-parameter ||fused - materialized|| / ||materialized|| of the saved tensors `name`."""
    import torch

    fused = torch.load(folder / "fused" / f"{name}.pt", mmap=True)
    reference = torch.load(folder / "materialized" / f"{name}.pt", mmap=True)
    if fused.keys() != reference.keys():
        raise RuntimeError(f"{name}: the variants have different parameters")
    worst, where = 0.0, ""
    for key, ref in reference.items():
        diff = (fused[key].double() - ref.double()).norm().item()
        scale = ref.double().norm().item()
        error = diff / scale if scale else (0.0 if diff == 0 else float("inf"))
        if error >= worst:
            worst, where = error, key
    return worst, where


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b) if b else abs(a - b)


def mib(kib: float) -> str:
    return f"{kib / 1024:,.0f} MiB"


def report(results: dict[str, dict], agreement: list[tuple[str, float, str, float]]) -> tuple[str, bool, float]:
    import harness

    fused, base = results["fused"], results["materialized"]
    ratio = fused["steps"][1]["step_kib"] / base["steps"][1]["step_kib"]
    ratio1 = fused["steps"][0]["step_kib"] / base["steps"][0]["step_kib"]
    tokens, params = base["tokens"], base["parameters"]
    logits_kib = tokens * VOCAB * 4 / 1024
    chunk_kib = min(base["chunk_rows"], tokens) * VOCAB * 4 / 1024
    body = ARCH | {"vocab_size": VOCAB}
    shape = (
        f"Llama-like decoder, fp32, untied embeddings: {', '.join(f'{k}={v}' for k, v in body.items())} "
        f"({params / 1e6:.1f} M parameters, of which the output layer {base['output_parameters'] / 1e6:.1f} M); "
        f"one micro-batch of {ROWS} x {SEQ} = {tokens} tokens per step "
        f"({base['steps'][0]['count']:.0f} trained; prompt and padding labels -100)"
    )
    rows = []
    for r in (base, fused):
        s1, s2 = r["steps"]
        rows.append(
            (
                r["variant"],
                mib(s2["step_kib"]),
                f"{s2['time_s']:.1f}",
                mib(s2["rss_before_kib"]),
                mib(s1["step_kib"]),
                f"{s1['time_s']:.1f}",
                mib(r["process_peak_kib"]),
                f"{s1['loss']:.6f} / {s2['loss']:.6f}",
                f"{s1['grad_norm']:.6g} / {s2['grad_norm']:.6g}",
            )
        )
    header = (
        "variant",
        "peak step memory (step 2)",
        "step 2 s",
        "RSS before step 2",
        "peak step memory (step 1, + Adam state)",
        "step 1 s",
        "process peak RSS",
        "loss step 1 / 2",
        "grad norm step 1 / 2",
    )
    judge = not QUICK
    met = ratio <= MEMORY_TARGET
    verdict = ("met" if met else "MISSED") if judge else harness.QUICK_VERDICT
    targets = [
        (
            f"peak step memory (step 2): fused <= {MEMORY_TARGET:.0%} of materialized",
            f"{ratio:.1%}",
            verdict,
        ),
        ("for reference, step 1 (Adam allocates its moments in it)", f"{ratio1:.1%}", "not judged"),
    ]
    agree_rows = [
        (what, f"{error:.2e}" + (f" ({where})" if where else ""), f"<= {tol:g}", "agree" if error <= tol else "DIFFER")
        for what, error, where, tol in agreement
    ]
    state_kib = params * 4 / 1024
    head_kib = base["output_parameters"] * 4 / 1024
    probs_kib = ARCH["num_layers"] * ROWS * ARCH["num_attention_heads"] * SEQ * SEQ * 4 / 1024
    parts = [
        f"- shape: {shape}",
        f"- [tokens x V] fp32 logits alone: {mib(logits_kib)}; one chunk of the fused head "
        f"({min(base['chunk_rows'], tokens)} rows x V, `default_chunk_size`): {mib(chunk_kib)}",
        f'- resident train state, the same in both (part of "RSS before"): weights {mib(state_kib)}, '
        f"gradient buffer {mib(state_kib)}, Adam moments {mib(2 * state_kib)} (allocated in step 1)",
        f"- tensors of the fused step's backward through the head (sizes, not measurements): the chunk's "
        f"recomputed logits and their gradient, {mib(chunk_kib)} each; the float32 weight-gradient accumulator "
        f"[V, H], {mib(head_kib)}; with the body's saved activations, of which megatron's local (CPU) attention "
        f"keeps the [rows, heads, seq, seq] fp32 probabilities, {mib(probs_kib)} over the layers (flash "
        "attention on a GPU keeps none): they grow with seq, and so does this ratio",
        "- peak step memory = peak RSS during the step - RSS right before it, in the variant's own "
        "subprocess (VmHWM after resetting it through /proc/self/clear_refs, after gc + malloc_trim); "
        "step 1 is the warm-up, step 2 the measured steady-state step; see the docstring of "
        "`bench/sft_step_memory.py`. Times are wall seconds of `train_step` on a shared machine (noisy).",
        harness.markdown_table(header, rows),
        "### Target\n\n" + harness.markdown_table(("target", "measured", "verdict"), targets),
        "### Same loss and gradients (fused vs materialized, float32)\n\n"
        + harness.markdown_table(("quantity", "largest relative error (where)", "tolerance", "verdict"), agree_rows),
    ]
    agreed = all(error <= tol for _, error, _, tol in agreement)
    return "\n\n".join(parts), agreed, ratio


def write_section(path: Path, info: dict[str, str], body: str) -> None:
    """Replace (or append) this bench's section of RESULTS.md; every other byte of the file stays as it is."""
    facts = "\n".join(f"- {name}: `{value}`" for name, value in info.items())
    section = f"<!-- BEGIN {SECTION_KEY} -->\n## {SECTION_TITLE}\n\n{facts}\n\n{body}\n<!-- END {SECTION_KEY} -->\n"
    text = path.read_text()  # read right before writing: other benches write their own sections
    pattern = re.compile(rf"<!-- BEGIN {re.escape(SECTION_KEY)} -->\n.*?<!-- END {re.escape(SECTION_KEY)} -->\n", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        result = run_worker(args.worker, Path(args.out))
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    import harness
    import torch

    torch.set_num_threads(THREADS)
    started = time.perf_counter()
    busy_before, own_before = harness.busy_cpu_seconds(), time.process_time()
    with tempfile.TemporaryDirectory(prefix="aligner-sft-memory-") as tmp:
        folder = Path(tmp)
        results = {variant: spawn_worker(variant, folder / variant) for variant in VARIANTS}
        if results["fused"]["digest"] != results["materialized"]["digest"]:
            raise RuntimeError("the two subprocesses built different initial weights; the comparison is void")
        fused, base = results["fused"]["steps"], results["materialized"]["steps"]
        agreement = []
        for index in (0, 1):
            agreement.append((f"loss, step {index + 1}", rel(fused[index]["loss"], base[index]["loss"]), "", LOSS_RTOL))
            agreement.append(
                (
                    f"grad norm, step {index + 1}",
                    rel(fused[index]["grad_norm"], base[index]["grad_norm"]),
                    "",
                    LOSS_RTOL,
                )
            )
        for name, what in (
            ("grads1", "gradient of each parameter, step 1 (same weights)"),
            ("grads2", "gradient of each parameter, step 2"),
            ("update", "update of each parameter over the 2 steps"),
        ):
            agreement.append((what, *relative_errors(folder, name), GRAD_RTOL))
    busy_after = harness.busy_cpu_seconds()

    info = harness.provenance(torch.device("cpu"))
    info["initial weights"] = f"identical in both subprocesses (SHA-256 {results['fused']['digest']})"
    info["runtime"] = f"{time.perf_counter() - started:.0f} s"
    if busy_before is not None and busy_after is not None:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        own = time.process_time() - own_before + children.ru_utime + children.ru_stime
        info["CPU used by other processes during the run"] = f"{max(0.0, busy_after - busy_before - own):.0f} s"
    body, agreed, _ = report(results, agreement)
    print("\n".join(f"{name}: {value}" for name, value in info.items()) + "\n\n" + body)
    if not (args.no_write or QUICK):
        write_section(harness.RESULTS_PATH, info, body)
        print(f"\nwrote the section {SECTION_KEY!r} of {harness.RESULTS_PATH}", file=sys.stderr)
    if not agreed:
        print("error: the fused and materialized steps disagree (see the table above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
