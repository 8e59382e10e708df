"""Peers: one GRPO step of aligner's recipe against TRL's `GRPOTrainer`, same model, same prompts, CPU.

    make bench-peers                                  # installs the [peers] extra (TRL, accelerate), then this
    python bench/peers_grpo.py                        # TRL 64 x 1 (checkpointing on, off) and 8 x 8, aligner
                                                      # at micro-batches 64, 16, 8; 2 alternating rounds
    python bench/peers_grpo.py --no-write --profile   # print a torch.profiler table of one step per run

Nothing is downloaded. The parent process builds, in a temporary folder, the inputs of
`bench/peers_dpo.py` (the same random Llama: hidden 256, 4 layers, 4 heads / 2 KV heads, FFN
688, V=32768, untied, fp32, seeded, saved once as a Hugging Face checkpoint that both sides
load; the same word-level tokenizer and chat template) and 8 prompts in TRL's conversational
format (24 to 64 words: 28 to 68 tokens with the template).

One GRPO step on both sides: the 8 prompts x 8 samples (temperature 1, no top-k / top-p),
exactly 64 new tokens each, scored by a cheap Python reward (the fraction of even-numbered words:
it spreads within every group), group advantages `(r - mean) / std`, no reference model
(beta = kl_coef = 0), and one optimizer update (AdamW, lr 1e-6, no weight decay, gradients
clipped at 1) over the 64 rollouts with the token-mean clipped loss (TRL's default
`loss_type="dapo"`: tokens of the whole accumulated batch; aligner's `grpo` variant:
`token-mean` over the mini-batch, here the whole batch).

- TRL 1.16 `GRPOTrainer`: `num_generations=8`, `per_device_train_batch_size` x
  `gradient_accumulation_steps` = 64, so one generation batch of 64 feeds one optimizer step
  (TRL then skips its old-policy log-prob pass: the ratio is taken against the detached
  log-probs of the same forward); `max_completion_length=64` with `min_new_tokens=64` (the eos
  logit is masked: every completion has exactly 64 tokens); `transformers` `generate` with its
  KV cache, no vLLM. Its first run is the issue's setting (all 64 rollouts in one batch, TRL's
  default gradient checkpointing: about 11 s and 5.7 GB on an idle machine, the issue says).
- aligner `aligner.recipes.grpo.run`: `generation.max_new_tokens=64` on the built-in torch
  engine (KV cache, batched prefill); `trainer.global_batch_size=64` (one update per step) at
  several `trainer.micro_batch_size`; with one update per rollout batch the recipe, like TRL,
  takes the old-policy log-probs from the update's own forward (no separate pass; its
  `time_logprobs_s` is then ~0). The recipe has
  no `min_new_tokens` / `ignore_eos` setting, so the worker builds its engine with no stop ids
  (it replaces `aligner.trainers.online.stop_token_ids`): every response has exactly 64 tokens
  (a drawn eos is an ordinary token there, where TRL masks it: p ~ 1/32768 per token for a
  random Llama). The report gives the response lengths each side drew.

Each run is a fresh subprocess (2 torch threads); TRL and aligner runs alternate, over
`--rounds` rounds. A step's time is the wall time from one optimizer step's end to the next's
(torch's global optimizer hook on both sides: generation, rewards, log-prob passes,
forward/backward, optimizer, logging), the median over every timed step of a setting's rounds
after each run's warm-up steps. Peak RSS is the subprocess's `ru_maxrss` (the largest of the
rounds); "after imports" its RSS once torch and the trainer's library are imported. The
phases: aligner's own timers (`time_generate_s`, `time_logprobs_s`, `time_train_s`); TRL's
generation is timed around its `_generate_single_turn`, the rest of its in-step time
(`on_step_begin` -> `on_step_end`) is the update. Each aligner run is judged against TRL's
first run (the issue's setting) and against TRL's better run on each axis (time: its fastest
run; memory: its smallest).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from peers_dpo import (
    ARCH,
    SEED,
    THREADS,
    StepClock,
    digest,
    in_step_callback,
    median_iqr,
    random_words,
    rss_kib,
    run_worker,
    write_model,
    write_tokenizer,
)

PROMPTS_PER_STEP = 8
GROUP_SIZE = 8
ROLLOUTS = PROMPTS_PER_STEP * GROUP_SIZE  # one optimizer step over all of them
NEW_TOKENS = 64
PROMPT_WORDS = (24, 64)  # 28 to 68 prompt tokens with the chat template
MAX_LENGTH = 160  # aligner's data.max_length: prompt + response tokens
LEARNING_RATE = 1e-6  # TRL's default
TIME_TARGET, RSS_TARGET = 0.5, 0.5  # aligner / TRL
ALIGNER_PHASES = ("generate", "score", "logprobs", "train", "refit")


# ---------------------------------------------------------------- the reward (both sides)


def even_word_fraction(text: str) -> float:
    """The fraction of the words ``w<i>`` of ``text`` whose ``i`` is even (0 for no word)."""
    words = text.split()
    return sum(word[1:].isdigit() and int(word[1:]) % 2 == 0 for word in words) / max(len(words), 1)


def aligner_reward(prompts: list, responses: list[str], extras: list) -> list[float]:
    """aligner's reward function signature: ``(prompts, responses, extras)``."""
    return [even_word_fraction(response) for response in responses]


