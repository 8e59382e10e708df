"""The one benchmark harness behind `bench/run.py` and the pytest-benchmark tests.

A benchmark *group* is a handful of callables over the same inputs; the first is
the baseline and every ratio in the tables is taken against rows measured in the
same run. For each case the harness:

1. runs it once under the memory probe (this call is also the first warmup):
   - CPU: `torch.profiler` with `profile_memory=True` records one event per
     allocation and free made through c10's CPU allocator; replaying those
     events in time order gives the running sum of bytes held, and its maximum
     is the *peak extra memory* (inputs allocated before the call do not count;
     outputs and every temporary do). torch 2.14 exposes no CPU allocator
     statistics, and the CPU allocator does not cache, so this sees every
     tensor allocation. It cannot see raw `malloc`/`std::vector` inside a
     kernel, only tensors.
   - CUDA: `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`,
     minus `memory_allocated()` before the call.
2. runs it once more untimed and uses that time to choose the number of repeats
   (enough to fill `RunConfig.budget_s`, clamped to `[min_repeats, max_repeats]`);
3. times each repeat separately (`time.perf_counter`, synchronizing CUDA around
   every call) and reports median, interquartile range, min and max.

Throughput (GB/s) is the bytes the case must read (for the log-prob ops: the
logits, once per pass) divided by the median time; it is a yardstick against
memory bandwidth, not a count of the bytes actually moved.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import aligner._C
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_PATH = REPO_ROOT / "bench" / "RESULTS.md"
QUICK = os.environ.get("ALIGNER_BENCH_QUICK") == "1"
# Benchmarks pin the intra-op thread count so numbers from different machines
# and runs compare like with like; override with ALIGNER_BENCH_THREADS.
NUM_THREADS = int(os.environ.get("ALIGNER_BENCH_THREADS", "2"))


@dataclass(frozen=True)
class RunConfig:
    """How long to measure each case."""

    min_repeats: int
    max_repeats: int
    budget_s: float  # aim for this much timed work per case


FULL_CONFIG = RunConfig(min_repeats=5, max_repeats=50, budget_s=1.0)
QUICK_CONFIG = RunConfig(min_repeats=3, max_repeats=20, budget_s=0.05)


def run_config() -> RunConfig:
    """The config for this process: QUICK_CONFIG when ALIGNER_BENCH_QUICK=1."""
    return QUICK_CONFIG if QUICK else FULL_CONFIG


@dataclass(frozen=True)
class Case:
    """One row of a group: a zero-argument callable and the bytes it must read."""

    label: str
    fn: Callable[[], object]
    bytes_read: int


@dataclass(frozen=True)
class Target:
    """A goal on the ratio `quantity(numerator) / quantity(denominator)` of two rows."""

    text: str  # what the tables print, e.g. "fwd >= 4x torch"
    numerator: str  # case labels
    denominator: str
    bound: float
    at_least: bool  # True: ratio >= bound is met; False: ratio <= bound is met
    quantity: str = "time"  # "time" (median seconds) or "memory" (peak extra bytes)


@dataclass(frozen=True)
class GroupSpec:
    """A benchmark group before its inputs exist.

    pytest collects specs without allocating gigabytes of logits; `build` makes the
    inputs and returns the cases, baseline first, labelled exactly as `labels`.
    """

    section: str
    title: str
    labels: tuple[str, ...]
    build: Callable[[], list[Case]]
    targets: tuple[Target, ...] = ()

    @property
    def test_id(self) -> str:
        return self.title.replace(" ", "-")


def case_params(specs: Sequence[GroupSpec]) -> list[tuple[GroupSpec, str]]:
    """(spec, label) for every case of `specs`: the pytest parametrization of bench/test_*.py."""
    return [(spec, label) for spec in specs for label in spec.labels]


def param_id(value: object) -> str:
    """pytest id of a case_params value: the spec's title or the case label, spaces dashed."""
    return value.test_id if isinstance(value, GroupSpec) else str(value).replace(" ", "_")


@dataclass(frozen=True)
class Measurement:
    """Timings (seconds, one per repeat) and peak extra memory of one case."""

    label: str
    times_s: tuple[float, ...]
    peak_bytes: int
    bytes_read: int

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def quartiles_s(self) -> tuple[float, float]:
        if len(self.times_s) < 2:
            return self.times_s[0], self.times_s[0]
        q1, _, q3 = statistics.quantiles(self.times_s, n=4, method="inclusive")
        return q1, q3

    @property
    def gb_per_s(self) -> float:
        return self.bytes_read / self.median_s / 1e9


