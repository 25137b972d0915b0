"""The model store on tiny random models: tiers it reports, loads through the host cache equal to
the weights, pinning while a CPU model uses its entry, LRU across models, failures that leave no trace."""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from kernels import get_kernels
from models.llama import LlamaModel, LlamaWeights
from models.random_weights import TINY, random_tensors
from refengine.store.cache import ModelCacheError, ModelFiles
from refengine.store.chunked_read import FileReader
from refengine.store.model_store import DEVICE, DISK, HOST, ModelStore, Residency
from tests.store.tiny_packed import write_tiny_model

KERNELS = get_kernels("reference")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    for i, name in enumerate("abc"):
        write_tiny_model(tmp_path, name, seed=i)
    return tmp_path


@pytest.fixture
def nbytes(home: Path) -> int:
    return ModelStore(home).residency("a").nbytes


def files(home: Path, name: str) -> ModelFiles:
    return ModelFiles(home / "models" / name)


def logits(model: LlamaModel) -> np.ndarray:
    """Logits of one short prompt, the whole forward pass."""
    from refengine.engine.instance import Instance
    from refengine.engine.sequence import SamplingParams
    instance = Instance(model, num_blocks=4)
    seq = instance.add_request([5, 9, 2, 7], SamplingParams(max_tokens=4, ignore_eos=True))
    while instance.step() is not None:
        pass
    return np.array(seq.output_ids)


def test_loaded_model_equals_its_weights(home: Path) -> None:
    store = ModelStore(home, host_budget=1 << 30)
    with store.load(files(home, "b"), KERNELS) as lease:
        lease.load.wait()
        reference = LlamaModel(TINY, LlamaWeights.from_hf(random_tensors(TINY, seed=1), TINY, KERNELS), KERNELS)
        assert np.array_equal(lease.model.weights.lm_head, reference.weights.lm_head)
        assert np.array_equal(logits(lease.model), logits(reference))


def test_tiers_as_a_model_comes_and_goes(home: Path, nbytes: int) -> None:
    store = ModelStore(home, host_budget=1 << 30)
    assert store.residency("a").tier == DISK
    lease = store.load(files(home, "a"), KERNELS, device="cpu")
    lease.load.wait()
    assert lease.load.source == "disk"
    assert store.residency("a") == Residency(DEVICE, nbytes, ("cpu",))
    assert store.host.pins("a") == 1              # the CPU model's weights are views of the entry
    lease.release()
    assert store.residency("a").tier == HOST and store.host.pins("a") == 0
    with store.load(files(home, "a"), KERNELS) as again:
        assert again.load.wait().source == "host" and again.load.read_s == 0
        host = store.host.acquire("a")
        assert np.shares_memory(again.model.weights.embed, host)   # no copy on a CPU backend
        store.host.release("a")


def test_without_room_in_the_cache_the_model_still_loads(home: Path, nbytes: int) -> None:
    store = ModelStore(home, host_budget=nbytes + nbytes // 2)
    with store.load(files(home, "a"), KERNELS) as first:
        with store.load(files(home, "b"), KERNELS) as second:   # a is pinned: b gets a private buffer
            second.load.wait()
            assert store.host.keys() == ["a"] and not second.pins_host
        assert store.residency("b").tier == DISK
    assert store.residency("a").tier == HOST and first.load.source == "disk"


def test_least_recently_used_model_leaves_the_host_cache(home: Path, nbytes: int) -> None:
    store = ModelStore(home, host_budget=2 * nbytes)
    for name in "aba":
        store.load(files(home, name), KERNELS).release()
    store.load(files(home, "c"), KERNELS).release()
    assert store.host.keys() == ["a", "c"]
    assert [store.residency(n).tier for n in "abc"] == [HOST, DISK, HOST]


def test_concurrent_loads_of_one_model_read_it_once(home: Path, monkeypatch) -> None:
    reads = []
    real_read = FileReader.read_into
    monkeypatch.setattr(FileReader, "read_into", lambda self, buf, off: (reads.append(off), real_read(self, buf, off)))
    store = ModelStore(home, host_budget=1 << 30)
    leases = []
    threads = [threading.Thread(target=lambda: leases.append(store.load(files(home, "a"), KERNELS))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for lease in leases:
        lease.load.wait()
    assert len(reads) == len(set(reads))        # every chunk read once
    assert sorted(lease.load.source for lease in leases) == ["disk", "host", "host", "host"]
    for lease in leases:
        lease.release()
    assert store.host.pins("a") == 0


def test_a_failed_load_leaves_nothing_behind(home: Path) -> None:
    tiny = files(home, "a")
    data = bytearray(tiny.packed.read_bytes())
    data[-1] ^= 0xFF
    tiny.packed.write_bytes(data)
    store = ModelStore(home, host_budget=1 << 30)
    lease = store.load(tiny, KERNELS)
    with pytest.raises(ModelCacheError, match="fail their checksum"):
        lease.model.weights.arrival.wait("lm_head")     # execute-while-load sees the error too
    with pytest.raises(ModelCacheError):
        lease.load.wait()
    lease.release()
    assert store.host.keys() == [] and store.residency("a").tier == DISK


def test_a_dropped_model_frees_its_buffer_at_once(home: Path) -> None:
    """No reference cycle keeps a model's bytes alive until the garbage collector runs (a reader
    thread finishing its last callback may hold them for a moment)."""
    import gc
    import time
    import weakref
    store = ModelStore(home)                      # no host cache: the buffer is the model's alone
    lease = store.load(files(home, "a"), KERNELS)
    lease.load.wait()
    buffer = weakref.ref(lease.load.host)
    gc.disable()
    try:
        lease.release()
        del lease
        deadline = time.monotonic() + 2
        while buffer() is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert buffer() is None
    finally:
        gc.enable()
