"""The demo data and tokenizer (prepare_demo), written once per test module for the recipe runs."""

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    from aligner.recipes.prepare_demo import prepare_demo

    out = tmp_path_factory.mktemp("demo")
    prepare_demo(out)
    return out
