"""Fixtures for the engine tests; `golden_dir` is meant to move to tests/conftest.py."""
from __future__ import annotations

from pathlib import Path

import pytest
from gguf import GGUFReader

from refengine.store.cache import ModelFiles
from refengine.store.prepare import DEFAULT_MODEL, SOURCES
from refengine.store.tokenizer_build import write_tokenizer_files


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """`shared/golden`: CI checks `shared/` out beside the repository."""
    return Path(__file__).resolve().parents[2].parent / "shared" / "golden"


@pytest.fixture(scope="session")
def tokenizer_files(tmp_path_factory: pytest.TempPathFactory) -> ModelFiles:
    """Only the tokenizer files of the default model, which is all tokenizer tests need (no weights)."""
    files = ModelFiles(tmp_path_factory.mktemp("tokenizer"))
    with SOURCES[DEFAULT_MODEL].path() as gguf_path:
        write_tokenizer_files(GGUFReader(gguf_path), files.tokenizer, files.tokenizer_config)
    return files
