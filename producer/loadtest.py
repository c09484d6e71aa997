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
the summary, the JSON report and the figure. The end of this module is the glue of the
``lorafleet loadtest`` command (whose fleet and adapter flags live in the CLI).

Example::

    mix = AdapterMix.parse("zipf:1.0", len(loras))
    spec = LoadTestSpec(Workload(mix), loras, arrivals=Arrivals(rate=20.0), num_requests=500)
    records, elapsed = asyncio.run(run_load_test("redis://localhost:6379/0", spec))
    print(format_summary(build_report(records, elapsed, description="zipf", config={})))
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import math
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from lorafleet.producer.client import Client, JobHandle
from lorafleet.producer.errors import LoraFleetError
from lorafleet.producer.keys import DEFAULT_QUEUE
from lorafleet.producer.loadreport import (
    SLO,
    RequestRecord,
    build_report,
    format_summary,
    plot_report,
    require_matplotlib,
    write_json,
)
from lorafleet.producer.types import LoRARequest, RequestOutput, SamplingParams
from lorafleet.producer.workload import (
    AdapterMix,
    Arrivals,
    Length,
    PlannedRequest,
    Prompts,
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


class LoadTestError(RuntimeError):
    """The load test could not run (e.g. every warm-up request failed)."""


@dataclass(frozen=True)
class LoadTestSpec:
    """What to run. ``loras[i]`` serves the workload's adapter index ``i``.

    Open loop at ``arrivals`` unless ``concurrency`` is set (closed loop). At least one of
    ``num_requests`` and ``duration`` (seconds) must bound the run. ``request_timeout`` is
    each job's deadline (seconds from sending); a late job fails with
    ``deadline_exceeded``.
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


class Progress:
    """A one-line progress bar on ``stream`` (stderr): redrawn in place on a terminal,
    a plain line every few seconds otherwise (CI logs)."""

    def __init__(self, total: int | None, duration: float | None, stream: TextIO = sys.stderr):
        self.total = total
        self.duration = duration
        self.stream = stream
        self.tty = stream.isatty()
        self.sent = self.ok = self.failed = 0
        self._started = time.perf_counter()
        self._last_plain = -math.inf

    def line(self) -> str:
        elapsed = time.perf_counter() - self._started
        done = self.ok + self.failed
        if self.total is not None:
            fraction = done / self.total
        else:
            fraction = min(1.0, elapsed / self.duration) if self.duration else 0.0
        width = 24
        bar = "#" * int(fraction * width)
        count = f"{done}/{self.total}" if self.total is not None else f"{done} done"
        rate = done / elapsed if elapsed > 0 else 0.0
        return (
            f"[{bar:<{width}}] {count}  ok {self.ok}  failed {self.failed}  "
            f"in flight {self.sent - done}  {rate:.1f} req/s  {elapsed:.1f}s"
        )

    def draw(self, final: bool = False) -> None:
        now = time.perf_counter()
        if self.tty:
            self.stream.write("\r" + self.line() + ("\n" if final else ""))
        elif final or now - self._last_plain >= 5.0:
            self.stream.write(self.line() + "\n")
            self._last_plain = now
        self.stream.flush()

    async def run(self) -> None:
        """Redraw four times a second until cancelled; the clock starts here."""
        self._started = time.perf_counter()
        while True:
            self.draw()
            await asyncio.sleep(0.25)


class _Runner:
    """One load-test run against one client; see ``run_load_test``."""

    def __init__(self, client: Client, spec: LoadTestSpec, progress: Progress | None) -> None:
        self.client = client
        self.spec = spec
        self.progress = progress
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
        outcomes = await asyncio.gather(
            *(self._generate(p) for p in planned), return_exceptions=True
        )
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        if len(errors) == len(outcomes):
            raise LoadTestError(f"every warm-up request failed; the first: {errors[0]!r}")

    async def _submit(self, planned: PlannedRequest) -> JobHandle:
        lora = None if planned.adapter is None else self.spec.loras[planned.adapter]
        # ignore_eos: every request generates exactly the output length the workload drew.
        params = SamplingParams(
            max_tokens=planned.max_tokens, temperature=self.spec.temperature, ignore_eos=True
        )
        return await self.client.submit(
            planned.prompt, params, lora, timeout=self.spec.request_timeout
        )

    async def _generate(self, planned: PlannedRequest) -> RequestOutput:
        handle = await self._submit(planned)
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
        if self.progress:
            self.progress.sent += 1
        handle = None
        try:
            handle = await self._submit(planned)
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
            if self.progress:
                self.progress.ok += record.ok
                self.progress.failed += not record.ok

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
        ticker = asyncio.create_task(self.progress.run()) if self.progress else None
        try:
            await (self.closed_loop() if self.spec.closed_loop else self.open_loop())
        finally:
            if ticker is not None:
                ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ticker
                assert self.progress is not None
                self.progress.draw(final=True)
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
    progress: Progress | None = None,
) -> tuple[list[RequestRecord], float]:
    """Warm up, then run ``spec`` against the workers of ``url`` / ``queue_name``.

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


# -- command line (``lorafleet loadtest``; the fleet and adapter flags live in the CLI) ----


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Load, workload, SLO and output flags of ``lorafleet loadtest``."""
    load = parser.add_argument_group("load (open loop by default)")
    how = load.add_mutually_exclusive_group()
    how.add_argument(
        "--rate",
        type=float,
        default=10.0,
        help="open loop: mean arrivals per second; 'inf' sends everything at once (default 10)",
    )
    how.add_argument(
        "--concurrency", type=int, help="closed loop: this many users, each waiting for its answer"
    )
    load.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="gamma shape of the arrival gaps: 1 is Poisson, below 1 burstier (default 1)",
    )
    load.add_argument(
        "--num-requests", type=int, help="requests to send (default 200 unless --duration)"
    )
    load.add_argument(
        "--duration", type=float, help="stop sending after this many seconds (default: none)"
    )
    load.add_argument(
        "--warmup", type=int, default=8, help="unmeasured requests sent first (default 8)"
    )
    load.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="deadline of each request, seconds (default 300)",
    )
    work = parser.add_argument_group("workload")
    work.add_argument(
        "--adapter-mix",
        default="uniform",
        help="identical, uniform, zipf[:ALPHA] or distinct (default uniform)",
    )
    work.add_argument("--num-adapters", type=int, help="use the first N adapters (default all)")
    work.add_argument(
        "--base-share",
        type=float,
        default=0.0,
        help="fraction of requests on the base model (default 0)",
    )
    work.add_argument(
        "--prompt-len",
        default="uniform:8:24",
        help="prompt length in characters: N or uniform:A:B (default uniform:8:24)",
    )
    work.add_argument("--prompts", metavar="FILE", help="draw prompts from FILE, one per line")
    work.add_argument(
        "--output-len", default="24", help="output tokens: N or uniform:A:B (default 24)"
    )
    work.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)"
    )
    work.add_argument(
        "--seed", type=int, default=0, help="seed of the workload and arrivals (default 0)"
    )
    slo = parser.add_argument_group(
        "SLOs for goodput (milliseconds): a request counts toward goodput when it meets all given"
    )
    slo.add_argument("--slo-ttft", type=float, metavar="MS", help="time to first token at most MS")
    slo.add_argument(
        "--slo-tpot",
        type=float,
        metavar="MS",
        help="time per output token (after the first) at most MS",
    )
    slo.add_argument("--slo-e2e", type=float, metavar="MS", help="end-to-end latency at most MS")
    out = parser.add_argument_group("output")
    out.add_argument("--json", metavar="PATH", help="write the full report (JSON) here")
    out.add_argument("--plot", metavar="PATH", help="write latency CDFs and throughput (PNG)")
    out.add_argument("--quiet", action="store_true", help="no progress bar")


def spec_from_args(args: argparse.Namespace, loras: Sequence[LoRARequest]) -> LoadTestSpec:
    """The ``LoadTestSpec`` the flags describe. Raises ``ValueError`` with a message for a
    bad value, an unreadable prompts file or a missing matplotlib, so call it before
    starting anything."""
    try:
        if args.plot:
            require_matplotlib()
        return _spec(args, loras)
    except (OSError, RuntimeError) as e:
        raise ValueError(str(e)) from None


def _spec(args: argparse.Namespace, loras: Sequence[LoRARequest]) -> LoadTestSpec:
    prompts = (
        Prompts.from_file(args.prompts) if args.prompts else Prompts(Length.parse(args.prompt_len))
    )
    workload = Workload(
        AdapterMix.parse(args.adapter_mix, len(loras), args.base_share),
        prompts,
        Length.parse(args.output_len),
        seed=args.seed,
    )
    num_requests = args.num_requests
    if num_requests is None and args.duration is None:
        num_requests = 200
    return LoadTestSpec(
        workload,
        loras,
        arrivals=Arrivals(args.rate, args.burstiness),
        concurrency=args.concurrency,
        num_requests=num_requests,
        duration=args.duration,
        warmup=args.warmup,
        temperature=args.temperature,
        request_timeout=args.timeout,
    )


def slo_from_args(args: argparse.Namespace) -> SLO:
    def seconds(ms: float | None) -> float | None:
        return None if ms is None else ms / 1000.0

    return SLO(ttft=seconds(args.slo_ttft), tpot=seconds(args.slo_tpot), e2e=seconds(args.slo_e2e))


def run_command(
    args: argparse.Namespace, spec: LoadTestSpec, url: str, queue_name: str, setup: dict[str, Any]
) -> int:
    """Run ``spec`` (from ``spec_from_args(args, ...)``) against ``url`` and print, write
    and plot the report as the flags ask. ``setup`` (model, worker settings...) is recorded
    in the report's config. Returns the exit status: 0 if every request succeeded, else 1."""
    slo = slo_from_args(args)
    progress = None if args.quiet else Progress(spec.num_requests, spec.duration)
    records, elapsed = asyncio.run(
        run_load_test(url, spec, queue_name=queue_name, progress=progress)
    )
    config = {
        **setup,
        "mode": "closed" if spec.closed_loop else "open",
        "rate": None if math.isinf(spec.arrivals.rate) else spec.arrivals.rate,
        "burstiness": spec.arrivals.burstiness,
        "concurrency": spec.concurrency,
        "num_requests": spec.num_requests,
        "duration": spec.duration,
        "warmup": spec.warmup,
        "adapter_mix": args.adapter_mix,
        "base_share": args.base_share,
        "prompts": spec.workload.prompts.describe(),
        "output_len": args.output_len,
        "temperature": spec.temperature,
        "seed": args.seed,
        "request_timeout": spec.request_timeout,
        "adapters": [lora.lora_name for lora in spec.loras],
    }
    report = build_report(
        records,
        elapsed,
        description=f"{spec.describe()}; {spec.workload.describe()}",
        config=config,
        slo=slo,
    )
    print(format_summary(report))
    if args.json:
        write_json(report, args.json)
        print(f"\nreport: {args.json}")
    if args.plot:
        plot_report(report, args.plot)
        print(f"figure: {args.plot}")
    return 0 if report.failed == 0 else 1