@dataclass
class GroupResult:
    """The measured rows of one group, in spec order (baseline first)."""

    spec: GroupSpec
    rows: dict[str, Measurement]


def bench_device() -> torch.device:
    """CUDA when available (ALIGNER_BENCH_DEVICE=cpu forces the CPU), else CPU."""
    wanted = os.environ.get("ALIGNER_BENCH_DEVICE")
    if wanted:
        return torch.device(wanted)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    # Kineto writes "profiler_start/stop" lines (and, without a GPU, a
    # gpuGetDeviceCount error) straight to fd 2 on every profiler start and stop;
    # only those two moments are silenced, never the measured call.
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_extra_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated by one call of `fn` above what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before

    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
    with _stderr_silenced():
        profiler.start()
    try:
        fn()
    finally:
        with _stderr_silenced():
            profiler.stop()
    allocations = sorted(
        (event.start_ns(), event.nbytes())
        for event in profiler.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == torch._C._autograd.DeviceType.CPU
    )
    held = peak = 0
    for _, nbytes in allocations:  # frees carry negative nbytes
        held += nbytes
        peak = max(peak, held)
    return peak


Timer = Callable[[Callable[[], object], int], list[float]]


def perf_counter_timer(device: torch.device) -> Timer:
    """A timer that runs `fn` `repeats` times and returns each call's seconds."""

    def timer(fn: Callable[[], object], repeats: int) -> list[float]:
        times = []
        for _ in range(repeats):
            _synchronize(device)
            start = time.perf_counter()
            fn()
            _synchronize(device)
            times.append(time.perf_counter() - start)
        return times

    return timer


def measure(case: Case, config: RunConfig, device: torch.device, timer: Timer) -> Measurement:
    """Probe memory, warm up, choose the repeat count, then time `case` with `timer`."""
    peak = peak_extra_memory(case.fn, device)
    (warm_s,) = perf_counter_timer(device)(case.fn, 1)
    repeats = min(config.max_repeats, max(config.min_repeats, round(config.budget_s / warm_s)))
    times = timer(case.fn, repeats)
    return Measurement(case.label, tuple(times), peak, case.bytes_read)


@functools.lru_cache(maxsize=1)
def build_cases(spec: GroupSpec) -> dict[str, Case]:
    """The spec's cases by label; cached so consecutive pytest cases share one input set."""
    cases = spec.build()
    labels = tuple(case.label for case in cases)
    if labels != spec.labels:
        raise RuntimeError(f"{spec.title}: build() made cases {labels}, spec declares {spec.labels}")
    return {case.label: case for case in cases}


def run_group(spec: GroupSpec, config: RunConfig, device: torch.device) -> GroupResult:
    """Measure every case of `spec` in order with the harness's own timer."""
    cases = build_cases(spec)
    timer = perf_counter_timer(device)
    rows = {label: measure(case, config, device, timer) for label, case in cases.items()}
    build_cases.cache_clear()  # free this group's inputs before the next one is built
    return GroupResult(spec, rows)


# ---------------------------------------------------------------- tables


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3g}"


def format_bytes(n: int) -> str:
    """``n`` bytes in GiB, MiB or KiB (3 significant digits)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            value = n / size
            return f"{value:.0f} {unit}" if value >= 100 else f"{value:.3g} {unit}"
    return f"{n} B"


def _ratio(result: GroupResult, target: Target) -> float | None:
    rows = result.rows
    if target.numerator not in rows or target.denominator not in rows:
        return None
    if target.quantity == "memory":
        num, den = rows[target.numerator].peak_bytes, rows[target.denominator].peak_bytes
        return num / den if den else None
    return rows[target.numerator].median_s / rows[target.denominator].median_s


def markdown_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def timing_table(results: Sequence[GroupResult]) -> str:
    """One markdown row per case; ratios are against the group's first row."""
    header = (
        "benchmark",
        "impl",
        "median ms",
        "IQR ms",
        "min–max ms",
        "n",
        "peak extra mem",
        "GB/s",
        "speedup vs baseline",
        "mem vs baseline",
    )
    body = []
    for result in results:
        baseline = next(iter(result.rows.values()))
        for i, m in enumerate(result.rows.values()):
            q1, q3 = m.quartiles_s
            mem_ratio = f"{100 * m.peak_bytes / baseline.peak_bytes:.3g}%" if baseline.peak_bytes else "n/a"
            body.append(
                (
                    result.spec.title if i == 0 else "",
                    m.label,
                    _ms(m.median_s),
                    _ms(q3 - q1),
                    f"{_ms(min(m.times_s))}–{_ms(max(m.times_s))}",
                    str(len(m.times_s)),
                    format_bytes(m.peak_bytes),
                    f"{m.gb_per_s:.3g}",
                    f"{baseline.median_s / m.median_s:.2f}x",
                    mem_ratio,
                )
            )
    return markdown_table(header, body)


