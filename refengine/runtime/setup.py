"""What a live runtime sets up before it serves, once: weights, tokenizers, the model store with its
measured tier bandwidths, a latency table per (weights, hardware), kernels warmed up on each device,
and the scheduler.

It runs before the server accepts requests (`LiveRuntime.prepare`), so a damaged model cache is an
error at start-up, and the first cold start finds its weights in the host cache.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial

from kernels import BF16_WEIGHTS, backend_for_device, get_kernels, keeps_bf16_copies
from models.config import LlamaConfig
from models.llama import LlamaModel
from refengine.engine.loader import ensure_prepared, with_fast_decode
from refengine.engine.tokenizer import Tokenizer
from refengine.runtime.devices import DeviceSpec
from refengine.runtime.model_tiers import (HOST, TierReports, describe, host_allocator, measure_disk_to_host,
                                          measure_host_to_device)
from refengine.runtime.options import RuntimeOptions, scheduler_config
from refengine.runtime.profile import cached_table, machine_of, warm_up
from refengine.store.cache import ModelFiles, model_home
from refengine.store.model_store import ModelStore
from scheduler.core import Scheduler
from scheduler.costmodel import CostModel, LatencyTable
from scheduler.kv import floor_blocks
from scheduler.slo import SloPolicy
from scheduler.specs import LoadBandwidths, ModelSpec, NodeSpec

log = logging.getLogger("refengine.runtime")


class ModelTooLarge(ValueError):
    """No device may hold a catalogue model: its requests could never be placed, and would only be
    refused one by one as overloaded, so the runtime refuses to start instead."""


@dataclass
class RuntimeSetup:
    files: dict[str, ModelFiles]          # by weights name
    tokenizers: dict[str, Tokenizer]      # by weights name
    store: ModelStore
    specs: dict[str, ModelSpec]           # by served name
    scheduler: Scheduler
    tiers: TierReports


def set_up(options: RuntimeOptions, now: float) -> RuntimeSetup:
    """Prepare weights and load tokenizers; measure the tiers' bandwidths (filling the host cache);
    profile each (weights, hardware) and warm its kernels up; build the scheduler and tell it where
    each model is."""
    catalogue = options.catalogue
    files = {w: ensure_prepared(w, options.home) for w in catalogue.weights}
    copies_lm_head = options.backend == BF16_WEIGHTS
    specs = [_model_spec(name, catalogue[name].weights, files[catalogue[name].weights], copies_lm_head)
             for name in catalogue.names]
    _check_every_model_fits(specs, options.devices)
    store = ModelStore(options.home, options.host_cache_bytes, allocate=host_allocator(options.devices))
    disk_to_host = measure_disk_to_host(store, files.values())
    profiles = (options.home or model_home()) / "profiles"
    tables, nodes = [], []
    for device in options.devices:
        backend = backend_for_device(device.name, options.backend)
        hardware = f"{device.kind}-{backend}"
        kernels = get_kernels(backend, device.name)
        for weights, f in files.items():
            tables.append(cached_table(partial(_profiled_model, store, f, kernels, device.name), weights, hardware,
                                       profiles, machine_of(device.name), options.profile_grid))
            if kernels.name != "reference":      # numpy's kernels have nothing to compile
                seconds = warm_up(_profiled_model(store, f, kernels, device.name))
                log.info("%s: %s's kernels warmed up in %.1f s", device.name, weights, seconds)
        bandwidths = LoadBandwidths(disk_to_host, measure_host_to_device(store, files.values(), device, kernels))
        nodes.append(NodeSpec(device.name, device.kind, hardware, device.memory_bytes, host=HOST,
                              bandwidths=bandwidths, bf16_copies=keeps_bf16_copies(kernels)))
        log.info("%s: weights load at %s", device.name, describe(bandwidths))
    unique = {(t.profile, t.hardware): t for t in tables}
    config = scheduler_config(options.scheduler, options.keep_alive_s, set(files), options.slo, options.migration)
    for table in unique.values():
        _warn_if_slower_than_the_slo(table, config.slo)
    scheduler = Scheduler(specs, nodes, CostModel(unique.values()), config)
    tiers = TierReports(store, catalogue)
    for change in tiers.changes():
        scheduler.handle(change, now)
    return RuntimeSetup(files, {w: Tokenizer(f) for w, f in files.items()}, store, {s.name: s for s in specs},
                        scheduler, tiers)


def _model_spec(name: str, weights: str, files: ModelFiles, copies_lm_head: bool) -> ModelSpec:
    """`copies_lm_head`: decode reads bf16 weights, so the lm_head's copy joins the projections'."""
    config = LlamaConfig.from_json(files.config)
    copied = config.projection_parameters + (config.vocab_size * config.hidden_size if copies_lm_head else 0)
    return ModelSpec(name, weights, files.weights.stat().st_size, config.kv_bytes_per_token, 16,
                     config.max_position_embeddings, bf16_copy_bytes=2 * copied)


def _check_every_model_fits(specs: list[ModelSpec], devices: list[DeviceSpec]) -> None:
    """Each model's smallest instance must fit the memory some device may use: its weights and the
    KV the scheduler keeps for any live instance (one request of the full context, `kv.floor_blocks`)."""
    largest = max(d.memory_bytes for d in devices)
    for spec in specs:
        need = spec.weight_bytes + floor_blocks(spec) * spec.block_bytes
        if need > largest:
            budgets = ", ".join(f"{d.name} {d.memory_bytes / 2**20:.0f} MiB" for d in devices)
            raise ModelTooLarge(f"{spec.name} needs {need / 2**20:.0f} MiB (weights, and KV for one request of "
                                f"its {spec.max_context}-token context), more than any device may use "
                                f"({budgets}); raise --cpu-memory or --gpu-memory")


def _warn_if_slower_than_the_slo(table: LatencyTable, slo: SloPolicy) -> None:
    """Say at start-up when the profiled hardware cannot decode one sequence within the TPOT SLO: the
    scheduler will then refuse (429) every request for those weights that brings no SLO of its own,
    which otherwise looks like a broken server (a slow device, or a machine busy while profiling)."""
    step = table.decode(1, table.decode_rows[0].context)
    if step > slo.tpot_slo:
        log.warning("%s on %s: one decode step takes %.0f ms (profiled), above the %.0f ms TPOT SLO; "
                    "requests without their own SLO will be refused. Re-profile on a quiet machine "
                    "(`python cli.py bench profile --force`) or pass an SLO per request.",
                    table.profile, table.hardware, step * 1e3, slo.tpot_slo * 1e3)


def _profiled_model(store: ModelStore, files: ModelFiles, kernels, device: str) -> LlamaModel:
    """The model to measure a latency table on or warm the kernels up with, as serving runs it but
    without the thread tuner (as in `profile.device_profile`: its tries of other counts would land
    in the table). Its lease ends at once: the arrays keep their memory for as long as the profile
    runs, and no other load competes for the host cache meanwhile."""
    with store.load(files, kernels, device) as lease:
        return with_fast_decode(lease.load.wait().model, tune_threads=False)
