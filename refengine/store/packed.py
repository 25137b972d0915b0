"""The loading-optimized checkpoint (ServerlessLLM §3): one data file of raw tensor bytes plus an index.

Safetensors is a fine interchange format, but loading it means parsing a header, reading ~270 tensors
one by one and then copying them again to stack q|k|v and gate|up. Here the tensors are stored already
in the engine's final layout (`models.llama.final_layout`), in the order the forward pass uses them,
each at an `ALIGN`-byte offset, so a load is a few large sequential reads into one preallocated
buffer and every weight is a view of that buffer: no parsing, no per-tensor copies, and direct I/O
works (offsets and lengths are block-aligned; the file is padded to `ALIGN`).

`tensor_index.json` maps each name to (offset, nbytes, shape, dtype, part), lists the parts
(byte ranges the forward pass waits for, see `models.llama.WeightArrival`) and one CRC-32 per
`chunk_bytes` of the file. The checksums are checked on first use, chunk by chunk as the load reads
them; afterwards a marker (`ModelFiles.packed_verified`) that records the file's identity (size,
inode, mtime, ctime) stands for them, so any rewrite of the file sends it back through the checksums.
"""
from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from refengine.store.cache import PREPARE_HINT, ModelCacheError, ModelFiles
from refengine.store.chunked_read import ALIGN   # every tensor offset and the file size: direct reads need it

FORMAT = "refengine-packed"
VERSION = 1
CHUNK_BYTES = 16 << 20         # checksum granularity, and the unit of a parallel read (ServerlessLLM uses 32 MB)


@dataclass(frozen=True)
class TensorEntry:
    offset: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: str
    part: str


@dataclass(frozen=True)
class Part:
    """A byte range of the file that the forward pass waits for as one piece."""

    name: str
    start: int
    end: int


