"""Parallel chunked reads land the file's exact bytes, with O_DIRECT or, where it is refused, without."""
from __future__ import annotations

import errno
import mmap
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from refengine.store.chunked_read import (ALIGN, FileReader, aligned_empty, drop_page_cache, fault_in_ahead,
                                          read_chunks)

SIZE = 5 * ALIGN * 16 + 3 * ALIGN + 123     # the last chunk neither full nor block-aligned


@pytest.fixture
def data_file(tmp_path: Path) -> tuple[Path, bytes]:
    data = np.random.default_rng(0).integers(0, 256, SIZE, dtype=np.uint8).tobytes()
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    return path, data


def read_all(reader: FileReader, buffer: np.ndarray, chunk: int, threads: int = 3) -> list[int]:
    """Read the whole file in chunks; return the chunk indices in the order they finished."""
    chunks = [(o, min(chunk, SIZE - o)) for o in range(0, SIZE, chunk)]
    finished: list[int] = []
    with ThreadPoolExecutor(threads) as pool:
        for future in read_chunks(reader, buffer, chunks, pool, finished.append):
            future.result()
    assert sorted(finished) == list(range(len(chunks)))
    return finished


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("chunk", [ALIGN, 16 * ALIGN, SIZE])
def test_chunks_land_the_files_bytes(data_file, direct: bool, chunk: int) -> None:
    path, data = data_file
    buffer = aligned_empty(SIZE)
    assert buffer.ctypes.data % ALIGN == 0
    with FileReader(path, direct=direct) as reader:
        read_all(reader, buffer, chunk)
    assert buffer.tobytes() == data


def test_unaligned_buffer_reads_without_direct_io(data_file) -> None:
    path, data = data_file
    buffer = aligned_empty(SIZE + 1)[1:]
    with FileReader(path) as reader:
        read_all(reader, buffer, 16 * ALIGN)
    assert buffer.tobytes() == data


def test_file_system_refusing_direct_io_at_open(data_file, monkeypatch) -> None:
    path, data = data_file
    real_open = os.open

    def no_direct(file, flags, *args, **kwargs):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(file, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_direct)
    buffer = aligned_empty(SIZE)
    with FileReader(path) as reader:
        assert not reader.direct
        read_all(reader, buffer, 16 * ALIGN)
    assert buffer.tobytes() == data


def test_file_system_refusing_direct_io_at_read(data_file, monkeypatch) -> None:
    """Some file systems accept O_DIRECT at open and fail the read with EINVAL: fall back for good."""
    path, data = data_file
    real_preadv = os.preadv
    with FileReader(path) as reader:
        assert reader.direct
        direct_fd = reader._direct_fd

        def refuse(fd, buffers, offset):
            if fd == direct_fd:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_preadv(fd, buffers, offset)

        monkeypatch.setattr(os, "preadv", refuse)
        buffer = aligned_empty(SIZE)
        read_all(reader, buffer, 16 * ALIGN, threads=1)
        assert not reader.direct
    assert buffer.tobytes() == data


def test_reading_past_the_end_says_where(data_file) -> None:
    path, _ = data_file
    with FileReader(path) as reader, pytest.raises(EOFError, match=f"ends at byte {SIZE}, expected {SIZE + 10}"):
        reader.read_into(aligned_empty(SIZE + 10), 0)


def test_page_cache_can_be_dropped(data_file) -> None:
    path, _ = data_file
    assert drop_page_cache(path)


def resident_anonymous_bytes() -> int:
    with open("/proc/self/status") as status:
        kib = next(line.split()[1] for line in status if line.startswith("RssAnon:"))
    return int(kib) * 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pages are faulted in ahead on Linux only")
def test_pages_are_faulted_in_ahead_of_the_reads() -> None:
    nbytes = 64 << 20
    # fresh from the kernel, no page mapped yet (the heap may hold resident memory it reuses)
    buffer = np.frombuffer(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS), dtype=np.uint8)
    before = resident_anonymous_bytes()
    thread = fault_in_ahead(buffer, [(offset, 16 << 20) for offset in range(0, nbytes, 16 << 20)])
    thread.join(timeout=30)
    assert resident_anonymous_bytes() - before > 0.9 * nbytes


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pages are faulted in ahead on Linux only")
def test_faulting_in_a_buffer_the_call_refuses_stops_quietly(data_file) -> None:
    """madvise wants a page-aligned start: the thread gives up and the reads still land every byte."""
    path, data = data_file
    buffer = aligned_empty(SIZE + 1)[1:]
    thread = fault_in_ahead(buffer, [(0, SIZE)])
    thread.join(timeout=30)
    assert not thread.is_alive()
    with FileReader(path) as reader:
        read_all(reader, buffer, 16 * ALIGN)
    assert buffer.tobytes() == data
