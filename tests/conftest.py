"""Shared test set-up.

pytest puts this directory on ``sys.path`` (rootdir conftest, no ``__init__.py``),
so test modules import the shared helpers directly: ``from distributed import run_distributed``.

Under pytest-xdist (``make test`` runs ``pytest -n 2``) each worker process computes with one
CPU thread: two workers of two threads each on two cores stall each other in OpenMP's spin waits.
The processes a test spawns (tests/distributed.py) take one thread each in any case.
"""

import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-process cases (seconds each); still part of the default run")
    # megatron-core announces at import that it falls back from Transformer Engine / Apex
    # to its local (torch) implementations; that fallback is the configuration we use.
    config.addinivalue_line("filterwarnings", "ignore:.*Transformer Engine and Apex are not installed:UserWarning")
    config.addinivalue_line("filterwarnings", "ignore:Apex is not installed:UserWarning")
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning:megatron.*")
