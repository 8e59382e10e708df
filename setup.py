"""Builds aligner's kernels by driving CMake (CMakeLists.txt owns every flag).

Build variables (environment):
  ALIGNER_CPU_ONLY=1      build only the CPU kernels
  TORCH_CUDA_ARCH_LIST    CUDA archs when no GPU is visible, e.g. "8.0;9.0" (the default)
  CUDA_HOME               the CUDA toolkit to use (else nvcc on PATH)
  MAX_JOBS                parallel compile jobs (default: number of CPUs)
"""

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _tool(module: str, attr: str, name: str) -> str:
    """The pip-installed cmake/ninja when present (newer than the system's)."""
    try:
        return str(Path(getattr(__import__(module), attr)) / name)
    except (ImportError, AttributeError):
        return name


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = ROOT / "build" / f"cmake-py{sys.version_info.major}{sys.version_info.minor}"
        build_dir.mkdir(parents=True, exist_ok=True)
        cpu_only = os.environ.get("ALIGNER_CPU_ONLY", "0") not in ("", "0", "false", "False", "OFF")
        cmake = _tool("cmake", "CMAKE_BIN_DIR", "cmake")
        configure = [
            cmake,
            "-S",
            str(ROOT),
            "-B",
            str(build_dir),
            "-G",
            "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={_tool('ninja', 'BIN_DIR', 'ninja')}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DALIGNER_CPU_ONLY={'ON' if cpu_only else 'OFF'}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.run(configure, check=True)
        subprocess.run([cmake, "--build", str(build_dir), "-j", jobs], check=True)


setup(
    ext_modules=[CMakeExtension("aligner._C")],
    cmdclass={"build_ext": CMakeBuild},
)
