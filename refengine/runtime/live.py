"""The live executor: the SLINFER scheduler's decisions carried out on real devices.

The scheduler (`scheduler/`, the same code the simulator drives) sees events and returns actions;
this module is the loop around it for real hardware. It runs on the asyncio loop and never runs
model code there: every step, resize and eviction is a job on the device's worker thread, which
reports back with a measured duration as the next event. A load is two such jobs, its start and the
engine's construction, with the model store's threads reading and copying in between while the
device steps other instances (SLINFER loads on a queue of their own).

    HTTP request --RequestArrived--> scheduler --Grant/Assign/Load/KvResize/...--> device workers
    device workers --StepFinished/HandedOver/MemoryDone--> scheduler   tokens --> the request's queue

A job that raises fails its instance, not the device or the server: the instance's memory is freed,
each of its requests gets a `DeviceFailure`, and the scheduler forgets it (`InstanceFailed`).

A request leaves an instance with its state (`SequenceState`: tokens, sampler, text stream), never
with its tokens alone: evicted, it waits in the runtime to be re-prefilled wherever it is placed
again; live-migrated (`Migrate`: the destination rebuilds its KV while the source decodes on, then
`HandOver`), the destination takes it over. Either way the client's stream goes on with the tokens
it would have had: none lost, none repeated.

Time is seconds since start (`time.monotonic`); the scheduler's `next_wakeup()` becomes a loop
timer that sends `Tick` (keep-alive expiry, placement retries).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from functools import partial
from typing import AsyncIterator, Callable

from kernels import backend_for_device, get_kernels
from kernels.thread_tuner import ThreadCountTuner
from refengine.engine.sequence import SamplingParams, SequenceState
from refengine.engine.step_result import StepResult
from refengine.engine.tokenizer import Tokenizer
from refengine.runtime.api import (DeviceFailure, Finished, GenerationEvent, Overloaded, RuntimeStatus,
                                   ShuttingDown, SloOverride)
from refengine.runtime.devices import DeviceWorker, relay
from refengine.runtime.instances import LiveInstance
from refengine.runtime.options import RuntimeOptions
from refengine.runtime.requests import LiveRequest, Migration
from refengine.runtime.setup import set_up
from scheduler import actions as act
from scheduler.core import Scheduler
from scheduler.events import (HandedOver, InstanceFailed, MemoryDone, RequestArrived, RequestCancelled,
                              StepFinished, Tick)
from scheduler.memory import optimistic_budget

log = logging.getLogger("refengine.runtime")


class LiveRuntime:
    def __init__(self, options: RuntimeOptions):
        self.options = options
        self.catalogue = options.catalogue
        self._t0 = time.monotonic()
        self._requests: dict[str, LiveRequest] = {}
        self._instances: dict[str, LiveInstance] = {}
        self._tokenizers: dict[str, Tokenizer] = {}
        self._workers = {device.name: DeviceWorker(device) for device in options.devices}
        # what each CPU device's worker has learnt of thread counts, per weights: a new instance of a
        # model there starts from it instead of trying every count again (`kernels.cpu_threads`)
        self._thread_tuners: dict[tuple[str, str], ThreadCountTuner] = {}
        self._ids = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.counters = {"cold_starts": 0, "preemptions": 0, "drops": 0, "failures": 0, "migrations": 0}
        self.scheduler: Scheduler | None = None
        self._closing = False

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.scheduler is None:
            await asyncio.to_thread(self.prepare)
        for worker in self._workers.values():
            worker.start()

    def prepare(self) -> None:
        """Everything before serving, once (`setup.set_up`); `start` does it unless done already."""
        setup = set_up(self.options, self._now())
        self._files, self._tokenizers, self.store = setup.files, setup.tokenizers, setup.store
        self._specs, self.scheduler, self._tiers = setup.specs, setup.scheduler, setup.tiers

    def shut_down(self) -> None:
        """Refuse new requests and end the running ones now (on the loop thread): each stream gets
        its end (finish reason "abort", or `ShuttingDown` before any token), and the request is then
        cancelled as if its client had gone, which frees its sequence and KV blocks."""
        self._closing = True
        for req in list(self._requests.values()):
            if not req.done:
                req.events.put_nowait(req.cut_short(self._now(), ShuttingDown()))

    async def stop(self) -> None:
        if self._timer:
            self._timer.cancel()
        for worker in self._workers.values():
            await asyncio.to_thread(worker.stop)
        self.store.close()

    # ---------------------------------------------------------------- the Runtime interface
    def tokenizer(self, model: str) -> Tokenizer:
        return self._tokenizers[self.catalogue[model].weights]

    def context_length(self, model: str) -> int:
        return self._specs[self.catalogue[model].name].max_context

    def loaded_models(self) -> set[str]:
        return {inst.model for inst in self._instances.values() if inst.engine is not None}

    async def generate(self, model: str, prompt_ids: list[int], params: SamplingParams,
                       slo: SloOverride | None = None) -> AsyncIterator[GenerationEvent]:
        params.validate(len(prompt_ids), self.context_length(model))
        if self._closing:
            raise ShuttingDown()
        req = LiveRequest(f"req-{next(self._ids)}", model, list(prompt_ids), params, self._now(), asyncio.Queue())
        self._requests[req.id] = req
        slo = slo or SloOverride()
        self._handle(RequestArrived(req.id, model, len(prompt_ids), params.max_tokens, req.arrival,
                                    ttft_slo=slo.ttft_s, tpot_slo=slo.tpot_s))
        try:
            while True:
                event = await req.events.get()
                if isinstance(event, Exception):
                    raise event
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            if not req.done:
                self._cancel(req)

    def status(self) -> RuntimeStatus:
        status = RuntimeStatus(**{k: v for k, v in self.counters.items()},
                               host_cache_budget=self.store.host.budget, host_cache_used=self.store.host.used_bytes)
        for inst in self._instances.values():
            status.instances.append(inst.info())
        for node_id, node in self.scheduler.nodes.items():
            status.device_memory_budget[node_id] = node.spec.memory_bytes
            status.device_memory_optimistic[node_id] = optimistic_budget(node)
            status.device_memory_actual[node_id] = sum(i.memory_bytes for i in self._instances.values()
                                                       if i.node == node_id)
        return status

    # ---------------------------------------------------------------- the scheduler loop
    def _now(self) -> float:
        return time.monotonic() - self._t0

    def _handle(self, event) -> None:
        """Feed one event to the scheduler and carry out what it decides (on the loop thread)."""
        for action in self.scheduler.handle(event, self._now()):
            self._carry_out(action)
        self._arm_timer()

    def _arm_timer(self) -> None:
        wake = self.scheduler.next_wakeup()
        if self._timer:
            self._timer.cancel()
            self._timer = None
        if wake is not None:
            delay = max(0.0, wake - self._now())
            self._timer = self._loop.call_later(delay, lambda: self._handle(Tick()))

    def _post(self, fn, *args) -> None:
        """From a worker thread: run fn(*args) on the loop thread."""
        self._loop.call_soon_threadsafe(fn, *args)

    def _carry_out(self, action) -> None:
        if isinstance(action, act.CreateInstance):
            self._instances[action.instance] = LiveInstance(
                action.instance, action.node, action.model, self.catalogue[action.model].weights)
        elif isinstance(action, act.ReleaseInstance):
            self._instances.pop(action.instance, None)
        elif isinstance(action, act.Grant):
            self._run_grant(action)
        elif isinstance(action, act.Assign):
            self._assign(action)
        elif isinstance(action, act.Migrate):
            self._migrate(action)
        elif isinstance(action, act.HandOver):
            self._hand_over(action)
        elif isinstance(action, (act.Load, act.Unload, act.KvResize, act.Evict)):
            self._memory_action(action)
        elif isinstance(action, act.Drop):
            self._drop(action)
        elif isinstance(action, act.ColdStartGrace):
            if (req := self._requests.get(action.request_id)) is not None:    # re-placed: the latest wait
                req.cold_start, req.cold_start_grace_s = True, action.seconds
                self.counters["cold_starts"] += 1

    def _submit(self, inst: LiveInstance, job: Callable[[], None]) -> None:
        """Run `job` on the instance's device thread. Once a job of the instance failed, its later
        jobs are skipped: their events would name an instance the scheduler has forgotten."""
        def run() -> None:
            if not inst.failed:
                job()

        self._workers[inst.node].submit(run, partial(self._job_failed, inst))

    # ---------------------------------------------------------------- actions
    def _run_grant(self, grant: act.Grant) -> None:
        inst = self._instances[grant.instance]
        if grant.kind == "prefill":
            self._send_new_tokens(inst)

        def job() -> None:
            for i in range(grant.iterations):
                result = inst.step(grant.kind)
                last = result is None or i == grant.iterations - 1
                self._post(self._step_done, inst, grant, result, inst.kv_blocks_used, last)
                if result is None:
                    return

        self._submit(inst, job)

    def _step_done(self, inst: LiveInstance, grant: act.Grant, result: StepResult | None,
                   kv_blocks_used: int, grant_done: bool) -> None:
        """`kv_blocks_used` is read on the device thread right after the step: by now that thread
        may be running the grant's next iteration."""
        sequences, finished = self._deliver(inst, result)
        self._handle(StepFinished(inst.name, grant.grant_id, grant.kind, sequences, finished,
                                  kv_blocks_used, result.elapsed_s if result else 0.0, grant_done))

    def _deliver(self, inst: LiveInstance, result: StepResult | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Put a step's tokens and endings (if it ran) on their requests' streams; return the ids of
        the requests that got a token, and of those that ended."""
        if result is None:
            return (), ()
        sequences, finished = [], []
        now = self._now()
        for token in result.tokens:
            req = self._requests.get(inst.request_of(token.seq_id))
            if req is None:
                continue
            sequences.append(req.id)
            req.stream(token, now)
        for done in result.finished:
            req = self._requests.pop(inst.forget(done.seq_id), None)
            if req is None:
                continue
            finished.append(req.id)
            req.end(req.finished(done.reason.value, now))
        self.counters["preemptions"] += len(result.preempted)
        return tuple(sequences), tuple(finished)

    def _assign(self, assign: act.Assign) -> None:
        req = self._requests.get(assign.request_id)
        if req is None:
            return
        inst = self._instances[assign.instance]
        req.instance = assign.instance
        seq_id = req.seq_id = next(self._ids)
        state, req.state = req.state, None
        if state is not None:                       # evicted: re-prefilled with all it had, then goes on
            self._submit(inst, lambda: inst.adopt(seq_id, req.id, state))
        else:
            self._submit(inst, lambda: inst.add(seq_id, req.id, req.prompt_ids, req.params))

    def _migrate(self, migrate: act.Migrate) -> None:
        """Live migration (ServerlessLLM §4): the destination rebuilds the request's KV from the
        tokens it has now, as prefill work that yields nothing, while the source decodes on."""
        req = self._requests.get(migrate.request_id)
        if req is not None:
            req.migration = Migration(migrate.destination, next(self._ids))
            self._send_new_tokens(self._instances[migrate.destination])

    def _send_new_tokens(self, dest: LiveInstance) -> None:
        """Send each rebuild on `dest` the tokens its request has made since the last sending: at the
        `Migrate`, and again before each prefill there, so that a destination that loaded first
        rebuilds up to the latest token and the hand-over has only the rebuild's own to catch up."""
        for req in self._requests.values():
            moving = req.migration
            if moving is not None and moving.destination == dest.name and moving.source is None:
                tokens = (req.prompt_ids + req.output_ids)[moving.sent:]
                if tokens:
                    moving.sent += len(tokens)
                    self._submit(dest, partial(dest.prefetch, moving.seq_id, req.id, tokens))

    def _hand_over(self, handover: act.HandOver) -> None:
        """The source lets the request go between its steps and the destination takes it over,
        prefilling the tokens made since the rebuild (and making the next one from that pass),
        before any step it is granted next (`relay`). A client that left before the take-over
        leaves nothing on the destination; one leaving later is aborted there by the job
        `_cancel` queues behind it."""
        req = self._requests.get(handover.request_id)
        moving = req.migration if req is not None else None
        if moving is None or moving.destination != handover.destination:
            return                                  # cancelled meanwhile (`_cancel` dropped the rebuild)
        source, dest = self._instances[handover.source], self._instances[handover.destination]
        moving.source, req.instance, req.seq_id = source.name, dest.name, moving.seq_id

        def export() -> SequenceState | None:
            return None if source.failed else source.evict((req.id,)).get(req.id)

        def take_over(state: SequenceState | None) -> None:
            if dest.failed:
                return
            moved, caught_up = state is not None and not req.done, None
            if moved:
                caught_up = dest.take_over(moving.seq_id, req.id, state)
            else:       # the source failed first, or the client left since: it ended; drop the rebuild
                dest.abort_request(req.id)
            self._post(self._taken_over, dest, req, moving, moved, caught_up, dest.kv_blocks_used)

        relay(self._workers[source.node], self._workers[dest.node], export, take_over,
              partial(self._job_failed, source), partial(self._job_failed, dest))

    def _taken_over(self, dest: LiveInstance, req: LiveRequest, moving: Migration, moved: bool,
                    caught_up: StepResult | None, kv_blocks_used: int) -> None:
        """Counted once the destination holds the request, with the token its catch-up made (and the
        KV it held then, read on its device thread, as `_step_done`'s)."""
        if req.migration is moving:
            req.migration = None
        self.counters["migrations"] += moved
        if moved:
            produced, finished = self._deliver(dest, caught_up)
            self._handle(HandedOver(dest.name, req.id, bool(produced), bool(finished), kv_blocks_used,
                                    caught_up.elapsed_s if caught_up is not None else 0.0))

    def _memory_action(self, action) -> None:
        inst = self._instances[action.instance]
        if isinstance(action, act.Load):
            self._load(inst, action)
            return
        if isinstance(action, act.Evict):           # (on a migration's destination: drops its rebuild)
            evicted = [req for r in action.requests
                       if (req := self._requests.get(r)) is not None and req.instance == inst.name]
            for req in evicted:
                req.instance = None
            self.counters["preemptions"] += len(evicted)

        def job() -> None:
            started = time.perf_counter()
            states = {}
            if isinstance(action, act.Unload):
                inst.unload()
            elif isinstance(action, act.KvResize):
                inst.resize(action.blocks)
            else:
                states = inst.evict(action.requests)
            self._post(self._memory_done, inst, action, states, time.perf_counter() - started)

        self._submit(inst, job)

    def _load(self, inst: LiveInstance, load: act.Load) -> None:
        kernels = get_kernels(backend_for_device(inst.node, self.options.backend), inst.node)
        tuner = (self._thread_tuners.setdefault((inst.node, inst.weights), ThreadCountTuner())
                 if kernels.name == "cpu" else None)      # only the Numba backend sets thread counts
        inst.load(self.store, self._files[inst.weights], kernels, self._tokenizers[inst.weights], tuner,
                  submit=partial(self._submit, inst),
                  done=lambda seconds: self._post(self._memory_done, inst, load, {}, seconds))

    def _memory_done(self, inst: LiveInstance, action, states: dict[str, SequenceState], seconds: float) -> None:
        """An evicted request keeps its state until it is placed again (before the scheduler, which
        may place it at once, hears of it)."""
        for request_id, state in states.items():
            if (req := self._requests.get(request_id)) is not None:
                req.state = state
        for change in self._tiers.changes():         # a load may have filled or evicted host entries
            self._handle(change)
        self._handle(MemoryDone(inst.name, action.action_id, seconds))

    def _drop(self, drop: act.Drop) -> None:
        req = self._requests.pop(drop.request_id, None)
        if req is None:
            return
        self.counters["drops"] += 1
        req.end(req.cut_short(self._now(), Overloaded(f"the request cannot meet its SLO now: {drop.reason}",
                                                      retry_after_s=1.0)))

    def _cancel(self, req: LiveRequest) -> None:
        """The client went away: stop the sequence on its device, then tell the scheduler."""
        req.done = True
        self._requests.pop(req.id, None)
        moving = req.migration
        if moving is not None and moving.source is None and moving.destination in self._instances:
            dest = self._instances[moving.destination]          # its rebuild, before any hand-over
            self._submit(dest, lambda: dest.abort_request(req.id))
        if req.instance is None or req.instance not in self._instances:
            self._handle(RequestCancelled(req.id))
            return
        inst = self._instances[req.instance]

        def job() -> None:
            inst.abort_request(req.id)
            self._post(self._handle, RequestCancelled(req.id))

        self._submit(inst, job)

    def _job_failed(self, inst: LiveInstance, error: Exception) -> None:
        """On the device thread, at once: free the instance's memory before the device's next job."""
        inst.fail()
        self._post(self._instance_failed, inst, error)

    def _instance_failed(self, inst: LiveInstance, error: Exception) -> None:
        """End every request the instance held with a DeviceFailure, then tell the scheduler."""
        log.error("a job on %s (%s on %s) failed; its requests end with an error", inst.name, inst.model,
                  inst.node, exc_info=error)
        self.counters["failures"] += 1
        ended = [req for req in self._requests.values()   # held, or being handed over from it
                 if req.instance == inst.name or (req.migration and req.migration.source == inst.name)]
        for req in ended:
            del self._requests[req.id]
            req.end(DeviceFailure(f"{inst.node} failed while serving {inst.model}: {type(error).__name__}: {error}"))
        self._handle(InstanceFailed(inst.name, tuple(req.id for req in ended)))
