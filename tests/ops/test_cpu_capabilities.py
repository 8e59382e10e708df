"""Each compiled CPU variant (default, AVX2, AVX-512) of the log-prob and LM-head kernels gives the same answers.

The variant is chosen once per process, so each runs in a subprocess with
ALIGNER_CPU_CAPABILITY forcing it; variants the CPU lacks fall back to default.
"""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, torch, aligner.ops as ops
from aligner.ops import reference
torch.manual_seed(0)
out = {"capability": __import__("aligner").build_info()["cpu_capability"]}
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    logits = (torch.randn(7, 1037) * 4).to(dtype)
    logits[0, 5] = float("-inf")
    labels = torch.randint(0, 1037, (7,))
    labels[1] = -100
    x = logits.clone().requires_grad_()
    lp, ent = ops.token_logprobs_and_entropy(x, labels, temperature=0.8)
    (lp.sum() + 0.5 * ent.sum()).backward()
    xr = logits.double().requires_grad_()
    rlp, rent = reference.token_logprobs_and_entropy(xr, labels, temperature=0.8)
    (rlp.sum() + 0.5 * rent.sum()).backward()
    out[str(dtype)] = [
        (lp.double() - rlp).abs().max().item(),
        (ent.double() - rent).abs().max().item(),
        (x.grad.double() - xr.grad).abs().max().item(),
    ]
# linear_argmax: rows within one vector, across a wide tile and past it (tiles of 6 or 8 rows x 2
# vectors of 8 or 16 columns); a vocabulary over the 4096-row chunk, row 0's clear winner in the second
argmax = []
for rows in (3, 20, 37):
    hidden, weight = torch.randn(rows, 48), torch.randn(4500, 48) / 2
    weight[4321] = hidden[0] * 3
    tokens, best, lse = ops.linear_argmax(hidden, weight)
    ref_tokens, ref_best, ref_lse = reference.linear_argmax(hidden, weight)
    argmax.append([int(tokens[0]), (best.double() - ref_best).abs().max().item(),
                   (lse.double() - ref_lse).abs().max().item(), (tokens != ref_tokens).float().mean().item()])
out["linear_argmax"] = argmax
print(json.dumps(out))
"""

# fp32 forward error over ~1000 terms; backward error is the dtype's rounding of O(1) grads.
# linear_argmax: logits of std ~3.5 summed over 48 products in float32, error well under 1e-4.
FORWARD_ATOL = 2e-5
BACKWARD_ATOL = {"torch.float32": 1e-5, "torch.bfloat16": 1e-2, "torch.float16": 2e-3}


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_variant_matches_reference(capability):
    env = dict(os.environ, ALIGNER_CPU_CAPABILITY=capability)
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["capability"] in (capability, "default")
    for first_token, max_err, lse_err, token_mismatch in out.pop("linear_argmax"):
        assert first_token == 4321, capability
        assert max_err < 1e-4 and lse_err < 1e-4, (capability, max_err, lse_err)
        assert token_mismatch <= 0.05, (capability, token_mismatch)
    for dtype, (lp_err, ent_err, grad_err) in ((k, v) for k, v in out.items() if k != "capability"):
        assert lp_err < FORWARD_ATOL, (capability, dtype, lp_err)
        assert ent_err < FORWARD_ATOL, (capability, dtype, ent_err)
        assert grad_err < BACKWARD_ATOL[dtype], (capability, dtype, grad_err)


NAN_SCRIPT = r"""
import json, torch, aligner.ops as ops
torch.manual_seed(0)
out = {}
for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
    # rows: clean, NaN in a late chunk (past the first 1024-column block), NaN at column 0, NaN in an
    # ignore_index row, a row whose upstream gradient is zero (entropy only, no label), then clean again
    logits = torch.randn(6, 3000).to(dtype)
    logits[1, 2500] = logits[2, 0] = logits[3, 17] = logits[4, 9] = float("nan")
    labels = torch.tensor([0, 3, 1, -100, -100, 7])
    x = logits.clone().requires_grad_()
    lp, ent = ops.token_logprobs_and_entropy(x, labels)
    weights = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    (lp.sum() + (ent * weights).sum()).backward()
    grad = x.grad.float()
    out[str(dtype)] = {
        "logprob_nan": lp.isnan().tolist(),
        "entropy_nan": ent.isnan().tolist(),
        "grad_row_all_nan": grad.isnan().all(-1).tolist(),
        "grad_row_any_nan": grad.isnan().any(-1).tolist(),
    }
print(json.dumps(out))
"""


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_a_nan_anywhere_in_a_row_makes_the_row_nan(capability):
    """NaN log-prob (0 at ignore_index, which is not scored), NaN entropy, an all-NaN gradient row; other rows clean."""
    env = dict(os.environ, ALIGNER_CPU_CAPABILITY=capability)
    result = subprocess.run([sys.executable, "-c", NAN_SCRIPT], env=env, capture_output=True, text=True, check=True)
    out = json.loads(result.stdout.strip().splitlines()[-1])
    nan_rows = [False, True, True, True, True, False]
    for dtype, seen in out.items():
        assert seen["logprob_nan"] == [False, True, True, False, False, False], (capability, dtype)
        assert seen["entropy_nan"] == nan_rows, (capability, dtype)
        assert seen["grad_row_all_nan"] == nan_rows, (capability, dtype)
        assert seen["grad_row_any_nan"] == nan_rows, (capability, dtype)
