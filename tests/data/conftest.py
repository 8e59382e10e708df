"""Fixtures for the data tests: one tiny tokenizer built per session (no downloads)."""

from pathlib import Path

import pytest

from aligner.data.tokenizer import build_tokenizer


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path):
    from aligner.data.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)
