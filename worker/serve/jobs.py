"""What a worker process runs under arq: start-up, the ``generate`` job, shut-down.

``startup`` starts the engine process and waits for its model to load, then starts the stream publisher
and the abort listener; ``generate`` runs one job on the engine and returns the encoded
``JobResult``. Request-level failures are returned as error values, never raised: arq's
custom serializers cannot encode exceptions, and a raise would make arq retry a job that
can never succeed. Only cancellation (shutdown, arq's job timeout) propagates, after the
engine request has been aborted, so arq can re-queue the job.

Reliability (see docs/pipeline.md): a ``Heartbeat`` keeps this worker's claims on its jobs
short-lived, so a killed worker's jobs run again elsewhere within ``heartbeat_ttl``; a
``Drain`` turns SIGTERM into a graceful drain; every job is checked against this worker's
limits (``lorafleet.worker.serve.validation``) before the engine sees it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from lorafleet.producer.client import redact_url
from lorafleet.producer.codec import WIRE_VERSION, GenerateJob, JobResult, decode_job, encode
from lorafleet.producer.errors import (
    AbortedError,
    DeadlineExceededError,
    InternalError,
    LoraFleetError,
)
from lorafleet.producer.types import RequestMetrics
from lorafleet.worker.process.async_engine import AsyncEngine, EngineStartError
from lorafleet.worker.serve.aborts import AbortWatcher
from lorafleet.worker.serve.arq_fixes import current_arq_worker, guard_claims
from lorafleet.worker.serve.drain import Drain, JobTracker, TrackedJob
from lorafleet.worker.serve.fleet import FleetMember
from lorafleet.worker.serve.heartbeat import Heartbeat
from lorafleet.worker.serve.ledger import Ledger, LedgerEntry
from lorafleet.worker.serve.logs import ensure_logging
from lorafleet.worker.serve.publisher import Atomic, StreamPublisher
from lorafleet.worker.serve.quotas import QuotaTenants, Release, take
from lorafleet.worker.serve.resume import earlier_tokens, resume_point
from lorafleet.worker.serve.slot_contention import SlotContentionWatch
from lorafleet.worker.serve.validation import JobLimits, check_job, salvage_reply_to

if TYPE_CHECKING:
    from lorafleet.worker.serve.metrics import WorkerMetrics
    from lorafleet.worker.serve.settings import WorkerConfig
    from lorafleet.worker.serve.tenant_metrics import TenantMetrics

logger = logging.getLogger(__name__)


@dataclass
class WorkerState:
    """Per-process state shared by all jobs (kept in arq's ``ctx``)."""

    config: WorkerConfig
    redis: Any
    engine: AsyncEngine
    publisher: StreamPublisher
    aborts: AbortWatcher
    metrics: WorkerMetrics
    jobs: JobTracker
    heartbeat: Heartbeat
    limits: JobLimits
    contention: SlotContentionWatch
    quotas: QuotaTenants
    ledger: Ledger | None = None  # None: metering off
    tenants: TenantMetrics | None = None
    fleet: FleetMember | None = None


def _engine_exited(status: int | None) -> None:
    """The engine process died (or hung and was killed): so does the worker, at once,
    without answering its jobs. Its claims lapse within the heartbeat TTL and arq runs the
    jobs again on a healthy worker; a supervisor (systemd, Kubernetes) restarts this one."""
    logger.critical("engine process exited with status %s; the worker exits too", status)
    logging.shutdown()
    os._exit(70)


async def startup(ctx: dict[str, Any]) -> None:
    """arq ``on_startup``: load and start the engine, then announce the worker."""
    config: WorkerConfig = ctx["config"]
    ensure_logging(config.log_format)
    redis = ctx["redis"]
    started = time.monotonic()
    logger.info("lorafleet worker %s loading %s ...", config.name, config.model)
    engine = AsyncEngine(
        config.engine_config(),
        on_exit=_engine_exited,
        stall_timeout_s=config.engine_stall_timeout,
    )
    try:
        await engine.start()
    except EngineStartError as e:
        # A setting that cannot work (a context the KV cache cannot hold, a model folder
        # that does not load): one line, and the exit status of a configuration error.
        logger.critical("lorafleet worker %s cannot start: %s", config.name, e)
        raise SystemExit(2) from None
    publisher = StreamPublisher(
        redis, maxlen=config.stream_maxlen, ttl_s=config.stream_ttl, worker=config.name
    )
    await publisher.start()
    aborts = AbortWatcher(redis)
    await aborts.start()
    # Imported here: the producer-only commands of the CLI import this module, and
    # prometheus_client comes with the worker extra.
    from lorafleet.worker.serve.metrics import start_worker_metrics
    from lorafleet.worker.serve.tenant_metrics import TenantMetrics

    metrics = start_worker_metrics(config, engine, redis)
    tenants = TenantMetrics(metrics.registry, config.name, max_tenants=config.metrics_max_tenants)
    worker = current_arq_worker()
    guard_claims(worker)
    fleet = FleetMember.start(redis, worker, config, engine, metrics)  # routes the claims
    tracker = JobTracker(redis)
    info = {
        "pid": os.getpid(),
        "engine_pid": engine.pid,
        "model": config.model,
        "queue": config.queue,
        "since": time.time(),
    }
    heartbeat = Heartbeat(
        redis,
        worker,
        name=config.name,
        ttl=config.heartbeat_ttl,
        info=info,
        engine=engine,
        jobs=tracker,
        fleet=fleet.entry,
    )
    limits = JobLimits(engine.info.max_model_len, config.max_prompt_chars)
    contention = SlotContentionWatch(engine, config.max_loras)
    contention.start()
    ledger = None
    if config.metering:
        ledger = Ledger(
            redis,
            worker=config.name,
            bucket_s=config.usage_bucket,
            retention_s=config.usage_retention,
        )
        ledger.folder.start()
    ctx["lorafleet"] = WorkerState(
        config,
        redis,
        engine,
        publisher,
        aborts,
        metrics,
        tracker,
        heartbeat,
        limits,
        contention,
        QuotaTenants(redis),
        ledger,
        tenants,
    )
    ctx["lorafleet"].fleet = fleet
    # Said before registering: whoever waits for the registration (the launcher, an
    # operator's tooling) then finds the ready line already written.
    if config.adapter_roots:
        roots = "adapters from " + os.pathsep.join(config.adapter_roots)
    else:
        roots = "no local adapters (set --adapter-roots / LORAFLEET_ADAPTER_ROOTS to serve some)"
    logger.info(
        "lorafleet worker %s ready in %.1fs: %s; %s; queue %s on %s",
        config.name,
        time.monotonic() - started,
        engine.info.describe(),
        roots,
        config.queue,
        redact_url(config.redis_url),
    )
    await heartbeat.start()  # registers the worker: from here on it takes jobs
    fleet.attach(heartbeat.publish)
    Drain(worker, tracker, grace=config.drain_timeout, on_start=heartbeat.mark_draining).install()


async def shutdown(ctx: dict[str, Any]) -> None:
    """arq ``on_shutdown``: withdraw the worker and stop the engine."""
    state: WorkerState | None = ctx.get("lorafleet")
    if state is None:
        return
    try:
        if state.fleet is not None:
            await state.fleet.close()
        await state.heartbeat.close()
    finally:
        await state.contention.close()
        await state.aborts.close()
        await state.publisher.close()
        if state.ledger is not None:
            await state.ledger.folder.close()
        await state.engine.stop()
        await state.metrics.close()


class _Stopper:
    """Stops one engine request on abort or deadline, whether or not it was added yet."""

    def __init__(self, engine: AsyncEngine, request_id: str) -> None:
        self.engine = engine
        self.request_id = request_id
        self.added = False
        self.reason: type[LoraFleetError] | None = None

    def stop(self, reason: type[LoraFleetError]) -> None:
        if self.reason is None:
            self.reason = reason
            if self.added:
                self.engine.abort(self.request_id)

    def mark_added(self) -> None:
        self.added = True
        if self.reason is not None:  # the abort came before the request existed
            self.engine.abort(self.request_id)


async def generate(ctx: dict[str, Any], payload: bytes) -> bytes:
    """arq job: run one encoded ``GenerateJob``; return the encoded ``JobResult``.

    Deltas go to the job's stream as they come; the final stream event, also appended to
    the producer's inbox, carries the same ``JobResult`` as the return value (arq stores
    that one as the durable record).
    """
    state: WorkerState = ctx["lorafleet"]
    job_id: str = ctx["job_id"]
    attempt: int = ctx["job_try"]
    started = time.monotonic()
    version = WIRE_VERSION
    job: GenerateJob | None = None
    try:
        job = decode_job(payload)
        version = job.v  # answered in the producer's own version
        check_job(job, state.limits)
    except LoraFleetError as e:
        result = _error(job_id, e)
        reply_to = salvage_reply_to(payload)
    else:
        reply_to = job.reply_to
        refusal = await take(state.redis, state.quotas, job_id, job, state.config.job_timeout)
        if refusal is not None:  # answered without running: it costs nothing
            result = _error(job_id, refusal)
        else:
            state.metrics.job_started(job_id, job, attempt)
            if state.fleet is not None:
                state.fleet.job_started(job_id, attempt, state.metrics)
            try:
                async with state.jobs.track(job_id) as tracked:
                    result = await _run(state, job_id, attempt, job, tracked)
            except asyncio.CancelledError:
                state.publisher.forget(job_id)
                state.metrics.job_cancelled(job_id)
                raise
    state.metrics.job_finished(job_id, result)
    if state.tenants is not None:
        state.tenants.observe(job, result)
    result = msgspec.structs.replace(result, worker=state.config.name, attempt=attempt, v=version)
    writes: list[Atomic] = []
    if (entry := await _meter(state, job_id, attempt, job, result)) is not None:
        writes.append(entry)
    if (release := Release.of(job, job_id, result)) is not None:
        writes.append(release)
    await state.publisher.finish(job_id, attempt, result, reply_to=reply_to, writes=writes)
    _log_outcome(job_id, attempt, job, result, time.monotonic() - started)
    return encode(result)


async def _meter(
    state: WorkerState, job_id: str, attempt: int, job: GenerateJob | None, result: JobResult
) -> LedgerEntry | None:
    """The job's ledger write (None: nothing to record), to be written with its final event.
    A re-run of a job already metered returns the recorded usage on its result (set here),
    so every result of the job carries what the ledger holds."""
    if state.ledger is None or job is None:
        return None
    usage = result.output.usage if result.output is not None else None
    prior = await state.ledger.prepare(job_id, attempt)
    if usage is None and not prior.cut:
        return None
    if result.output is not None and prior.recorded is not None:
        result.output.usage = prior.recorded
    return state.ledger.entry(job_id, attempt, job, usage, prior)


def _log_outcome(
    job_id: str, attempt: int, job: GenerateJob | None, result: JobResult, seconds: float
) -> None:
    """One line per job: a failure at WARNING (an operator must hear of a refused adapter
    path), a success at DEBUG (``-v``). ``extra`` fields are keys in JSON logs."""
    lora = job.lora_request if job is not None else None
    adapter = lora.lora_name if lora is not None else ("base" if job is not None else "-")
    extra: dict[str, Any] = {
        "job_id": job_id,
        "attempt": attempt,
        "adapter": adapter,
        "seconds": round(seconds, 4),
    }
    if result.error is not None:
        extra["code"] = result.error.code
        logger.warning(
            "job %s failed (adapter %s, attempt %d) after %.2fs: %s: %s",
            job_id,
            adapter,
            attempt,
            seconds,
            result.error.code,
            result.error.message,
            extra=extra,
        )
        return
    output = result.output
    completion = output.outputs[0]
    extra.update(
        prompt_tokens=len(output.prompt_token_ids),
        output_tokens=sum(len(c.token_ids) for c in output.outputs),
        finish_reason=completion.finish_reason,
    )
    logger.debug(
        "job %s done (adapter %s, attempt %d) in %.2fs: %d prompt + %d output tokens, %s",
        job_id,
        adapter,
        attempt,
        seconds,
        extra["prompt_tokens"],
        extra["output_tokens"],
        completion.finish_reason,
        extra=extra,
    )


def _error(job_id: str, error: LoraFleetError) -> JobResult:
    return JobResult(request_id=job_id, error=error.to_info())


async def _run(
    state: WorkerState, job_id: str, attempt: int, job: GenerateJob, tracked: TrackedJob
) -> JobResult:
    if job.deadline is not None and time.time() >= job.deadline:
        return _error(
            job_id, DeadlineExceededError(f"job {job_id} reached its deadline in the queue")
        )
    # The attempt in the engine id keeps a re-run clear of a cancelled run still draining.
    stopper = _Stopper(state.engine, f"{job_id}.{attempt}")
    if await state.aborts.register(job_id, lambda: stopper.stop(AbortedError)):
        return _error(job_id, AbortedError(f"job {job_id} was aborted before it started"))
    timer = None
    if job.deadline is not None:
        delay = job.deadline - time.time()
        timer = asyncio.get_running_loop().call_later(delay, stopper.stop, DeadlineExceededError)
    try:
        return await _generate(state, job_id, attempt, job, stopper, tracked)
    finally:
        if timer is not None:
            timer.cancel()
        state.aborts.unregister(job_id)


async def _generate(
    state: WorkerState,
    job_id: str,
    attempt: int,
    job: GenerateJob,
    stopper: _Stopper,
    tracked: TrackedJob,
) -> JobResult:
    engine = state.engine
    completed = False
    started = time.time()
    resumed: list[int] = []
    if attempt > 1 and job.sampling_params.resumable:
        resumed = resume_point(await earlier_tokens(state.redis, job_id, attempt))
    try:
        stream = engine.add_request(
            stopper.request_id,
            job.prompt,
            job.sampling_params,
            job.lora_request,
            messages=job.messages,
            add_generation_prompt=job.add_generation_prompt,
            continue_final_message=job.continue_final_message,
            resume_token_ids=resumed,
        )
        stopper.mark_added()
        state.jobs.sent_to_engine += 1
        # A stream carries one completion's text: with n > 1 only the final event does.
        streams_text = job.sampling_params.n == 1
        if resumed:  # this run's events carry every token, so it can be continued too
            tracked.started = True
            state.publisher.delta(job_id, attempt, "", resumed, job.v)
            logger.info(
                "job %s (attempt %d) continues after the %d tokens its last run streamed",
                job_id,
                attempt,
                len(resumed),
                extra={"job_id": job_id, "attempt": attempt, "resumed_tokens": len(resumed)},
            )
        async for delta in stream:
            if delta.text or delta.token_ids:
                tracked.started = True  # visible now: a drain lets it finish
                if streams_text:
                    state.publisher.delta(job_id, attempt, delta.text, list(delta.token_ids), job.v)
                state.metrics.job_tokens(job_id, len(delta.token_ids))
        output = await stream.result()
        completed = True
    except LoraFleetError as e:
        return _error(job_id, e)
    except Exception as e:  # an engine bug must not take the worker down with it
        logger.exception("job %s failed inside the engine", job_id)
        return _error(job_id, InternalError(f"{type(e).__name__}: {e}"))
    finally:
        if not completed and stopper.added:
            # Cancelled or failed: free the request's KV blocks and adapter slot now
            # (a no-op for a request the engine already finished).
            engine.abort(stopper.request_id)
    output.request_id = job_id
    # A request that completed before the abort took effect keeps its full output; one cut
    # short carries what it had made.
    if any(o.finish_reason == "abort" for o in output.outputs):
        if stopper.reason is DeadlineExceededError:
            made = sum(len(o.token_ids) for o in output.outputs)
            message = f"job {job_id} reached its deadline after {made} tokens"
            return _error(job_id, DeadlineExceededError(message, output))
        return _error(job_id, AbortedError(f"job {job_id} was aborted", output))
    output.metrics = RequestMetrics(
        arrival_time=job.enqueued_at,
        first_scheduled_time=started,
        finished_time=time.time(),
        time_in_queue=started - job.enqueued_at,
    )
    if output.usage is not None:
        output.usage.queue_wait_s = started - job.enqueued_at
    return JobResult(request_id=job_id, output=output)
