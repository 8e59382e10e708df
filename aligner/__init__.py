"""aligner: align large language models on fused C++/CUDA kernels.

Importing the package loads the compiled extension, which registers every
kernel under ``torch.ops.aligner``; the typed Python functions are in
:mod:`aligner.ops`.
"""

import torch  # noqa: F401  (the extension links against torch's libraries)

from aligner import _C  # noqa: F401

__version__ = "0.1.0"


def build_info() -> dict:
    """How the compiled kernels were built: versions, CUDA archs, flags, CUTLASS."""
    return _C.build_info()