@dataclass(frozen=True)
class PackedIndex:
    size: int                  # bytes of the data file, a multiple of ALIGN
    chunk_bytes: int
    crc32: tuple[int, ...]     # one per chunk
    tensors: dict[str, TensorEntry]
    parts: tuple[Part, ...]

    @property
    def chunks(self) -> list[tuple[int, int]]:
        """(offset, nbytes) of every chunk, in file order."""
        return [(start, min(self.chunk_bytes, self.size - start)) for start in range(0, self.size, self.chunk_bytes)]

    def chunks_of(self, part: Part) -> range:
        """Indices of the chunks a part's bytes lie in (empty for an empty part)."""
        if part.end <= part.start:
            return range(0)
        return range(part.start // self.chunk_bytes, (part.end - 1) // self.chunk_bytes + 1)

    def views(self, buffer) -> dict:
        """Every tensor as a view of `buffer` (a flat uint8 numpy or cupy array holding the file)."""
        return {name: buffer[e.offset:e.offset + e.nbytes].view(e.dtype).reshape(e.shape)
                for name, e in self.tensors.items()}

    def check_chunk(self, path: Path, i: int, data) -> None:
        """Raise unless chunk i's bytes (`data`, a buffer) match their checksum."""
        if zlib.crc32(data) != self.crc32[i]:
            start = i * self.chunk_bytes
            raise ModelCacheError(f"{path} is corrupt (bytes {start}-{start + len(data)} fail their checksum); "
                                  f"{PREPARE_HINT}")


class _ChunkChecksums:
    """CRC-32 of each `chunk_bytes` of a byte stream, fed in pieces of any size."""

    def __init__(self, chunk_bytes: int):
        self.chunk_bytes = chunk_bytes
        self.done: list[int] = []
        self._crc = 0
        self._filled = 0

    def update(self, data: memoryview) -> None:
        while len(data):
            take = min(len(data), self.chunk_bytes - self._filled)
            self._crc = zlib.crc32(data[:take], self._crc)
            self._filled += take
            data = data[take:]
            if self._filled == self.chunk_bytes:
                self.finish()

    def finish(self) -> None:
        if self._filled:
            self.done.append(self._crc)
            self._crc, self._filled = 0, 0


def write_packed(files: ModelFiles, tensors: Iterable[tuple[str, str, np.ndarray]],
                 chunk_bytes: int = CHUNK_BYTES) -> PackedIndex:
    """Write (part, name, array) triples, parts contiguous, as `files.packed` + `files.packed_index`."""
    entries: dict[str, TensorEntry] = {}
    parts: list[Part] = []
    sums = _ChunkChecksums(chunk_bytes)
    offset = 0
    with open(files.packed, "wb") as out:
        def write(data: memoryview) -> None:
            nonlocal offset
            out.write(data)
            sums.update(data)
            offset += len(data)

        def pad() -> None:
            write(memoryview(bytes(-offset % ALIGN)))

        for part, name, array in tensors:
            if not parts or parts[-1].name != part:
                if any(p.name == part for p in parts):
                    raise ValueError(f"part {part!r} is not contiguous in the tensor order")
                parts.append(Part(part, offset, offset))
            array = np.ascontiguousarray(array)
            entries[name] = TensorEntry(offset, array.nbytes, tuple(array.shape), array.dtype.name, part)
            write(memoryview(array).cast("B"))
            pad()
            parts[-1] = Part(part, parts[-1].start, offset)
        sums.finish()
    index = PackedIndex(offset, chunk_bytes, tuple(sums.done), entries, tuple(parts))
    files.packed_index.write_text(json.dumps(_index_json(index)) + "\n")
    return index


def _index_json(index: PackedIndex) -> dict:
    return {
        "format": FORMAT, "version": VERSION, "alignment": ALIGN, "size": index.size,
        "chunk_bytes": index.chunk_bytes, "crc32": list(index.crc32),
        "parts": [[p.name, p.start, p.end] for p in index.parts],
        "tensors": {name: {"offset": e.offset, "nbytes": e.nbytes, "shape": list(e.shape), "dtype": e.dtype,
                           "part": e.part} for name, e in index.tensors.items()},
    }


def read_index(files: ModelFiles) -> PackedIndex:
    """The index, checked against the data file's size: a truncated file fails here, before any read."""
    try:
        raw = json.loads(files.packed_index.read_text())
        if raw.get("format") != FORMAT or raw.get("version") != VERSION:
            raise ValueError(f"not {FORMAT} version {VERSION}")
        index = PackedIndex(
            size=raw["size"], chunk_bytes=raw["chunk_bytes"], crc32=tuple(raw["crc32"]),
            tensors={name: TensorEntry(e["offset"], e["nbytes"], tuple(e["shape"]), e["dtype"], e["part"])
                     for name, e in raw["tensors"].items()},
            parts=tuple(Part(*p) for p in raw["parts"]))
    except FileNotFoundError:
        raise ModelCacheError(f"{files.packed_index} is missing; {PREPARE_HINT}") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ModelCacheError(f"{files.packed_index} is unreadable ({e}); {PREPARE_HINT}") from None
    try:
        size = files.packed.stat().st_size
    except FileNotFoundError:
        raise ModelCacheError(f"{files.packed} is missing; {PREPARE_HINT}") from None
    if size != index.size:
        raise ModelCacheError(f"{files.packed} has {size} bytes, its index expects {index.size} (truncated?); "
                              f"{PREPARE_HINT}")
    return index


def _identity(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]


def is_verified(files: ModelFiles) -> bool:
    """The data file passed its checksums and has not been touched since."""
    try:
        return json.loads(files.packed_verified.read_text()) == _identity(files.packed)
    except (OSError, ValueError):
        return False


def mark_verified(files: ModelFiles) -> None:
    """Record that the data file, as it is now, passed its checksums (best effort: a read-only
    cache just checks again next time)."""
    tmp = files.packed_verified.with_name(f".{files.packed_verified.name}.{os.getpid()}")
    try:
        tmp.write_text(json.dumps(_identity(files.packed)))
        os.replace(tmp, files.packed_verified)
    except OSError:
        tmp.unlink(missing_ok=True)


def verify_packed(files: ModelFiles) -> None:
    """Check every chunk of the data file (unless the marker vouches for it), then mark it."""
    if is_verified(files):
        return
    index = read_index(files)
    scratch = bytearray(index.chunk_bytes)
    with open(files.packed, "rb", buffering=0) as f:
        for i, (offset, nbytes) in enumerate(index.chunks):
            view = memoryview(scratch)[:nbytes]
            if f.readinto(view) != nbytes:
                raise ModelCacheError(f"{files.packed} ends before byte {offset + nbytes}; {PREPARE_HINT}")
            index.check_chunk(files.packed, i, view)
    mark_verified(files)
