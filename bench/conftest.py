"""pytest-benchmark front end of the harness: `pytest bench/` runs the cases of cases.py.

Each test measures one case with harness.measure, using pytest-benchmark's
`pedantic` as the timer, so pytest-benchmark's table, JSON and --benchmark-compare
work as usual; at the end the harness prints its own tables (ratios against the
baseline measured in the same session, targets). Timings are never asserted.
"""

from __future__ import annotations

from collections.abc import Callable

import harness
import pytest
import torch

torch.set_num_threads(harness.NUM_THREADS)

_RESULTS = pytest.StashKey[dict[harness.GroupSpec, dict[str, harness.Measurement]]]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_RESULTS] = {}


@pytest.fixture
def run_bench_case(benchmark, request: pytest.FixtureRequest) -> Callable[[harness.GroupSpec, str], None]:
    """Measure the case `label` of `spec` and record it for the summary tables."""
    device = harness.bench_device()

    def pedantic_timer(fn: Callable[[], object], repeats: int) -> list[float]:
        def call_and_sync() -> None:
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        benchmark.pedantic(call_and_sync, rounds=repeats, iterations=1)
        return [] if benchmark.stats is None else list(benchmark.stats.stats.data)

    def run(spec: harness.GroupSpec, label: str) -> None:
        benchmark.group = spec.title
        case = harness.build_cases(spec)[label]
        measurement = harness.measure(case, harness.run_config(), device, pedantic_timer)
        benchmark.extra_info.update(peak_extra_bytes=measurement.peak_bytes, bytes_read=measurement.bytes_read)
        if measurement.times_s:  # empty under --benchmark-disable
            request.config.stash[_RESULTS].setdefault(spec, {})[label] = measurement

    return run


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    recorded = config.stash.get(_RESULTS, {})
    if recorded:
        results = [harness.GroupResult(spec, rows) for spec, rows in recorded.items()]
        terminalreporter.write_sep("=", "aligner benchmark tables (ratios within this session)")
        terminalreporter.write_line(harness.report(results))