def trl_reward(prompts: list, completions: list, **_) -> list[float]:
    """TRL's reward function signature: conversational completions, one assistant message each."""
    return [even_word_fraction(completion[0]["content"]) for completion in completions]


# ---------------------------------------------------------------- inputs (parent)


def build_inputs(folder: Path) -> dict[str, str]:
    """peers_dpo's tokenizer and random Llama, and the 8 prompts, written under `folder`."""
    rng = random.Random(SEED)
    with open(folder / "prompts.jsonl", "w") as out:
        for _ in range(PROMPTS_PER_STEP):
            out.write(json.dumps({"prompt": [{"role": "user", "content": random_words(rng, PROMPT_WORDS)}]}) + "\n")
    return {"model": write_model(folder), "tokenizer": write_tokenizer(folder), "data": str(folder / "prompts.jsonl")}


def read_prompts(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# ---------------------------------------------------------------- workers (subprocesses)


def run_trl(args, inputs: dict[str, str]) -> dict:
    import torch

    torch.set_num_threads(THREADS)
    import datasets
    import trl
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    after_imports = rss_kib()
    clock = StepClock(args.warmup, args.profile)

    steps = args.warmup + args.steps
    config = GRPOConfig(
        output_dir=str(Path(args.workdir) / "trl"),
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=ROLLOUTS // args.micro_batch,  # one generation batch of 64 per optimizer step
        num_generations=GROUP_SIZE,
        max_completion_length=NEW_TOKENS,
        generation_kwargs={"min_new_tokens": NEW_TOKENS},  # eos masked: every completion has 64 tokens
        temperature=1.0,
        beta=0.0,  # no reference model
        loss_type="dapo",  # TRL's default: token mean over the accumulated batch
        scale_rewards="group",
        learning_rate=LEARNING_RATE,
        weight_decay=0.0,
        max_grad_norm=1.0,
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
    in_step = in_step_callback()
    start = time.perf_counter()
    trainer = GRPOTrainer(
        model=inputs["model"],
        reward_funcs=trl_reward,
        args=config,
        train_dataset=datasets.Dataset.from_list(read_prompts(inputs["data"])),
        processing_class=AutoTokenizer.from_pretrained(inputs["tokenizer"]),
        callbacks=[in_step],
    )
    # Instrumentation only: record the prompt ids TRL generates from and time its generation.
    prompt_ids: list[list[int]] = []
    generate_s: list[float] = []
    tokenize_prompts, generate_single_turn = trainer._tokenize_prompts, trainer._generate_single_turn

    def recording_tokenize_prompts(prompts):
        out = tokenize_prompts(prompts)
        prompt_ids.extend(out[0])
        return out

    def timed_generate_single_turn(*a, **k):
        begin = time.perf_counter()
        out = generate_single_turn(*a, **k)
        generate_s.append(time.perf_counter() - begin)
        return out

    trainer._tokenize_prompts = recording_tokenize_prompts
    trainer._generate_single_turn = timed_generate_single_turn
    trainer.train()
    in_step_s = [end - begin for begin, end in zip(in_step.begins, in_step.ends, strict=True)]
    first_step, step_s = clock.steps(in_step_s)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return {
        "side": f"TRL {trl.__version__} GRPOTrainer",
        "setting": f"{args.micro_batch} x {ROLLOUTS // args.micro_batch} accumulation, "
        f"gradient checkpointing {'on' if args.checkpointing else 'off'}"
        + (" (TRL's default)" if args.checkpointing else ""),
        "setup_s": first_step - start,
        "step_s": step_s,
        "in_step_s": in_step_s,
        "phases_s": {"generate": generate_s, "update": [s - g for s, g in zip(in_step_s, generate_s, strict=True)]},
        "losses": [entry["loss"] for entry in logs],
        "response_tokens": [entry["completions/mean_length"] for entry in logs],
        "rss_after_imports_kib": after_imports,
        "peak_rss_kib": rss_kib(),
        "prompts": digest(sorted(map(list, {tuple(ids) for ids in prompt_ids}))),
        "profile": clock.table,
    }


def run_aligner(args, inputs: dict[str, str]) -> dict:
    import torch

    torch.set_num_threads(THREADS)
    import aligner.recipes.grpo as recipe
    import aligner.trainers.online
    from aligner.config import load_config
    from aligner.data import load_tokenizer, read_records
    from aligner.data.prompts import PromptDataset

    after_imports = rss_kib()
    clock = StepClock(args.warmup, args.profile)
    prompts = PromptDataset(
        read_records(inputs["data"], "rl_prompt"), load_tokenizer(inputs["tokenizer"]), max_length=MAX_LENGTH
    )

    steps = args.warmup + args.steps
    config = {
        "model": {"hf_path": inputs["model"]},
        "data": {"train": inputs["data"], "tokenizer": inputs["tokenizer"], "max_length": MAX_LENGTH},
        "grpo": {"variant": "grpo", "prompts_per_step": PROMPTS_PER_STEP, "group_size": GROUP_SIZE, "kl_coef": 0.0},
        "generation": {"max_new_tokens": NEW_TOKENS, "temperature": 1.0},
        "reward": {"terms": [{"function": "peers_grpo:aligner_reward"}]},
        "trainer": {
            "global_batch_size": ROLLOUTS,
            "micro_batch_size": args.micro_batch,
            "max_steps": steps,
            "max_epochs": steps,  # the 8 prompts are one epoch: one step
            "seed": SEED,
        },
        "optim": {"lr": LEARNING_RATE, "min_lr": LEARNING_RATE, "weight_decay": 0.0, "clip_grad": 1.0},
        "logging": {"progress_bar": False, "tensorboard_dir": None},
        "checkpoint": {"dir": None},
    }
    config_path = Path(args.workdir) / f"grpo_{args.micro_batch}.yaml"
    config_path.write_text(json.dumps(config))  # JSON is YAML
    # Every response runs the full 64 tokens, as TRL's do with min_new_tokens: the recipe has no setting that keeps
    # eos from ending a response, so its engine is built with no stop ids (the engine then never stops early).
    aligner.trainers.online.stop_token_ids = lambda tokenizer: []
    start = time.perf_counter()
    history = recipe.run(load_config(recipe.GRPORunConfig, config_path)).summary.history
    phases = {name: [h.get(f"time_{name}_s", 0.0) for h in history] for name in ALIGNER_PHASES}
    in_step_s = [sum(values) for values in zip(*phases.values(), strict=True)]
    first_step, step_s = clock.steps(in_step_s)
    return {
        "side": "aligner grpo recipe",
        "setting": f"micro-batch {args.micro_batch}",
        "setup_s": first_step - start,
        "step_s": step_s,
        "in_step_s": in_step_s,
        "phases_s": phases,
        "losses": [h["loss"] for h in history],
        "response_tokens": [h["response_length_mean"] for h in history],
        "rss_after_imports_kib": after_imports,
        "peak_rss_kib": rss_kib(),
        "prompts": digest(sorted(example.prompt_ids for example in prompts.examples)),
        "profile": clock.table,
    }


# ---------------------------------------------------------------- parent: run, compare, report


def combine_rounds(runs: list[dict], warmup: int) -> dict:
    """One setting's runs (one per round) as one row: their timed steps pooled, the largest peak RSS."""
    timed = [value for r in runs for value in r["step_s"][warmup:]]
    in_step = [value for r in runs for value in r["in_step_s"][warmup:]]
    phases = {name: [value for r in runs for value in r["phases_s"][name][warmup:]] for name in runs[0]["phases_s"]}
    return {
        **runs[0],
        "step_s": timed,
        "in_step_s": in_step,
        "phases_s": phases,
        "peak_rss_kib": max(r["peak_rss_kib"] for r in runs),
        "rss_after_imports_kib": statistics.median(r["rss_after_imports_kib"] for r in runs),
        "setup_s": statistics.median(r["setup_s"] for r in runs),
        "response_tokens": [value for r in runs for value in r["response_tokens"]],
        "rounds": len(runs),
    }


def report(rows: list[dict], warmup: int, steps: int) -> str:
    """Markdown: one row per setting, then the targets.

    Each aligner run is judged twice: against TRL's first run (the issue's setting: by default TRL's
    defaults with all 64 rollouts in one batch), and against TRL's better run on each axis (time: its
    fastest run; memory: its smallest).
    """
    import harness

    def step(r: dict) -> float:
        return statistics.median(r["step_s"])

    def phase(r: dict, *names: str) -> str:
        present = [name for name in names if name in r["phases_s"]]
        if not present:
            return "-"
        per_step = [sum(values) for values in zip(*(r["phases_s"][name] for name in present), strict=True)]
        return f"{statistics.median(per_step):.2f}"

    def increase(r: dict) -> float:
        return r["peak_rss_kib"] - r["rss_after_imports_kib"]

    def gib(r: dict) -> str:
        return harness.format_bytes(int(r["peak_rss_kib"]) * 1024)

    trls = [r for r in rows if r["side"].startswith("TRL")]
    aligners = [r for r in rows if r not in trls]
    reference = trls[0]
    fastest, smallest = min(trls, key=step), min(trls, key=lambda r: r["peak_rss_kib"])
    table = []
    for r in rows:
        tokens = r["response_tokens"]
        table.append(
            (
                r["side"],
                r["setting"],
                median_iqr(r["step_s"]),
                f"{statistics.median(r['in_step_s']):.2f}",
                phase(r, "generate"),
                phase(r, "logprobs"),
                phase(r, "train", "update"),
                phase(r, "score", "refit"),
                gib(r),
                harness.format_bytes(int(r["rss_after_imports_kib"]) * 1024),
                f"{step(r) / step(reference):.2f}x",
                f"{r['peak_rss_kib'] / reference['peak_rss_kib']:.2f}x ({increase(r) / increase(reference):.2f}x)",
                f"{statistics.mean(tokens):.2f} (min {min(tokens):.2f})",
                f"{r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}",
                f"{r['setup_s']:.1f}",
            )
        )
    header = (
        "side",
        "setting",
        "step s, median",
        "in-step s",
        "generate s",
        "log-prob pass s",
        "update s",
        "other s",
        "peak RSS",
        "RSS after imports",
        "step vs TRL's first",
        "peak RSS vs TRL's first (increase vs its)",
        "response tokens / rollout, mean per step",
        "loss first -> last",
        "setup s",
    )

    def verdict(ratio: float, bound: float) -> str:
        return f"{ratio:.2f}x, " + ("met" if ratio <= bound else "MISSED")

    judges = (
        (f"TRL's first run ({reference['setting']})", reference, reference),
        (f"TRL's best per axis (time: {fastest['setting']}; RSS: {smallest['setting']})", fastest, smallest),
    )
    targets, summary = [], []
    for against, by_time, by_rss in judges:
        for r in aligners:
            time_ratio, rss_ratio = step(r) / step(by_time), r["peak_rss_kib"] / by_rss["peak_rss_kib"]
            targets.append((r["setting"], against, verdict(time_ratio, TIME_TARGET), verdict(rss_ratio, RSS_TARGET)))
        fitting = [r for r in aligners if r["peak_rss_kib"] <= RSS_TARGET * by_rss["peak_rss_kib"]]
        best = min(fitting or aligners, key=step if fitting else lambda r: r["peak_rss_kib"])
        time_met = step(best) <= TIME_TARGET * step(by_time)
        what = "the fastest run within the memory target" if fitting else "no run fits the memory target; the smallest"
        summary.append(
            f"Against {against}: {what} is {best['setting']}: step {step(best):.2f} s "
            f"({step(best) / step(by_time):.2f}x TRL's {step(by_time):.2f} s), peak RSS {gib(best)} "
            f"({best['peak_rss_kib'] / by_rss['peak_rss_kib']:.2f}x TRL's {gib(by_rss)}); time target "
            + ("met." if time_met else "MISSED.")
        )
    same = "the same" if len({r["prompts"] for r in rows}) == 1 else "NOT the same"
    parts = [
        f"{rows[0]['rounds']} rounds, TRL and aligner runs alternating; each run a fresh process with {warmup} "
        f"warm-up and {steps} timed steps; each step {PROMPTS_PER_STEP} prompts x {GROUP_SIZE} samples x "
        f"{NEW_TOKENS} new tokens, one optimizer step over the {ROLLOUTS} rollouts. Both sides generate from "
        f"{same} prompt token ids (digest {rows[0]['prompts']}). `step` = from one optimizer step's end to the "
        "next's (torch's global optimizer hook, both sides), median (IQR) over the timed steps of every round; "
        "`in-step` = the trainer's own timer (TRL: on_step_begin -> on_step_end; aligner: the sum of its phase "
        "timers); phases (medians): `generate` (TRL: its `_generate_single_turn`; aligner: `time_generate_s`), "
        "`log-prob pass` (aligner's forward-only old-policy log-probs and entropy, skipped like TRL's with one update "
        "per rollout batch), `update` "
        "(aligner: `time_train_s`; TRL: in-step minus generate, with its rewards and advantages), `other` "
        "(aligner: rewards and engine refit). Peak RSS = the subprocess's ru_maxrss (largest over the rounds); "
        "in parentheses the ratio of the increases over the RSS after imports. `setup` = from building the "
        "trainer / calling `run` to the start of step 1. The issue quotes TRL at about 11 s per step and 5.7 GB "
        "peak RSS in its setting on an idle machine.",
        harness.markdown_table(header, table),
        f"### Targets: step time <= {TIME_TARGET}x TRL's, peak RSS <= {RSS_TARGET}x TRL's\n\n"
        + harness.markdown_table(("aligner run", "against", "step time", "peak RSS"), targets),
        "\n\n".join(summary),
    ]
    profiles = [f"{r['side']}, {r['setting']}" for r in rows if r["profile"]]
    if profiles:
        parts.append("Profiles (one step, by self CPU time) printed above for: " + "; ".join(profiles))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first, in every run")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per run")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of every setting")
    parser.add_argument("--micro-batch-sizes", default="64,16,8", help="aligner's trainer.micro_batch_size values")
    parser.add_argument(
        "--trl-runs",
        default="64:on,64:off,8:on",
        help="TRL's runs as PER_DEVICE_BATCH:CHECKPOINTING (accumulation: 64 / the batch; checkpointing on is "
        "TRL's default, aligner recomputes nothing); each target is judged against TRL's better run on its axis",
    )
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of one step per run")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    parser.add_argument("--worker", choices=("trl", "aligner"), help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--micro-batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        result = (run_trl if args.worker == "trl" else run_aligner)(args, json.loads(args.inputs))
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    trl_runs = []
    for spec in args.trl_runs.split(","):
        batch, _, checkpointing = spec.partition(":")
        if not batch.isdigit() or ROLLOUTS % int(batch) or checkpointing not in ("on", "off"):
            parser.error(f"--trl-runs: {spec!r} is not BATCH:on|off with BATCH dividing {ROLLOUTS}")
        trl_runs.append(("--worker", "trl", "--micro-batch", batch, *["--checkpointing"] * (checkpointing == "on")))

    import harness
    import torch

    torch.set_num_threads(THREADS)
    started = time.perf_counter()
    busy_before, own_before = harness.busy_cpu_seconds(), time.process_time()
    aligner_runs = [("--worker", "aligner", "--micro-batch", size) for size in args.micro_batch_sizes.split(",")]
    # TRL and aligner runs alternate, so a slow spell of a shared machine falls on both sides.
    schedule = [run for pair in itertools.zip_longest(trl_runs, aligner_runs) for run in pair if run]
    results: dict[tuple[str, ...], list[dict]] = {run: [] for run in schedule}
    with tempfile.TemporaryDirectory(prefix="aligner-peers-") as folder:
        args.workdir = folder
        inputs = build_inputs(Path(folder))
        for _ in range(args.rounds):
            for run in schedule:
                results[run].append(run_worker(args, inputs, *run, script=__file__))
    busy_after = harness.busy_cpu_seconds()

    for runs in results.values():
        for r in runs:
            if r["profile"]:
                print(f"\n## profile: {r['side']}, {r['setting']}\n\n{r['profile']}")
    rows = [combine_rounds(results[run], args.warmup) for run in (*trl_runs, *aligner_runs)]
    import accelerate
    import transformers
    import trl

    info = harness.provenance(torch.device("cpu"))
    info["torch"] += f", transformers {transformers.__version__}, trl {trl.__version__}"
    info["torch"] += f", accelerate {accelerate.__version__}"
    arch = ", ".join(f"{key} {value}" for key, value in ARCH.items())
    info["model"] = f"random LlamaForCausalLM ({arch}), fp32"
    info["runtime"] = f"{time.perf_counter() - started:.0f} s"
    if busy_before is not None and busy_after is not None:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        own = time.process_time() - own_before + children.ru_utime + children.ru_stime
        info["CPU used by other processes during the run"] = f"{max(0.0, busy_after - busy_before - own):.0f} s"
    body = report(rows, args.warmup, args.steps)
    print("\n".join(f"{name}: {value}" for name, value in info.items()) + "\n\n" + body)
    if not args.no_write:
        harness.write_results(harness.RESULTS_PATH, "cpu-peers-grpo", "Peers: GRPO step vs TRL", info, body)
        print(f"\nwrote {harness.RESULTS_PATH}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
