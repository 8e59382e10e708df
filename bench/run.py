"""Run every aligner benchmark, print the tables and write bench/RESULTS.md.

    python bench/run.py                                      # full sizes (`make bench`)
    ALIGNER_BENCH_QUICK=1 python bench/run.py --no-write     # seconds; end of `make test`
    python bench/run.py -k gae                               # only groups whose title has "gae"

Timings are printed, never asserted: a slow number fails nothing. The same cases
also run under pytest-benchmark with `pytest bench/` (same harness and inputs).
"""

from __future__ import annotations

import argparse
import sys
import time

import cases
import harness
import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-write", action="store_true", help="print the tables only; leave RESULTS.md alone")
    parser.add_argument("-k", default="", metavar="TEXT", help="only run groups whose title contains TEXT")
    args = parser.parse_args(argv)

    torch.set_num_threads(harness.NUM_THREADS)
    device = harness.bench_device()
    config = harness.run_config()
    specs = [spec for spec in cases.all_specs() if args.k in spec.title]
    if not specs:
        parser.error(f"no benchmark title contains {args.k!r}")

    busy_before, own_before = harness.busy_cpu_seconds(), time.process_time()
    started = time.perf_counter()
    results = []
    for i, spec in enumerate(specs, 1):
        print(f"[{i}/{len(specs)}] {spec.title}", file=sys.stderr, flush=True)
        results.append(harness.run_group(spec, config, device))
    elapsed = time.perf_counter() - started
    busy_after, own_after = harness.busy_cpu_seconds(), time.process_time()

    mode = "quick" if harness.QUICK else "full"
    info = harness.provenance(device)
    info["runtime"] = f"{elapsed:.0f} s"
    if busy_before is not None and busy_after is not None:
        others = max(0.0, (busy_after - busy_before) - (own_after - own_before))
        info["CPU used by other processes during the run"] = f"{others:.0f} s (noisy timings if not ~0)"
    body = harness.report(results)
    print("\n".join(f"{name}: {value}" for name, value in info.items()))
    print()
    print(body)
    if not args.no_write:
        title = f"{device.type.upper()}, {mode} sizes"
        harness.write_results(harness.RESULTS_PATH, f"{device.type}-{mode}", title, info, body)
        print(f"\nwrote {harness.RESULTS_PATH}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
