"""`CudaUpload`'s bookkeeping, on any machine: a stand-in for the few CuPy calls it makes (device
memory as host bytes, a copy as a memmove, events that complete when waited on) checks that copies
are queued back to back ahead of their confirmations, that chunks are reported in order, that the
views cover the right bytes, and that a failed copy or event fails the load. The real CUDA path
(pinned memory, streams, the weights on an H200) is `test_cuda_upload.py`, marked gpu."""
from __future__ import annotations

import contextlib
import ctypes
import sys
import threading
import types
from pathlib import Path

import numpy as np
import pytest

from refengine.store.arrival import PartArrival
from refengine.store.cuda_upload import CudaUpload
from refengine.store.packed import read_index
from tests.store.tiny_packed import write_tiny_model


class _Pointer:
    """cupy.cuda.MemoryPointer: an offset into a device allocation (here a numpy buffer)."""

    def __init__(self, buffer: np.ndarray, offset: int = 0):
        self.buffer, self.offset = buffer, offset
        self.ptr = buffer.ctypes.data + offset

    def __add__(self, offset: int) -> "_Pointer":
        return _Pointer(self.buffer, self.offset + offset)


class _FakeCupy:
    """What CudaUpload calls, recording the order of copies and confirmations in `log`."""

    uint8 = np.uint8

    def __init__(self, chunks: int, fail_copy: int | None = None, fail_event: int | None = None):
        self.log: list[tuple[str, int]] = []
        self.all_queued = threading.Event()
        self.queued_before_first_wait: bool | None = None
        self._chunks, self._fail_copy, self._fail_event = chunks, fail_copy, fail_event
        self.cuda = types.SimpleNamespace(Stream=self._stream,
                                          runtime=types.SimpleNamespace(memcpyAsync=self._memcpy))

    def empty(self, size: int, dtype):
        return types.SimpleNamespace(data=_Pointer(np.zeros(size, np.uint8)))

    @staticmethod
    def ndarray(shape, dtype, memptr: _Pointer) -> np.ndarray:
        return np.ndarray(shape, dtype, buffer=memptr.buffer, offset=memptr.offset)

    def _memcpy(self, dst: int, src: int, nbytes: int, kind: int, stream: int) -> None:
        copies = sum(1 for what, _ in self.log if what == "copy")
        if copies == self._fail_copy:
            raise RuntimeError("cudaErrorIllegalAddress (fake)")
        ctypes.memmove(dst, src, nbytes)
        self.log.append(("copy", copies))
        if copies + 1 == self._chunks:
            self.all_queued.set()

    def _stream(self, non_blocking: bool):
        fake = self

        class Stream:
            ptr = 0

            def record(self):
                chunk = sum(1 for what, _ in fake.log if what == "copy") - 1
                return types.SimpleNamespace(synchronize=lambda: fake._wait(chunk))
        return Stream()

    def _wait(self, chunk: int) -> None:
        if self.queued_before_first_wait is None:   # a pipelined uploader queues every copy first
            self.queued_before_first_wait = self.all_queued.wait(timeout=5)
        if chunk == self._fail_event:
            raise RuntimeError("cudaErrorLaunchFailure (fake)")
        self.log.append(("done", chunk))


@pytest.fixture
def packed(tmp_path: Path):
    files = write_tiny_model(tmp_path, "tiny")
    index = read_index(files)
    return index, np.fromfile(files.packed, dtype=np.uint8)


def _upload(monkeypatch, index, host, **faults):
    fake = _FakeCupy(len(index.chunks), **faults)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    target = CudaUpload(contextlib.nullcontext())
    arrival = PartArrival(index)
    arrays = target.arrays(index, host)
    for i, (offset, nbytes) in enumerate(index.chunks):
        target.land(i, offset, nbytes, arrival)
    target.close()
    return fake, arrays, arrival


def test_copies_are_queued_back_to_back_and_confirmed_in_order(monkeypatch, packed) -> None:
    index, host = packed
    fake, arrays, arrival = _upload(monkeypatch, index, host)
    assert arrival.wait_all(timeout=10) and arrival.complete
    chunks = range(len(index.chunks))
    assert len(index.chunks) > 3
    assert fake.queued_before_first_wait, "the first confirmation waited before every copy was queued"
    assert [c for what, c in fake.log if what == "copy"] == list(chunks)
    assert [c for what, c in fake.log if what == "done"] == list(chunks)
    for name, expected in index.views(host).items():
        assert np.array_equal(arrays[name], expected), name


@pytest.mark.parametrize("fault", ["fail_copy", "fail_event"])
def test_a_failed_copy_or_event_fails_the_load(monkeypatch, packed, fault) -> None:
    index, host = packed
    _, _, arrival = _upload(monkeypatch, index, host, **{fault: 2})
    with pytest.raises(RuntimeError, match="fake"):
        arrival.wait_all(timeout=10)
    assert not arrival.complete
