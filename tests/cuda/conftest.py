"""GPU kernel tests: skipped as a whole on a machine without a CUDA device.

Like tests/ops, each test draws fresh random inputs and prints its seed.
"""

from pathlib import Path

import pytest
import torch
from random_seed import fresh_seed  # noqa: F401  (autouse fixture)

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(skip)
