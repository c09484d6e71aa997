"""Load test: drive the real path (producer -> Redis -> workers) the way production does.

Open loop: requests arrive on their own schedule (``Arrivals``: Poisson at ``rate``, or
gamma-distributed gaps for burstiness) whether or not earlier ones finished, so queueing
shows up in the latencies. Closed loop: ``concurrency`` users each send a request, wait for
its last token, and send the next. Either way the run stops issuing requests after
``num_requests`` or ``duration`` seconds (whichever comes first) and waits for those in
flight. A warm-up batch (separate requests, not measured) goes first.

Every request is streamed, as an interactive client would: the client records when it sent
the request, each text delta's arrival and the end. ``RequestOutput.metrics`` adds when a
worker took the job off the queue. ``lorafleet.producer.loadreport`` turns the records into
the summary, the JSON report and the figure; the ``lorafleet loadtest`` command
(``lorafleet.worker.cli.loadtest``) is its front end.

Example::

    mix = AdapterMix.parse("zipf:1.0", len(loras))
    spec = LoadTestSpec(Workload(mix), loras, arrivals=Arrivals(rate=20.0), num_requests=500)
    records, elapsed = asyncio.run(run_load_test("redis://localhost:6379/0", spec))
    print(format_summary(build_report(records, elapsed, description="zipf", config={})))
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import random
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from lorafleet.producer.client import Client, JobHandle
from lorafleet.producer.errors import LoraFleetError
from lorafleet.producer.keys import DEFAULT_QUEUE
from lorafleet.producer.loadreport import (
    RequestRecord,
)
from lorafleet.producer.types import LoRARequest, RequestOutput, SamplingParams
from lorafleet.producer.usage import check_tenant
from lorafleet.producer.workload import (
    Arrivals,
    PlannedRequest,
    Workload,
)

#: Label of base-model requests in reports.
BASE_LABEL = "(base)"

#: Error code recorded for a request the client gave up waiting for.
CLIENT_TIMEOUT = "client_timeout"

#: Extra seconds the client waits past a job's own deadline before giving up on it (the
#: worker answers a late job itself; this only catches answers that never come).
_GRACE_S = 30.0

#: Open loop with no pacing: every request is sent at the start.
ALL_AT_ONCE = Arrivals(math.inf)


#: The warm-up jobs' tenant and job id prefix: the ledger, the per-tenant metrics and the
#: worker logs keep them apart from the measured run's.
WARMUP_TENANT = "loadtest-warmup"
WARMUP_JOB_PREFIX = "warmup-"


class LoadTestError(RuntimeError):
    """The load test could not run (e.g. every warm-up request failed)."""


@dataclass(frozen=True)
class LoadTestSpec:
    """What to run. ``loras[i]`` serves the workload's adapter index ``i``.

    Open loop at ``arrivals`` unless ``concurrency`` is set (closed loop). At least one of
    ``num_requests`` and ``duration`` (seconds) must bound the run. ``request_timeout`` is
    each job's deadline (seconds from sending); a late job fails with
    ``deadline_exceeded``. ``tenant``: the measured jobs' tenant (metering, quotas). The
    warm-up jobs are told apart wherever jobs are counted: job ids start with
    ``WARMUP_JOB_PREFIX`` and their tenant is ``WARMUP_TENANT``.
    """

    workload: Workload
    loras: Sequence[LoRARequest]
    arrivals: Arrivals = ALL_AT_ONCE
    concurrency: int | None = None
    num_requests: int | None = 200
    duration: float | None = None
    warmup: int = 8
    temperature: float = 0.0
    request_timeout: float = 300.0
    tenant: str | None = None

    def __post_init__(self) -> None:
        if len(self.loras) < self.workload.mix.num_adapters:
            raise ValueError(
                f"the adapter mix needs {self.workload.mix.num_adapters} adapters, "
                f"{len(self.loras)} given"
            )
        if self.num_requests is None and self.duration is None:
            raise ValueError("bound the run with num_requests, duration or both")
        if self.num_requests is not None and self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")
        if self.duration is not None and not self.duration > 0:
            raise ValueError(f"duration must be > 0 seconds, got {self.duration}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if not self.closed_loop and math.isinf(self.arrivals.rate) and not self.num_requests:
            raise ValueError("sending everything at once (infinite rate) needs num_requests")
        if self.warmup < 0 or not self.request_timeout > 0:
            raise ValueError("warmup must be >= 0 and request_timeout > 0")
        check_tenant(self.tenant)

    @property
    def closed_loop(self) -> bool:
        return self.concurrency is not None

    def label(self, planned: PlannedRequest) -> str:
        return BASE_LABEL if planned.adapter is None else self.loras[planned.adapter].lora_name

    def describe(self) -> str:
        """One line: loop kind, load, bounds."""
        if self.concurrency is not None:
            load = f"closed loop, {self.concurrency} concurrent users"
        elif math.isinf(self.arrivals.rate):
            load = "open loop, all requests at once"
        else:
            shape = (
                "Poisson"
                if self.arrivals.burstiness == 1.0
                else f"gamma (burstiness {self.arrivals.burstiness:g})"
            )
            load = f"open loop, {shape} arrivals at {self.arrivals.rate:g} req/s"
        bounds = [f"{self.num_requests} requests"] if self.num_requests else []
        bounds += [f"{self.duration:g} s"] if self.duration else []
        return f"{load}; at most {' / '.join(bounds)}"


@dataclass
class LoadCounts:
    """Requests of the measured run so far: sent, and of those finished, ok and failed.
    ``run_load_test`` updates one and calls its ``progress`` callback on every change."""

    sent: int = 0
    ok: int = 0
    failed: int = 0


class _Runner:
    """One load-test run against one client; see ``run_load_test``."""

    def __init__(
        self,
        client: Client,
        spec: LoadTestSpec,
        progress: Callable[[LoadCounts], None] | None,
    ) -> None:
        self.client = client
        self.spec = spec
        self.progress = progress
        self.counts = LoadCounts()
        self.records: list[RequestRecord] = []
        self.start = 0.0
        self._planned: Iterator[PlannedRequest] = iter(())

    def now(self) -> float:
        return time.perf_counter() - self.start

    def _more(self) -> bool:
        """Whether the run may issue another request (duration bound)."""
        return self.spec.duration is None or self.now() < self.spec.duration

    async def warm_up(self) -> None:
        """Send the warm-up requests at once and wait for them; raise ``LoadTestError`` if
        none succeeded (a misconfiguration: unknown adapters, no worker, wrong queue)."""
        planned = self.spec.workload.take(self.spec.warmup, seed_offset=1)
        if not planned:
            return
        outcomes = await asyncio.gather(*(self._warm(p) for p in planned), return_exceptions=True)
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        if len(errors) == len(outcomes):
            raise LoadTestError(f"every warm-up request failed; the first: {errors[0]!r}")

    async def _submit(
        self, planned: PlannedRequest, tenant: str | None, job_id: str | None = None
    ) -> JobHandle:
        lora = None if planned.adapter is None else self.spec.loras[planned.adapter]
        # ignore_eos: every request generates exactly the output length the workload drew.
        params = SamplingParams(
            max_tokens=planned.max_tokens, temperature=self.spec.temperature, ignore_eos=True
        )
        return await self.client.submit(
            planned.prompt,
            params,
            lora,
            timeout=self.spec.request_timeout,
            tenant=tenant,
            job_id=job_id,
        )

    async def _warm(self, planned: PlannedRequest) -> RequestOutput:
        job_id = WARMUP_JOB_PREFIX + uuid.uuid4().hex
        handle = await self._submit(planned, WARMUP_TENANT, job_id)
        return await handle.result(timeout=self.spec.request_timeout + _GRACE_S)

    async def one(self, planned: PlannedRequest) -> None:
        """Send one request, stream it to the end, and record what happened."""
        spec = self.spec
        record = RequestRecord(
            index=planned.index,
            adapter=spec.label(planned),
            prompt_chars=len(planned.prompt),
            max_tokens=planned.max_tokens,
            sent=self.now(),
        )
        self.records.append(record)
        self.counts.sent += 1
        self._report()
        handle = None
        try:
            handle = await self._submit(planned, spec.tenant)
            record.enqueued = self.now()
            async with asyncio.timeout(spec.request_timeout + _GRACE_S):
                async for _ in handle.stream():
                    record.chunks.append(self.now())
                output = await handle.result()
            record.finished = self.now()
            _fill(record, output)
        except LoraFleetError as e:
            record.error = e.code
        except TimeoutError:
            record.error = CLIENT_TIMEOUT
            if handle is not None:
                with contextlib.suppress(LoraFleetError):
                    await handle.abort()
        finally:
            if record.finished is None:
                record.finished = self.now()
            self.counts.ok += record.ok
            self.counts.failed += not record.ok
            self._report()

    def _report(self) -> None:
        if self.progress is not None:
            self.progress(self.counts)

    def _next(self) -> PlannedRequest | None:
        return next(self._planned, None) if self._more() else None

    async def open_loop(self) -> None:
        gaps = self.spec.arrivals.gaps(random.Random(self.spec.workload.seed + 7))
        tasks: list[asyncio.Task[None]] = []
        arrival = 0.0
        for planned in self._planned:
            arrival += next(gaps)
            if self.spec.duration is not None and arrival >= self.spec.duration:
                break
            # sleep(0) when behind schedule still lets the requests already sent progress.
            await asyncio.sleep(max(0.0, arrival - self.now()))
            tasks.append(asyncio.create_task(self.one(planned)))
        await asyncio.gather(*tasks)

    async def closed_loop(self) -> None:
        async def user() -> None:
            while (planned := self._next()) is not None:
                await self.one(planned)

        assert self.spec.concurrency is not None
        await asyncio.gather(*(user() for _ in range(self.spec.concurrency)))

    async def run(self) -> float:
        """Run the measured part; return its length in seconds (to the last answer)."""
        self._planned = itertools.islice(self.spec.workload.requests(), self.spec.num_requests)
        self.start = time.perf_counter()
        await (self.closed_loop() if self.spec.closed_loop else self.open_loop())
        return self.now()


def _fill(record: RequestRecord, output: RequestOutput) -> None:
    record.prompt_tokens = len(output.prompt_token_ids)
    record.output_tokens = len(output.outputs[0].token_ids) if output.outputs else 0
    if output.metrics is not None:
        record.queue_wait = output.metrics.time_in_queue


async def run_load_test(
    url: str | None,
    spec: LoadTestSpec,
    *,
    queue_name: str = DEFAULT_QUEUE,
    progress: Callable[[LoadCounts], None] | None = None,
) -> tuple[list[RequestRecord], float]:
    """Warm up, then run ``spec`` against the workers of ``url`` / ``queue_name``;
    ``progress`` is called with the measured run's counts whenever they change.

    Returns the records of the measured requests (in sending order) and the measured
    run's length in seconds, from the first send to the last answer. Raises
    ``LoadTestError`` when no warm-up request succeeds and ``QueueUnavailableError`` when
    Redis does not answer.
    """
    # Enough connections that submitting never waits behind the pool at moderate load.
    async with Client(url, queue_name=queue_name, max_connections=64) as client:
        runner = _Runner(client, spec, progress)
        await runner.warm_up()
        elapsed = await runner.run()
    records = sorted(runner.records, key=lambda r: r.sent)
    return records, elapsed
