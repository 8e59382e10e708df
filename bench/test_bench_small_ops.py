"""kl_penalty, masked_whiten and group_advantages against their torch one-liners (see cases.py)."""

import cases
import harness
import pytest


@pytest.mark.parametrize(("spec", "label"), harness.case_params(cases.small_op_specs()), ids=harness.param_id)
def test_small_ops(run_bench_case, spec: harness.GroupSpec, label: str) -> None:
    run_bench_case(spec, label)
