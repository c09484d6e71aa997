"""Prometheus metrics of one worker process, served on its own ``/metrics`` port.

Three sources feed one private ``CollectorRegistry``:

- the job coroutines (``lorafleet.worker.serve.jobs``) report each request's start, token deltas
  and result: queue wait, time to first token, inter-token latency, end-to-end latency,
  token counts, outcomes and error codes;
- the engine process reports every step (sequences, adapters and tokens in it, its time);
- at scrape time ``EngineCollector`` reads the engine's own counters and gauges (requests
  running and waiting, adapter slots and tiers, KV-cache usage, preemptions), so the engine
  needs no metrics code of its own.

Every series carries a ``worker`` label (the worker's name), so several workers on one host,
each on its own port, never clash even when scraped through one relabelled target. The
``adapter`` label is bounded by ``AdapterLabels`` (``lorafleet.worker.serve.adapter_labels``):
only the busiest adapters are named, the rest are counted under ``other``. The engine's
counters are exported by ``lorafleet.worker.serve.engine_collector``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import platform
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import TYPE_CHECKING

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    start_http_server,
)
from redis.exceptions import RedisError

from lorafleet.producer.codec import GenerateJob, JobResult
from lorafleet.producer.errors import WORKER_ERROR_CODES
from lorafleet.worker.serve.adapter_labels import BASE, OTHER, AdapterLabels
from lorafleet.worker.serve.background import stop_task
from lorafleet.worker.serve.engine_collector import EngineCollector

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from redis.asyncio import Redis

    from lorafleet.worker.engine.outputs import StepStats
    from lorafleet.worker.process.async_engine import AsyncEngine
    from lorafleet.worker.serve.settings import WorkerConfig

logger = logging.getLogger(__name__)

#: ``outcome`` label values: the finish reason of a completed request, ``error`` for an
#: error result, ``cancelled`` when arq cancelled the job (shutdown re-queue, job timeout).
OUTCOMES = ("stop", "length", "error", "cancelled")

# Latencies of LLM serving span a cache hit on an idle worker (sub-millisecond queue wait) to
# a long generation behind a deep queue (minutes); the job timeout defaults to 10 minutes.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip
# Inter-token latency and step time: one decode step, from a GPU's milliseconds to a
# starved CPU's seconds.
STEP_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1,
    0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
TOKEN_BUCKETS = tuple(float(2**i) for i in range(16))  # 1 .. 32768 tokens
SEQUENCE_BUCKETS = tuple(float(2**i) for i in range(11))  # 1 .. 1024 sequences per step
ADAPTER_BUCKETS = (0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 64.0)
#: The token counters of completed requests (name, help), in ``WorkerMetrics.tokens``
#: order: prompt, generated.
TOKEN_COUNTERS = (
    ("lorafleet_prompt_tokens", "Prompt tokens of completed requests."),
    ("lorafleet_generation_tokens", "Generated tokens of completed requests."),
)
#: The histograms of each engine step (name, help, buckets), in ``WorkerMetrics.step``
#: order: sequences, distinct adapters, tokens, wall time.
STEP_HISTOGRAMS = (
    ("lorafleet_step_sequences", "Sequences in one engine step.", SEQUENCE_BUCKETS),
    ("lorafleet_step_adapters", "Distinct adapters in one engine step.", ADAPTER_BUCKETS),
    (
        "lorafleet_step_tokens",
        "Tokens computed in one engine step (prefill and decode).",
        TOKEN_BUCKETS,
    ),
    ("lorafleet_step_duration_seconds", "Wall time of one engine step.", STEP_BUCKETS),
)

QUEUE_POLL_S = 1.0


class MetricsPortInUseError(RuntimeError):
    """The metrics port is taken, most likely by another worker on the same host."""


@dataclass
class _Request:
    """Timing of one job in progress on this worker."""

    adapter: str | None
    since: float  # Unix time the latency clock starts: enqueue, or job start if unknown
    # Unix time the TTFT clock starts: ``since``, or this run's start for a job run again
    # after its worker died (the dead worker's time is not this run's first token).
    first_token_since: float
    last_token: float | None = None  # monotonic
    cold: bool = False  # its adapter was not held here when the job was queued


class WorkerMetrics:
    """Request and step metrics of one worker, in a private registry.

    Contract: the ``job_*`` methods run on the event loop, one ``job_started`` (optional)
    then any ``job_tokens`` then exactly one of ``job_finished`` / ``job_cancelled`` per
    job id; ``observe_step`` runs as each step's report arrives and never raises for valid stats.
    """

    def __init__(self, worker: str, *, max_adapters: int) -> None:
        self.worker = worker
        self.registry = CollectorRegistry()
        self._requests: dict[str, _Request] = {}
        self.adapters = AdapterLabels(max_adapters, self._remove_adapter)
        self._server: WSGIServer | None = None
        self._queue_task: asyncio.Task[None] | None = None
        self._define()
        self._initialize()
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.registry.register(collector)

    def _define(self) -> None:
        r, w = self.registry, ["worker"]
        self.requests = Counter(
            "lorafleet_requests",
            "Finished requests by adapter (busiest named, the rest `other`) and outcome.",
            [*w, "adapter", "outcome"],
            registry=r,
        )
        self.errors = Counter(
            "lorafleet_request_errors",
            "Requests answered with an error, by code.",
            [*w, "code"],
            registry=r,
        )
        # Prompt and generated tokens of completed requests, by adapter.
        self.tokens = tuple(Counter(*spec, [*w, "adapter"], registry=r) for spec in TOKEN_COUNTERS)
        self.queue_wait = self._histogram(
            "lorafleet_queue_wait_seconds",
            "Time from enqueue (producer clock) until this worker started the job.",
            LATENCY_BUCKETS,
        )
        self.ttft = self._histogram(
            "lorafleet_time_to_first_token_seconds",
            "Time from enqueue (producer clock) until the first token was streamed; for a job "
            "run again after its worker died, from this run's start.",
            LATENCY_BUCKETS,
        )
        self.ttft_cold = self._histogram(
            "lorafleet_time_to_first_token_cold_adapter_seconds",
            "Time to first token of jobs whose adapter this worker did not hold when it first "
            "saw them in the queue (what prefetch shortens).",
            LATENCY_BUCKETS,
        )
        self.itl = self._histogram(
            "lorafleet_inter_token_latency_seconds",
            "Time between successive streamed tokens of a request.",
            STEP_BUCKETS,
        )
        self.e2e = self._histogram(
            "lorafleet_request_latency_seconds",
            "Time from enqueue (producer clock) until a completed request's result.",
            LATENCY_BUCKETS,
        )
        self.request_prompt_tokens = self._histogram(
            "lorafleet_request_prompt_tokens", "Prompt tokens per completed request.", TOKEN_BUCKETS
        )
        self.request_generation_tokens = self._histogram(
            "lorafleet_request_generation_tokens",
            "Generated tokens per completed request.",
            TOKEN_BUCKETS,
        )
        self.step = tuple(self._histogram(*spec) for spec in STEP_HISTOGRAMS)
        in_progress = Gauge(
            "lorafleet_jobs_in_progress",
            "Jobs this worker has started and not finished.",
            w,
            registry=r,
        )
        in_progress.labels(self.worker).set_function(lambda: len(self._requests))
        self.queue_jobs = Gauge(
            "lorafleet_queue_jobs",
            "Jobs in the arq queue, waiting or in progress (arq removes a job when it ends).",
            [*w, "queue"],
            registry=r,
        )
        build = Info("lorafleet_build", "Versions of lorafleet and its runtime.", w, registry=r)
        build.labels(self.worker).info(_versions())

    def _initialize(self) -> None:
        # Series of known label values exist at 0 from the start: a series that first
        # appears with a count already above 0 loses that count in rate() and increase().
        for code in WORKER_ERROR_CODES:
            self.errors.labels(self.worker, code)
        for adapter in (BASE, OTHER):
            for outcome in OUTCOMES:
                self.requests.labels(self.worker, adapter, outcome)
            for counter in self.tokens:
                counter.labels(self.worker, adapter)

    def _histogram(self, name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
        return Histogram(name, doc, ["worker"], buckets=buckets, registry=self.registry).labels(
            self.worker
        )

    # -- requests (event loop) -------------------------------------------------------------

    def job_started(self, job_id: str, job: GenerateJob, attempt: int = 1) -> None:
        """A job was taken from the queue and decoded (its ``attempt``-th run): observe its
        queue wait. A re-run's time to first token counts from this run's start."""
        now = time.time()
        adapter = job.lora_request.lora_name if job.lora_request else None
        self.adapters.hit(adapter)
        since = now
        if job.enqueued_at > 0:
            since = job.enqueued_at
            # Producer and worker clocks may differ a little; a wait is never negative.
            self.queue_wait.observe(max(0.0, now - since))
        self._requests[job_id] = _Request(adapter, since, now if attempt > 1 else since)

    def job_cold(self, job_id: str) -> None:
        """The started job's adapter was not held here when the job was queued."""
        request = self._requests.get(job_id)
        if request is not None:
            request.cold = True

    def job_tokens(self, job_id: str, count: int) -> None:
        """``count`` new tokens of the job were streamed (the engine emits one per step)."""
        request = self._requests.get(job_id)
        if request is None or count <= 0:
            return
        now = time.monotonic()
        if request.last_token is None:
            ttft = max(0.0, time.time() - request.first_token_since)
            self.ttft.observe(ttft)
            if request.cold:
                self.ttft_cold.observe(ttft)
        else:
            self.itl.observe((now - request.last_token) / count)
        request.last_token = now

    def job_finished(self, job_id: str, result: JobResult) -> None:
        """The job's result is final. A job that failed before ``job_started`` (payload
        undecodable or over the worker's limits) counts under adapter ``other``."""
        request = self._requests.pop(job_id, None)
        adapter = self.adapters.label(request.adapter) if request else OTHER
        if result.error is not None:
            self.errors.labels(self.worker, result.error.code).inc()
            self.requests.labels(self.worker, adapter, "error").inc()
            return
        output = result.output
        completion = output.outputs[0]
        outcome = "length" if completion.finish_reason == "length" else "stop"
        self.requests.labels(self.worker, adapter, outcome).inc()
        prompt, generated = len(output.prompt_token_ids), len(completion.token_ids)
        for counter, count in zip(self.tokens, (prompt, generated), strict=True):
            counter.labels(self.worker, adapter).inc(count)
        self.request_prompt_tokens.observe(prompt)
        self.request_generation_tokens.observe(generated)
        if request is not None:
            self.e2e.observe(max(0.0, time.time() - request.since))

    def job_cancelled(self, job_id: str) -> None:
        """arq cancelled the job (it may run again); it has no result here."""
        request = self._requests.pop(job_id, None)
        adapter = self.adapters.label(request.adapter) if request else OTHER
        self.requests.labels(self.worker, adapter, "cancelled").inc()

    def _remove_adapter(self, name: str) -> None:
        # Its traffic is counted under `other` from now on; dropping its series keeps the
        # series count bounded (Prometheus treats a later comeback as a counter reset).
        for outcome in OUTCOMES:
            self.requests.remove(self.worker, name, outcome)
        for counter in self.tokens:
            counter.remove(self.worker, name)

    # -- engine steps --------------------------------------------------------------------

    def observe_step(self, stats: StepStats) -> None:
        """One engine step ran; steps that scheduled nothing are not observed."""
        if stats.num_seqs == 0:
            return
        values = (stats.num_seqs, stats.num_adapters, stats.num_tokens, stats.seconds)
        for histogram, value in zip(self.step, values, strict=True):
            histogram.observe(value)

    def attach_engine(self, engine: AsyncEngine, queue: str) -> None:
        """Export ``engine``'s state at scrape time and observe each of its steps."""
        self.registry.register(EngineCollector(self.worker, engine, queue))
        engine.step_observer = self.observe_step

    # -- serving ---------------------------------------------------------------------------

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        """Serve ``/metrics`` on ``port`` (a thread of its own).

        Raises ``MetricsPortInUseError`` if the port is taken: silently sharing or skipping
        it would hide one worker's metrics behind another's.
        """
        try:
            self._server, _ = start_http_server(port, addr, registry=self.registry)
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
            raise MetricsPortInUseError(
                f"LORAFLEET_METRICS_PORT {port} is already in use: give every worker on a "
                f"host its own metrics port"
            ) from e

    def watch_queue(self, redis: Redis, queue: str, interval: float = QUEUE_POLL_S) -> None:
        """Read the arq queue's length every ``interval`` seconds (``lorafleet_queue_jobs``)."""
        self._queue_task = asyncio.create_task(self._poll_queue(redis, queue, interval))

    async def _poll_queue(self, redis: Redis, queue: str, interval: float) -> None:
        gauge = self.queue_jobs.labels(self.worker, queue)
        while True:
            try:
                gauge.set(await redis.zcard(queue))
            except (RedisError, OSError) as e:  # Redis away: keep the last value, try again
                logger.debug("cannot read the length of queue %s: %r", queue, e)
            await asyncio.sleep(interval)

    async def close(self) -> None:
        """Stop the queue reader and the HTTP server."""
        await stop_task(self._queue_task)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("lorafleet", "torch", "transformers", "triton"):
        try:
            versions[package] = package_version(package)
        except PackageNotFoundError:
            versions[package] = "none"
    return versions


def start_worker_metrics(config: WorkerConfig, engine: AsyncEngine, redis: Redis) -> WorkerMetrics:
    """The worker's metrics; with ``config.metrics_port`` set, also serve them, export the
    engine's state and read the queue's length (call on the worker's event loop)."""
    metrics = WorkerMetrics(config.worker_name, max_adapters=config.metrics_max_adapters)
    if config.metrics_port:
        # `*_created` series (one per counter and histogram) are for OpenMetrics scrapes;
        # in the text format Prometheus ingests them as extra gauges nobody queries.
        disable_created_metrics()
        metrics.attach_engine(engine, config.queue)
        metrics.serve(config.metrics_port)
        metrics.watch_queue(redis, config.queue)
    return metrics
