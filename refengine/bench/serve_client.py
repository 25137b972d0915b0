"""The client side of `bench serve`: an open-loop trace replay with the official OpenAI client, and a
sampler of the server's `/metrics` while it runs.

Open loop: each request goes out at its trace time whatever became of the earlier ones, as the
trace's users would send them; its arrival is that scheduled time, so a client that falls behind
cannot flatter the server. Requests stream, so the first-token and finish times are taken where a
user sees them. Outcomes a user would call failures are kept with the reason, never retried:
`overloaded` (HTTP 429, the scheduler's drop), `aborted` (dropped after some tokens), `timeout` (not
done by the end of the drain window), `error: ...` (anything else).
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Sequence

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

from refengine.bench.serve_workload import prompt_ids
from refengine.sim.metrics import RequestRecord
from refengine.sim.workload import TraceRequest, Workload

SAMPLE_EVERY_S = 0.5


async def replay(base_url: str, workload: Workload, passage: Sequence[int], drain_s: float) -> list[RequestRecord]:
    """Send every request of `workload` on time; wait at most `drain_s` after the last for the stragglers.

    A record's `output_tokens` is what the server produced (its usage figure): `ignore_eos` asks
    for the trace's length, and a request cut short says so in `dropped`.
    """
    deadline = max((r.arrival for r in workload.requests), default=0.0) + drain_s
    async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0,
                                  timeout=deadline + 60) as client:
        t0 = time.perf_counter()
        return list(await asyncio.gather(*(
            _request(client, r, prompt_ids(passage, r.input_tokens, k), t0, deadline)
            for k, r in enumerate(workload.requests))))


async def _request(client: openai.AsyncOpenAI, request: TraceRequest, prompt: list[int], t0: float,
                   deadline: float) -> RequestRecord:
    record = RequestRecord(request.model, request.arrival, request.input_tokens, 0)
    await asyncio.sleep(max(0.0, t0 + request.arrival - time.perf_counter()))
    try:
        await asyncio.wait_for(_stream(client, request, prompt, t0, record),
                               timeout=max(0.0, t0 + deadline - time.perf_counter()))
    except asyncio.TimeoutError:
        record.dropped = "timeout"
    except openai.RateLimitError:
        record.dropped = "overloaded"
    except openai.APIError as e:
        record.dropped = f"error: {e}"
    return record


async def _stream(client: openai.AsyncOpenAI, request: TraceRequest, prompt: list[int], t0: float,
                  record: RequestRecord) -> None:
    """One streamed completion; the server sends its first chunk with the first token."""
    stream = await client.completions.create(
        model=request.model, prompt=prompt, max_tokens=request.output_tokens, temperature=0.0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    async for chunk in stream:
        now = time.perf_counter() - t0
        if chunk.choices:
            if record.first_token is None:
                record.first_token = now
            if chunk.choices[0].finish_reason is not None:
                record.finish = now
                if chunk.choices[0].finish_reason == "abort":
                    record.dropped = "aborted"
        if chunk.usage is not None:
            record.output_tokens = chunk.usage.completion_tokens
            record.grace = (chunk.usage.model_extra or {}).get("cold_start_grace_s", 0.0)


COUNTERS = ("cold_starts", "preemptions")


@dataclass
class ServerSamples:
    """Peaks of the runtime's gauges over the run, and how far its counters moved from the first
    scrape to the last (so the warm-up's cold start is not counted)."""

    peak_device_memory_bytes: float = 0.0     # refengine_device_memory_actual_bytes, all devices
    peak_instances_loaded: float = 0.0
    first: dict[str, float] | None = None
    last: dict[str, float] = field(default_factory=dict)

    def add(self, exposition: str) -> None:
        totals: dict[str, float] = {}       # each sample summed over its labels (devices, instances)
        for family in text_string_to_metric_families(exposition):
            for sample in family.samples:
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
        self.peak_device_memory_bytes = max(self.peak_device_memory_bytes,
                                            totals.get("refengine_device_memory_actual_bytes", 0.0))
        self.peak_instances_loaded = max(self.peak_instances_loaded, totals.get("refengine_instances_loaded", 0.0))
        self.last = {name: totals.get(f"refengine_{name}_total", 0.0) for name in COUNTERS}
        self.first = self.first if self.first is not None else self.last

    def counted(self, name: str) -> float:
        """How much counter `name` grew over the sampled run."""
        return self.last.get(name, 0.0) - (self.first or {}).get(name, 0.0)


async def sample_metrics(http: httpx.AsyncClient, samples: ServerSamples, stop: asyncio.Event) -> None:
    """Scrape `/metrics` every SAMPLE_EVERY_S until `stop` is set, and once more after."""
    while True:
        stopping = stop.is_set()
        samples.add((await http.get("/metrics")).text)
        if stopping:
            return
        try:
            await asyncio.wait_for(stop.wait(), SAMPLE_EVERY_S)
        except asyncio.TimeoutError:
            pass


async def replay_sampled(base_url: str, workload: Workload, passage: Sequence[int],
                         drain_s: float) -> tuple[list[RequestRecord], ServerSamples]:
    """`replay` with `/metrics` sampled beside it; the first scrape is taken before the first request."""
    samples, stop = ServerSamples(), asyncio.Event()
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as http:
        samples.add((await http.get("/metrics")).text)
        sampler = asyncio.create_task(sample_metrics(http, samples, stop))
        try:
            records = await replay(base_url, workload, passage, drain_s)
        finally:
            stop.set()
            await sampler
    return records, samples
