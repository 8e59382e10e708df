"""gae in both mask modes against the Python loops it replaces (see cases.py)."""

import cases
import harness
import pytest


@pytest.mark.parametrize(("spec", "label"), harness.case_params(cases.gae_specs()), ids=harness.param_id)
def test_gae(run_bench_case, spec: harness.GroupSpec, label: str) -> None:
    run_bench_case(spec, label)
