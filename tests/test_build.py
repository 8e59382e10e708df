"""The built extension: what it reports, which archs it carries, and that no kernel spills registers."""

import os
import re
import shutil
from pathlib import Path

import pytest
import torch

import aligner

INFO = aligner.build_info()
NVCC_PRESENT = bool(os.environ.get("CUDA_HOME")) or shutil.which("nvcc") is not None
CUDA_EXPECTED = NVCC_PRESENT and torch.version.cuda is not None and os.environ.get("ALIGNER_CPU_ONLY", "0") in ("", "0")


def test_build_info_reports_versions_and_flags():
    for key in (
        "torch_version",
        "torch_cuda_version",
        "has_cuda_kernels",
        "cuda_archs",
        "cxx_flags",
        "cuda_flags",
        "cutlass_version",
        "cpu_capability",
    ):
        assert key in INFO, key
    assert INFO["torch_version"] == torch.__version__.split("+")[0]
    assert INFO["cpu_capability"] in ("default", "avx2", "avx512")


@pytest.mark.skipif(not CUDA_EXPECTED, reason="no nvcc, a CPU-only torch, or ALIGNER_CPU_ONLY=1")
def test_cuda_kernels_built_for_sm80_and_sm90():
    assert INFO["has_cuda_kernels"]
    if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        assert {"80-real", "90-real"} <= set(INFO["cuda_archs"])
    assert INFO["cutlass_version"], "CUTLASS headers (nvidia-cutlass wheel) were not found"
    assert torch.ops.aligner.logprobs_entropy_forward.default.has_kernel_for_dispatch_key("CUDA")
    assert torch.ops.aligner.linear_logprobs_forward.default.has_kernel_for_dispatch_key("CUDA")


def _ptxas_entries():
    """(kernel, arch, spill_store_bytes, spill_load_bytes) for every kernel in the kept ptxas report."""
    report_dir = Path(INFO["ptxas_report_dir"])
    logs = sorted(report_dir.glob("*.log"))
    assert logs, f"no ptxas report in {report_dir}"
    entries = []
    for log in logs:
        current = None
        for line in log.read_text().splitlines():
            m = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+a?)'", line)
            if m:
                current = m.groups()
                continue
            m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
            if m and current is not None:
                entries.append((*current, int(m.group(1)), int(m.group(2))))
                current = None
    return entries


@pytest.mark.skipif(not CUDA_EXPECTED, reason="no CUDA kernels in this build")
def test_no_kernel_spills_registers():
    entries = _ptxas_entries()
    archs = {arch for _, arch, _, _ in entries}
    if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        assert {"sm_80", "sm_90"} <= archs
    kernels = {name for name, _, _, _ in entries}
    for kernel in (
        "logprob_forward_kernel",
        "logprob_backward_kernel",
        "gae_kernel",
        "masked_moments_kernel",
        "linear_logprob_tile_kernel",
        "linear_logprob_finalize_kernel",
    ):
        assert any(kernel in name for name in kernels), f"{kernel} missing from the ptxas report"
    spills = [e for e in entries if e[2] or e[3]]
    assert not spills, f"kernels spill registers: {spills}"
