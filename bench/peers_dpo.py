"""Peers: one DPO step of aligner's recipe against TRL's `DPOTrainer`, same model, same data, CPU.

    make bench-peers                                  # installs the [peers] extra (TRL, accelerate), then this
    python bench/peers_dpo.py                         # both reference modes, micro-batches 16, 8 and 4
    python bench/peers_dpo.py --no-write --profile    # print a torch.profiler table of one step per run

Nothing is downloaded. The parent process builds, in a temporary folder:

- a random Llama (`LlamaForCausalLM`, hidden 256, 4 layers, 4 heads / 2 KV heads, FFN 688,
  V=32768, untied, fp32, seeded) saved as a Hugging Face checkpoint: TRL loads it (and a
  second copy as its reference model), aligner imports it with `model.hf_path`;
- a word-level tokenizer (one id per synthetic word, a chat template whose prompt is a
  token prefix of prompt + response), so both sides see the same token ids (checked);
- 16 preference pairs in TRL's conversational format, prompt + response <= 128 tokens:
  every step trains on these same 16 pairs.

Each side then runs in a fresh subprocess (2 torch threads): `trl.DPOTrainer` with its
reference model (gradient checkpointing on, TRL's default, and off), and
`aligner.recipes.dpo.run` with `dpo.reference` = `on_the_fly` (a reference forward every
step, like TRL) or `precompute` (aligner's default: one reference pass before training,
in the setup time, in no step), at several micro-batch sizes. A step's time is the wall
time from one optimizer step's end to the next's (torch's global optimizer hook on both
sides: batch, reference forward, forward/backward, optimizer, logging), the median over
the timed steps after warm-up; "in-step" is each trainer's own step timer (TRL:
`on_step_begin` -> `on_step_end`; aligner: `summary.history[i]["step_time_s"]`). Peak RSS
is the subprocess's `ru_maxrss`; "after imports" is its RSS once torch and the trainer's
library are imported, before any model exists. Each target is judged against TRL's better
run on its axis (time: the faster TRL run; memory: the smaller).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SEED = 1234
THREADS = 2
PAIRS_PER_STEP = 16
MAX_LENGTH = 128
ARCH = dict(
    vocab_size=32768,
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=688,
    tie_word_embeddings=False,
    max_position_embeddings=256,
)
SPECIAL = ["<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|system|>", "<|unk|>"]
NUM_WORDS = 32000 - len(SPECIAL)
# Each turn is "<|role|> words <|eos|>" after one <|bos|>: the prompt rendered with the generation
# prompt is a token prefix of prompt + response, as both trainers require.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|> ' + message['content'] + ' ' + eos_token + ' ' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)
PROMPT_WORDS, RESPONSE_WORDS = (24, 64), (20, 58)  # at most 5 + 64 + 58 = 127 tokens per sequence
TIME_TARGET, RSS_TARGET = 0.35, 0.30  # aligner / TRL


def rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def digest(sequences: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(sequences).encode()).hexdigest()[:12]


# ---------------------------------------------------------------- inputs (parent)


def write_tokenizer(folder: Path) -> str:
    """The word-level tokenizer (one id per synthetic word, CHAT_TEMPLATE) saved under `folder`; its path."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL)}
    vocab.update({f"w{i}": len(SPECIAL) + i for i in range(NUM_WORDS)})
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_level,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        unk_token="<|unk|>",
        extra_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"],
        chat_template=CHAT_TEMPLATE,
    )
    tokenizer.save_pretrained(str(folder / "tokenizer"))
    return str(folder / "tokenizer")


