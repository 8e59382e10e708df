"""aligner: align large language models on fused C++/CUDA kernels.

Importing the package loads the compiled extension, which registers every
kernel under ``torch.ops.aligner``; the typed Python functions are in
:mod:`aligner.ops`.
"""

# First, before torch and anything that imports megatron-core: megatron's Transformer Engine / Apex
# fallback warnings (given at import) are dropped, in this process and in the ones the checkpoint
# writer spawns (they re-import the main module, hence this package, first). Narrow filters only.
from aligner.console import quiet_third_party_warnings

quiet_third_party_warnings()

import torch  # noqa: E402, F401  (the extension links against torch's libraries)

from aligner import _C  # noqa: E402, F401

__version__ = "0.1.0"


def build_info() -> dict:
    """How the compiled kernels were built: versions, CUDA archs, flags, CUTLASS."""
    return _C.build_info()
