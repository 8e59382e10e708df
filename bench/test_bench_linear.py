"""linear_token_logprobs against the LM-head matmul then log_softmax/gather (see cases.py)."""

import cases
import harness
import pytest


@pytest.mark.parametrize(("spec", "label"), harness.case_params(cases.linear_specs()), ids=harness.param_id)
def test_linear_logprobs(run_bench_case, spec: harness.GroupSpec, label: str) -> None:
    run_bench_case(spec, label)