def write_model(folder: Path) -> str:
    """The random Llama of ARCH (seeded, fp32) saved as a Hugging Face checkpoint under `folder`; its path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    special_ids = {f"{name}_token_id": SPECIAL.index(f"<|{name}|>") for name in ("bos", "eos", "pad")}
    model = LlamaForCausalLM(LlamaConfig(**ARCH, **special_ids))
    model.save_pretrained(str(folder / "model"))
    return str(folder / "model")


def random_words(rng: random.Random, bounds: tuple[int, int]) -> str:
    """Between bounds[0] and bounds[1] synthetic words ("w123"), drawn from `rng`."""
    return " ".join(f"w{rng.randrange(NUM_WORDS)}" for _ in range(rng.randint(*bounds)))


def build_inputs(folder: Path) -> dict[str, str]:
    """The tokenizer, the 16 pairs and the random Llama, written under `folder`."""
    tokenizer = write_tokenizer(folder)
    rng = random.Random(SEED)
    with open(folder / "pairs.jsonl", "w") as out:
        for _ in range(PAIRS_PER_STEP):
            row = {
                "prompt": [{"role": "user", "content": random_words(rng, PROMPT_WORDS)}],
                "chosen": [{"role": "assistant", "content": random_words(rng, RESPONSE_WORDS)}],
                "rejected": [{"role": "assistant", "content": random_words(rng, RESPONSE_WORDS)}],
            }
            out.write(json.dumps(row) + "\n")
    return {"model": write_model(folder), "tokenizer": tokenizer, "data": str(folder / "pairs.jsonl")}


# ---------------------------------------------------------------- workers (subprocesses)


class StepClock:
    """Wall-clock ends of the optimizer steps of this process, from torch's global optimizer hook.

    Both trainers end a step with a torch optimizer's `step()` (TRL: through accelerate; aligner: megatron's
    optimizer wraps `torch.optim.AdamW` on the CPU), so one public hook times both sides the same way,
    whatever the trainers' internals. With `profile`, torch.profiler records the step after the warm-up.
    """

    def __init__(self, warmup: int, profile: bool) -> None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.ends: list[float] = []
        self.warmup, self.profile, self.profiler, self.table = warmup, profile, None, None
        register_optimizer_step_post_hook(self._on_step)

    def _on_step(self, *_) -> None:
        import torch

        self.ends.append(time.perf_counter())
        if not self.profile:
            return
        if len(self.ends) == self.warmup:
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.profiler.start()
        elif self.profiler is not None and self.table is None:
            self.profiler.stop()
            averages = self.profiler.key_averages()
            self.table = averages.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60)

    def steps(self, in_step: list[float]) -> tuple[float, list[float]]:
        """(when the first step started: its end minus its in-step time, each step's wall time).

        A step's wall time runs from the previous step's end to its own: the batch, the reference
        forward, forward/backward, optimizer and logging, wherever each trainer does them.
        """
        steps = [b - a for a, b in zip(self.ends, self.ends[1:], strict=False)]
        return self.ends[0] - in_step[0], [in_step[0], *steps]


def in_step_callback():
    """A TRL ``TrainerCallback`` that records the wall time of every step's begin and end (``begins``, ``ends``)."""
    from transformers import TrainerCallback

    class InStep(TrainerCallback):
        def __init__(self) -> None:
            self.begins, self.ends = [], []

        def on_step_begin(self, *_, **__):
            self.begins.append(time.perf_counter())

        def on_step_end(self, *_, **__):
            self.ends.append(time.perf_counter())

    return InStep()


def run_trl(args, inputs: dict[str, str]) -> dict:
    import torch

    torch.set_num_threads(THREADS)
    import datasets
    import trl
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    after_imports = rss_kib()
    clock = StepClock(args.warmup, args.profile)

    steps = args.warmup + args.steps
    config = DPOConfig(
        output_dir=str(Path(args.workdir) / "trl"),
        per_device_train_batch_size=PAIRS_PER_STEP,
        gradient_accumulation_steps=1,
        max_length=MAX_LENGTH,
        precompute_ref_log_probs=False,
        gradient_checkpointing=args.checkpointing,
        model_init_kwargs={"dtype": "float32"},
        use_cpu=True,
        bf16=False,
        max_steps=steps,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=SEED,
    )
    rows = [json.loads(line) for line in Path(inputs["data"]).read_text().splitlines()]
    in_step = in_step_callback()
    start = time.perf_counter()
    trainer = DPOTrainer(
        model=inputs["model"],  # a path: TRL loads the policy, and the reference model as a second copy
        args=config,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(inputs["tokenizer"]),
        callbacks=[in_step],
    )
    sequences = [r["prompt_ids"] + r[k] for r in trainer.train_dataset for k in ("chosen_ids", "rejected_ids")]
    trainer.train()
    in_step_s = [end - begin for begin, end in zip(in_step.begins, in_step.ends, strict=True)]
    first_step, step_s = clock.steps(in_step_s)
    return {
        "side": f"TRL {trl.__version__} DPOTrainer",
        "reference": "on the fly (2nd model copy)",
        "micro_batch": PAIRS_PER_STEP,
        "note": f"gradient_checkpointing={args.checkpointing}" + (" (TRL's default)" if args.checkpointing else ""),
        "setup_s": first_step - start,
        "step_s": step_s,
        "in_step_s": in_step_s,
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "rss_after_imports_kib": after_imports,
        "peak_rss_kib": rss_kib(),
        "tokens": digest(sequences),
        "tokens_per_pair": sum(map(len, sequences)) / len(rows),
        "profile": clock.table,
    }


def run_aligner(args, inputs: dict[str, str]) -> dict:
    import torch

    torch.set_num_threads(THREADS)
    import aligner.recipes.dpo as recipe
    from aligner.config import load_config
    from aligner.data import encode_records, load_tokenizer, read_records

    after_imports = rss_kib()
    clock = StepClock(args.warmup, args.profile)
    examples, _ = encode_records(
        read_records(inputs["data"], "preference"), load_tokenizer(inputs["tokenizer"]), max_length=MAX_LENGTH
    )
    sequences = [seq.input_ids for e in examples for seq in (e.chosen, e.rejected)]

    steps = args.warmup + args.steps
    overrides = [
        f"model.hf_path={inputs['model']}",
        f"data.train={inputs['data']}",
        f"data.tokenizer={inputs['tokenizer']}",
        f"data.max_length={MAX_LENGTH}",
        f"trainer.global_batch_size={PAIRS_PER_STEP}",
        f"trainer.micro_batch_size={args.micro_batch}",
        f"trainer.max_steps={steps}",
        f"trainer.max_epochs={steps}",  # the 16 pairs are one epoch: one step
        f"trainer.seed={SEED}",
        "optim.lr=1e-6",  # TRL's default
        f"dpo.reference={args.reference}",
        "logging.progress_bar=false",
        "logging.tensorboard_dir=null",
        "checkpoint.dir=null",
    ]
    start = time.perf_counter()
    history = recipe.run(load_config(recipe.DPORunConfig, None, overrides)).summary.history
    in_step_s = [h["step_time_s"] for h in history]
    first_step, step_s = clock.steps(in_step_s)
    return {
        "side": "aligner dpo recipe",
        "reference": args.reference,
        "micro_batch": args.micro_batch,
        "setup_s": first_step - start,
        "step_s": step_s,
        "in_step_s": in_step_s,
        "losses": [h["loss"] for h in history],
        "rss_after_imports_kib": after_imports,
        "peak_rss_kib": rss_kib(),
        "tokens": digest(sequences),
        "tokens_per_pair": sum(map(len, sequences)) / len(examples),
        "profile": clock.table,
    }


# ---------------------------------------------------------------- parent: run, compare, report


def worker_env() -> dict[str, str]:
    """The environment of a worker subprocess: THREADS threads, no GPU, nothing fetched, no trackers."""
    return {
        **os.environ,
        "OMP_NUM_THREADS": str(THREADS),
        "MKL_NUM_THREADS": str(THREADS),
        "CUDA_VISIBLE_DEVICES": "",  # a CPU comparison, also on a machine with a GPU
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "WANDB_DISABLED": "true",
    }


def run_worker(args, inputs: dict[str, str], *extra: str, script: str = __file__) -> dict:
    """Run ``script`` (this file, or another peers bench) as a worker subprocess; its ``RESULT`` line, parsed."""
    env = worker_env()
    command = [sys.executable, script, "--inputs", json.dumps(inputs), "--workdir", args.workdir]
    command += ["--warmup", str(args.warmup), "--steps", str(args.steps), *extra]
    command += ["--profile"] * args.profile
    print("running", " ".join(extra), file=sys.stderr, flush=True)
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        sys.stderr.write(done.stdout[-5000:] + done.stderr[-5000:])
        raise RuntimeError(f"worker {' '.join(extra)} failed (exit {done.returncode})")
    return json.loads(lines[-1][len("RESULT ") :])


def median_iqr(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}"
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return f"{statistics.median(values):.3f} (IQR {q3 - q1:.3f})"


def report(results: list[dict], warmup: int) -> str:
    """Markdown: one row per run, then the targets, each judged against TRL's better run on its axis."""
    import harness

    def step(r: dict) -> float:
        return statistics.median(r["step_s"][warmup:])

    def increase(r: dict) -> int:
        return r["peak_rss_kib"] - r["rss_after_imports_kib"]

    trls = [r for r in results if r["side"].startswith("TRL")]
    fastest, smallest = min(trls, key=step), min(trls, key=lambda r: r["peak_rss_kib"])
    rows, targets = [], []
    for r in results:
        time_ratio, rss_ratio = step(r) / step(fastest), r["peak_rss_kib"] / smallest["peak_rss_kib"]
        rows.append(
            (
                r["side"],
                r["reference"],
                str(r["micro_batch"]),
                median_iqr(r["step_s"][warmup:]),
                f"{statistics.median(r['in_step_s'][warmup:]):.3f}",
                harness.format_bytes(r["peak_rss_kib"] * 1024),
                harness.format_bytes(r["rss_after_imports_kib"] * 1024),
                harness.format_bytes(increase(r) * 1024),
                f"{time_ratio:.2f}x",
                f"{rss_ratio:.2f}x ({increase(r) / increase(smallest):.2f}x)",
                f"{r['tokens_per_pair']:.1f}",
                f"{r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}",
                f"{r['setup_s']:.1f}",
                r.get("note", ""),
            )
        )
        if r not in trls:
            name = f"{r['reference']}, micro-batch {r['micro_batch']}"
            for text, ratio, bound in (
                (f"step time <= {TIME_TARGET}x TRL's ({fastest['note']})", time_ratio, TIME_TARGET),
                (f"peak RSS <= {RSS_TARGET}x TRL's ({smallest['note']})", rss_ratio, RSS_TARGET),
            ):
                targets.append((name, text, f"{ratio:.2f}x", "met" if ratio <= bound else "MISSED"))
    header = (
        "side",
        "reference",
        "micro-batch",
        "step s, median",
        "in-step s",
        "peak RSS",
        "RSS after imports",
        "RSS increase",
        "step vs TRL's fastest",
        "peak RSS vs TRL's smallest (increase vs its)",
        "tokens/pair",
        "loss first -> last",
        "setup s",
        "note",
    )
    same = "the same" if len({r["tokens"] for r in results}) == 1 else "NOT the same"
    parts = [
        f"{len(results[0]['step_s']) - warmup} timed steps after {warmup} warm-up steps, each on the same "
        f"{PAIRS_PER_STEP} pairs; both sides see {same} token ids (digest {results[0]['tokens']}). "
        "`step` = from one optimizer step's end to the next's (torch's global optimizer hook, both sides); "
        "`in-step` = the trainer's own timer (TRL: on_step_begin -> on_step_end; aligner: step_time_s); "
        "`setup` = from building the trainer (TRL) / calling `run` (aligner) to the start of step 1's in-step "
        "timer: model loading, tokenization and one reference forward over the 16 pairs (`precompute`: its "
        "one-time pass, in no step; `on_the_fly`: step 1's, which aligner runs before its step timer, so "
        "`step` - `in-step` is the reference forward). Peak RSS = the subprocess's ru_maxrss; in "
        "parentheses the ratio of the increases over the RSS after imports.",
        harness.markdown_table(header, rows),
        "### Targets\n\n" + harness.markdown_table(("aligner run", "target", "measured", "verdict"), targets),
    ]
    for reference in dict.fromkeys(r["reference"] for r in results if r not in trls):
        runs = [r for r in results if r["reference"] == reference and r not in trls]
        fitting = [r for r in runs if r["peak_rss_kib"] <= RSS_TARGET * smallest["peak_rss_kib"]]
        best = min(fitting or runs, key=step if fitting else lambda r: r["peak_rss_kib"])
        verdict = "time target " + ("met" if step(best) <= TIME_TARGET * step(fastest) else "MISSED")
        what = "fastest run within the memory target" if fitting else "no run within the memory target; the smallest"
        parts.append(
            f"`{reference}`: {what}: micro-batch {best['micro_batch']}, step {step(best):.3f} s "
            f"({step(best) / step(fastest):.2f}x TRL's), peak RSS {harness.format_bytes(best['peak_rss_kib'] * 1024)} "
            f"({best['peak_rss_kib'] / smallest['peak_rss_kib']:.2f}x TRL's); {verdict}."
        )
    profiles = [f"{r['side']}, {r['reference']}, micro-batch {r['micro_batch']}" for r in results if r["profile"]]
    if profiles:
        parts.append("Profiles (one step, by self CPU time) printed above for: " + "; ".join(profiles))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--micro-batch-sizes", default="16,8,4", help="aligner's trainer.micro_batch_size values")
    parser.add_argument("--references", default="on_the_fly,precompute", help="aligner's dpo.reference values")
    parser.add_argument(
        "--trl-gradient-checkpointing",
        choices=("both", "on", "off"),
        default="both",
        help="TRL's DPOConfig.gradient_checkpointing (TRL's default: on; aligner recomputes nothing): "
        "'both' runs TRL twice and judges each target against TRL's better run on that axis",
    )
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of one step per run")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    parser.add_argument("--worker", choices=("trl", "aligner"), help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--reference", help=argparse.SUPPRESS)
    parser.add_argument("--micro-batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        result = (run_trl if args.worker == "trl" else run_aligner)(args, json.loads(args.inputs))
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    import harness
    import torch

    torch.set_num_threads(THREADS)
    started = time.perf_counter()
    busy_before, own_before = harness.busy_cpu_seconds(), time.process_time()
    with tempfile.TemporaryDirectory(prefix="aligner-peers-") as folder:
        args.workdir = folder
        inputs = build_inputs(Path(folder))
        checkpointing = {"both": ("on", "off"), "on": ("on",), "off": ("off",)}[args.trl_gradient_checkpointing]
        results = [
            run_worker(args, inputs, "--worker", "trl", *["--checkpointing"] * (c == "on")) for c in checkpointing
        ]
        for reference in args.references.split(","):
            for micro_batch in args.micro_batch_sizes.split(","):
                extra = ("--worker", "aligner", "--reference", reference, "--micro-batch", micro_batch)
                results.append(run_worker(args, inputs, *extra))
    busy_after = harness.busy_cpu_seconds()

    for r in results:
        if r["profile"]:
            print(f"\n## profile: {r['side']}, {r['reference']}, micro-batch {r['micro_batch']}\n\n{r['profile']}")
    import accelerate
    import transformers
    import trl

    info = harness.provenance(torch.device("cpu"))
    info["torch"] += f", transformers {transformers.__version__}, trl {trl.__version__}"
    info["torch"] += f", accelerate {accelerate.__version__}"
    info["runtime"] = f"{time.perf_counter() - started:.0f} s"
    if busy_before is not None and busy_after is not None:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        own = time.process_time() - own_before + children.ru_utime + children.ru_stime
        info["CPU used by other processes during the run"] = f"{max(0.0, busy_after - busy_before - own):.0f} s"
    body = report(results, args.warmup)
    print("\n".join(f"{name}: {value}" for name, value in info.items()) + "\n\n" + body)
    if not args.no_write:
        harness.write_results(harness.RESULTS_PATH, "cpu-peers-dpo", "Peers: DPO step vs TRL", info, body)
        print(f"\nwrote {harness.RESULTS_PATH}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
