"""token_logprobs, token_entropy and the fused op against plain PyTorch (see cases.py)."""

import cases
import harness
import pytest


@pytest.mark.parametrize(("spec", "label"), harness.case_params(cases.logprob_specs()), ids=harness.param_id)
def test_logprob_ops(run_bench_case, spec: harness.GroupSpec, label: str) -> None:
    run_bench_case(spec, label)
