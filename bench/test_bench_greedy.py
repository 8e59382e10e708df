"""linear_greedy against the LM-head matmul, argmax and log_softmax of a decode step (see cases.py)."""

import cases
import harness
import pytest


@pytest.mark.parametrize(("spec", "label"), harness.case_params(cases.greedy_specs()), ids=harness.param_id)
def test_greedy_step(run_bench_case, spec: harness.GroupSpec, label: str) -> None:
    run_bench_case(spec, label)
