"""The model cache: where a prepared model lives and how to tell it is whole.

A prepared model is one directory, `<home>/models/<weights-name>/`, holding exactly the files of
`ModelFiles`: what the GGUF converts to (HF safetensors, config, tokenizer) and the same weights as a
loading-optimized checkpoint (`packed.py`). `manifest.json` is written last and lists every other
file with its size and sha256, so a directory without a manifest, or whose files disagree with it, is
never loaded. The loader runs the cheap check (presence and sizes) every time; the sha256 check is
`verify(files, deep=True)`.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

FORMAT_VERSION = 1
PREPARE_HINT = "run `python cli.py prepare --force`"


class ModelCacheError(Exception):
    """A prepared model is missing or damaged; the message names the file and how to fix it."""


@dataclass(frozen=True)
class ModelFiles:
    """The paths of one prepared model (they need not exist yet)."""

    dir: Path

    @property
    def weights(self) -> Path:
        """float32 safetensors, HF Llama names; the tied embedding is stored once."""
        return self.dir / "model.safetensors"

    @property
    def config(self) -> Path:
        return self.dir / "config.json"

    @property
    def tokenizer(self) -> Path:
        return self.dir / "tokenizer.json"

    @property
    def tokenizer_config(self) -> Path:
        return self.dir / "tokenizer_config.json"

    @property
    def packed(self) -> Path:
        """The weights in the engine's final layout, one aligned data file (`packed.py`)."""
        return self.dir / "tensors.bin"

    @property
    def packed_index(self) -> Path:
        """Name -> offset, size, shape, dtype of every tensor in `packed`, and its chunk checksums."""
        return self.dir / "tensor_index.json"

    @property
    def packed_verified(self) -> Path:
        """Marker: `packed` passed its chunk checksums as it is now (not in the manifest: a cache hint)."""
        return self.dir / "tensors.verified"

    @property
    def manifest(self) -> Path:
        return self.dir / "manifest.json"

    @property
    def converted(self) -> tuple[Path, ...]:
        """What converting the GGUF writes; everything else is derived from these files."""
        return (self.weights, self.config, self.tokenizer, self.tokenizer_config)

    @property
    def payload(self) -> tuple[Path, ...]:
        """Every file the manifest vouches for (all but the manifest itself)."""
        return (*self.converted, self.packed, self.packed_index)


def model_home() -> Path:
    """`$REFENGINE_HOME`, else `~/.cache/refengine`."""
    return Path(os.environ.get("REFENGINE_HOME") or Path.home() / ".cache" / "refengine")


def models_dir(home: Path | None = None) -> Path:
    return (home if home is not None else model_home()) / "models"


def model_files(name: str, home: Path | None = None) -> ModelFiles:
    return ModelFiles(models_dir(home) / name)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(files: ModelFiles, source: dict, known: dict | None = None) -> None:
    """Record size and sha256 of every payload file there; call it after all of them are written.
    (An entry written without the checkpoint verifies as unprepared, and `prepare` completes it.)
    known: entries already checked against their files (name -> size, sha256), not hashed again."""
    known = known or {}
    entries = {p.name: known.get(p.name) or {"size": p.stat().st_size, "sha256": sha256_file(p)}
               for p in files.payload if p.exists()}
    manifest = {"format_version": FORMAT_VERSION, "source": source, "files": entries}
    files.manifest.write_text(json.dumps(manifest, indent=1) + "\n")


def read_manifest(files: ModelFiles) -> dict:
    try:
        manifest = json.loads(files.manifest.read_text())
    except FileNotFoundError:
        raise ModelCacheError(f"{files.dir} is not prepared (no manifest.json); {PREPARE_HINT}") from None
    except (OSError, ValueError) as e:
        raise ModelCacheError(f"{files.manifest} is unreadable ({e}); {PREPARE_HINT}") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise ModelCacheError(f"{files.manifest} is not format version {FORMAT_VERSION}; {PREPARE_HINT}")
    return manifest


def verify(files: ModelFiles, deep: bool = False, paths: tuple[Path, ...] | None = None) -> None:
    """Raise `ModelCacheError` unless every payload file (or each of `paths`) is present with its
    manifest size (and sha256 if deep)."""
    listed = read_manifest(files).get("files", {})
    for path in files.payload if paths is None else paths:
        entry = listed.get(path.name)
        if entry is None:
            raise ModelCacheError(f"{files.manifest} does not list {path.name}; {PREPARE_HINT}")
        if not path.is_file():
            raise ModelCacheError(f"{path} is missing; {PREPARE_HINT}")
        size = path.stat().st_size
        if size != entry["size"]:
            raise ModelCacheError(f"{path} has {size} bytes, expected {entry['size']}; {PREPARE_HINT}")
        if deep and sha256_file(path) != entry["sha256"]:
            raise ModelCacheError(f"{path} does not match its sha256; {PREPARE_HINT}")


def is_prepared(name: str, home: Path | None = None) -> bool:
    try:
        verify(model_files(name, home))
    except ModelCacheError:
        return False
    return True