QUICK_VERDICT = "n/a at quick size"


def target_table(results: Sequence[GroupResult], *, judge: bool | None = None) -> str:
    """One markdown row per target: the measured ratio and whether it is met.

    The targets are set for the full sizes: unless `judge` (default: not QUICK),
    the ratio is shown with the verdict QUICK_VERDICT, never "met" or "MISSED".
    """
    judge = not QUICK if judge is None else judge
    body = []
    for result in results:
        for target in result.spec.targets:
            ratio = _ratio(result, target)
            if ratio is None:
                measured, verdict = "n/a", "not measured"
            else:
                measured = f"{100 * ratio:.3g}%" if target.quantity == "memory" else f"{ratio:.2f}x"
                met = ratio >= target.bound if target.at_least else ratio <= target.bound
                verdict = ("met" if met else "MISSED") if judge else QUICK_VERDICT
            body.append((result.spec.title, target.text, measured, verdict))
    return markdown_table(("benchmark", "target", "measured", "verdict"), body)


def report(results: Sequence[GroupResult]) -> str:
    """Markdown: per section a timing table, then one table of all targets."""
    sections: dict[str, list[GroupResult]] = {}
    for result in results:
        sections.setdefault(result.spec.section, []).append(result)
    parts = [
        "The baseline of each group is its first row (plain PyTorch); speedup = baseline median / row median,"
        " mem = row peak extra memory / baseline's."
    ]
    parts += [f"### {name}\n\n{timing_table(group)}" for name, group in sections.items()]
    if any(result.spec.targets for result in results):
        caveat = "\n\nThe targets are set for the full sizes: quick sizes show the ratios, unjudged." if QUICK else ""
        parts.append(f"### Targets{caveat}\n\n{target_table(results)}")
    return "\n\n".join(parts)


# ---------------------------------------------------------------- provenance


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout.strip()


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (Linux /proc/stat), else None.

    run.py subtracts its own process time from the change over a run: what is left
    is other processes competing for the cores, which makes timings unreliable.
    """
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def provenance(device: torch.device) -> dict[str, str]:
    """Command, commit, machine, torch version and date: what makes a number a result."""
    env = [f"{k}={os.environ[k]}" for k in sorted(os.environ) if k.startswith("ALIGNER_BENCH_")]
    commit = _git("rev-parse", "--short", "HEAD")
    if commit is None:
        commit = "none (no commit yet)"
    elif _git("status", "--porcelain", "--", ".", ":(exclude)bench/RESULTS.md"):
        commit += " + uncommitted changes"
    machine = f"{_cpu_model()}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}"
    if device.type == "cuda":
        machine += f", GPU {torch.cuda.get_device_name(device)}"
    build = aligner._C.build_info()
    kernels = f"CPU kernels {build['cpu_capability']}, CUDA kernels "
    kernels += ",".join(build["cuda_archs"]) if build["has_cuda_kernels"] else "none"
    return {
        "command": " ".join([*env, "python", shlex.join(sys.argv)]),
        "commit": commit,
        "machine": machine,
        "aligner build": f"{kernels}; {build['cxx_compiler']} {build['cxx_flags']}",
        "torch": torch.__version__ + (f" (CUDA {torch.version.cuda})" if device.type == "cuda" else ""),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


RESULTS_HEADER = """# Benchmark results

Written by the scripts of `bench/` (`make bench`: `bench/run.py`; `make bench-peers`:
`bench/peers_dpo.py` and `bench/peers_grpo.py`); do not edit by hand. Each section
below is one run on one kind of device; every ratio compares rows measured in that
same run. How times, peak extra memory and GB/s are measured: see the docstring of
`bench/harness.py` (and of the script named in the section's command).
"""

_SECTION = re.compile(r"<!-- BEGIN (\S+) -->\n.*?<!-- END \1 -->\n", re.DOTALL)


def write_results(path: Path, key: str, title: str, info: dict[str, str], body: str) -> None:
    """Replace (or append) the section `key` of `path`, keeping other devices' sections."""
    sections = {m.group(1): m.group(0) for m in _SECTION.finditer(path.read_text())} if path.exists() else {}
    facts = "\n".join(f"- {name}: `{value}`" for name, value in info.items())
    sections[key] = f"<!-- BEGIN {key} -->\n## {title}\n\n{facts}\n\n{body}\n<!-- END {key} -->\n"
    path.write_text(RESULTS_HEADER + "\n" + "\n".join(sections.values()))
