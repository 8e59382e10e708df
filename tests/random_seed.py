"""A fresh torch seed for every test, printed so that a failure can be replayed.

Kernel tests draw new random inputs on each run (a fixed seed would only ever
test one input). The seed comes from ``ALIGNER_TEST_SEED`` when set, else from
the OS; pytest shows the printed line with a failing test's captured output:

    ALIGNER_TEST_SEED=1234 pytest 'tests/ops/test_kl.py::test_forward[k3]'

Test directories that want it import :func:`fresh_seed` into their conftest.py;
:func:`module_seed` is one such seed shared by a module's expensive fixtures.
"""

import os
import secrets

import pytest
import torch

SEED_ENV = "ALIGNER_TEST_SEED"


@pytest.fixture(autouse=True)
def fresh_seed(request: pytest.FixtureRequest) -> int:
    seed = int(os.environ.get(SEED_ENV) or secrets.randbits(31))
    torch.manual_seed(seed)  # also seeds every CUDA device
    request.node.user_properties.append(("seed", seed))
    print(f"{SEED_ENV}={seed} pytest '{request.node.nodeid}'")
    return seed


@pytest.fixture(scope="module")
def module_seed() -> int:
    """One seed for a module's runs (module-scoped fixtures run before the per-test ``fresh_seed``)."""
    seed = int(os.environ.get(SEED_ENV) or secrets.randbits(31))
    print(f"{SEED_ENV}={seed}")
    return seed
