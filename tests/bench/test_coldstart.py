"""`bench coldstart`'s cases on a tiny packed model: each run of a store case reaches its first token
and says how long after the last weight was resident it came."""
from __future__ import annotations

import time

import pytest

from kernels import get_kernels
from refengine.bench import coldstart as cs
from refengine.store.model_store import ModelStore
from tests.store.tiny_packed import write_tiny_model

KERNELS = get_kernels("reference")
PROMPT = [5, 9, 2, 7, 11]


@pytest.mark.parametrize("from_host", [False, True], ids=["disk", "host-cache"])
@pytest.mark.parametrize("execute_while_load", [False, True], ids=["wait", "execute-while-load"])
def test_each_run_records_the_first_token_after_the_last_weight(tmp_path, from_host, execute_while_load):
    files = write_tiny_model(tmp_path, "tiny")
    store = ModelStore(tmp_path, host_budget=1 << 30)
    after_load: list[float] = []
    request, make_cold = cs.store_case(store, files, KERNELS, "cpu", PROMPT, execute_while_load, from_host,
                                       after_load)
    runs = []
    for _ in range(2):
        make_cold()
        started = time.perf_counter()
        request()
        runs.append(time.perf_counter() - started)
    store.close()
    assert len(after_load) == 2
    assert all(0 <= after <= run for after, run in zip(after_load, runs))
