"""The cache's integrity check, on tiny stand-in files (what is in them does not matter to it)."""
from __future__ import annotations

from pathlib import Path

import pytest

from refengine.store.cache import (
    PREPARE_HINT,
    ModelCacheError,
    ModelFiles,
    is_prepared,
    model_files,
    model_home,
    verify,
    write_manifest,
)


@pytest.fixture
def files(tmp_path: Path) -> ModelFiles:
    files = model_files("tiny", home=tmp_path)
    files.dir.mkdir(parents=True)
    for i, path in enumerate(files.payload):
        path.write_bytes(bytes(range(i + 1)) * 100)
    write_manifest(files, source={"test": True})
    return files


def test_home_is_env_or_user_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("REFENGINE_HOME", str(tmp_path))
    assert model_home() == tmp_path
    assert model_files("m").weights == tmp_path / "models" / "m" / "model.safetensors"
    monkeypatch.delenv("REFENGINE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert model_home() == tmp_path / "user" / ".cache" / "refengine"


def test_written_files_verify(files: ModelFiles) -> None:
    verify(files)
    verify(files, deep=True)
    assert is_prepared("tiny", home=files.dir.parent.parent)


@pytest.mark.parametrize("damage, expected", [
    (lambda f: f.manifest.unlink(), "no manifest.json"),
    (lambda f: f.manifest.write_text("{not json"), "unreadable"),
    (lambda f: f.manifest.write_text('{"format_version": 0}'), "not format version"),
    (lambda f: f.tokenizer.unlink(), "tokenizer.json is missing"),
    (lambda f: f.weights.write_bytes(f.weights.read_bytes()[:-1]), "model.safetensors has 99 bytes, expected 100"),
])
def test_damage_is_named_with_the_fix(files: ModelFiles, damage, expected: str) -> None:
    damage(files)
    with pytest.raises(ModelCacheError, match=expected) as err:
        verify(files)
    assert PREPARE_HINT in str(err.value) and "\n" not in str(err.value)
    assert not is_prepared("tiny", home=files.dir.parent.parent)


def test_same_size_corruption_needs_the_deep_check(files: ModelFiles) -> None:
    data = bytearray(files.weights.read_bytes())
    data[0] ^= 0xFF
    files.weights.write_bytes(data)
    verify(files)  # cheap: sizes still agree
    with pytest.raises(ModelCacheError, match="does not match its sha256"):
        verify(files, deep=True)


def test_nothing_there_is_not_prepared(tmp_path: Path) -> None:
    assert not is_prepared("absent", home=tmp_path)
