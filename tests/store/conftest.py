"""Fixtures for the model cache tests; `golden_dir` and `prepared_model` are meant to move to tests/conftest.py."""
from __future__ import annotations

from pathlib import Path

import pytest

from refengine.store.cache import ModelFiles
from refengine.store.prepare import prepare


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """`shared/golden`: CI checks `shared/` out beside the repository."""
    return Path(__file__).resolve().parents[2].parent / "shared" / "golden"


@pytest.fixture(scope="session")
def prepared_model(tmp_path_factory: pytest.TempPathFactory) -> ModelFiles:
    """SmolLM2-135M-Instruct prepared once per session into a private cache home (a few seconds)."""
    return prepare(home=tmp_path_factory.mktemp("refengine-home"), progress=False)
