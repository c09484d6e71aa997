"""Bounded soak: steady load through the queue while workers are killed, drained and
restarted and Redis restarts (persistence on). Loopback only, tiny random model.

    python scripts/soak.py --duration 180 --jobs 4000 --workers 2

Every ``--chaos-every`` seconds one fault, in a shuffled rotation so each kind happens:
SIGKILL a worker (a replacement starts at once), SIGTERM a worker (it drains; a replacement
starts at once), or restart Redis (same port and folder, append-only file on). Producers
submit at ``--rate`` jobs/s until ``--duration`` seconds or ``--jobs`` jobs, whichever comes
first, then wait at most ``--settle`` seconds for the last outcomes.

The producer uses the public client with its retry policy: a submit that fails because
Redis is away is retried with the same job id (an idempotency key), and a wait cut off by a
lost connection re-attaches with ``client.job(job_id)``. A quarter of the jobs are
followed token by token, and their streamed text is compared with the final text.

Printed figures (exit status 1 if any "must be 0" figure is not):
- jobs enqueued (acknowledged submits), workers killed / drained, Redis restarts;
- jobs completed, jobs failed with a typed error (must be 0: every job is valid);
- jobs lost: acknowledged, yet no outcome by the end or reported ``job_not_found`` (must
  be 0);
- duplicate results delivered: a job whose outcome reached the application twice (must
  be 0);
- garbled streams: streamed text that is not the final text (must be 0);
- wrong outputs: a greedy job whose tokens differ from another run of the same request
  (must be 0);
- re-runs: jobs whose final result came from attempt 2 or later, and extra executions:
  final events beyond the first in a job's stream (at-least-once at work; informational).

Metering (issue 19): jobs go to ``--tenants`` tenants (and some to none), and the soak ends
by reading the usage ledger back and comparing it with the ``usage`` of the results the
client received, per tenant and adapter and per job:
- ledger entries counted twice: the ledger's requests beyond the results received, or a
  job whose recorded usage differs from the usage its result carried (must be 0);
- ledger entries missing: a result received whose job the ledger does not hold (must be 0);
- totals (requests, prompt and completion tokens, engine and adapter-load microseconds)
  equal, exactly (must be "yes");
- waste per worker: the runs whose result was not delivered (cut short by a SIGKILL or a
  drain past its grace, or a re-run of a job already metered).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import redis
import redis.asyncio

from lorafleet.producer import Client, LoRARequest, RequestOutput, SamplingParams
from lorafleet.producer.client import JobHandle
from lorafleet.producer.errors import (
    JobNotFoundError,
    LoraFleetError,
    QueueUnavailableError,
    StreamRestartedError,
)
from lorafleet.producer.keys import stream_key
from lorafleet.producer.ledger import (
    BASE_ADAPTER,
    NO_TENANT,
    UsageReport,
    UsageRow,
    WasteRow,
    metered_key,
    read_usage,
    to_us,
)
from lorafleet.producer.redis_server import EmbeddedRedis
from lorafleet.producer.stream import FIELD, decode_event
from lorafleet.producer.usage import Usage
from lorafleet.worker.local.launcher import WorkerProcess
from lorafleet.worker.serve.ledger import recorded_usage
from lorafleet.worker.serve.settings import WorkerConfig

PROMPTS = [f"soak prompt {i}: the quick brown fox" for i in range(16)]
FAULTS = ("kill", "drain", "redis")


@dataclass
class Tally:
    """What the producer saw, per job id."""

    enqueued: int = 0
    delivered: Counter[str] = field(default_factory=Counter)
    completed: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    lost: list[str] = field(default_factory=list)
    garbled: int = 0
    stream_restarts: int = 0
    outputs: dict[tuple, set[tuple[int, ...]]] = field(default_factory=dict)
    faults: Counter[str] = field(default_factory=Counter)
    job_ids: list[str] = field(default_factory=list)
    # job id -> (tenant, adapter, the usage on the result the client received)
    usage: dict[str, tuple[str | None, str | None, Usage]] = field(default_factory=dict)


@dataclass
class Fleet:
    """The Redis server and the worker processes of the soak."""

    server: EmbeddedRedis
    base: WorkerConfig
    logs: Path
    workers: list[WorkerProcess] = field(default_factory=list)

    def start_worker(self) -> None:
        name = f"soak-{uuid.uuid4().hex[:6]}"
        config = replace(self.base, name=name)
        self.workers.append(WorkerProcess(config, log_path=self.logs / f"{name}.log").start())

    def pick_worker(self, rng: random.Random) -> WorkerProcess:
        return rng.choice([w for w in self.workers if w.running])

    def stop_all(self) -> None:
        for worker in self.workers:
            worker.signal(signal.SIGTERM)
        for worker in self.workers:
            worker.stop(timeout=30)


def _assets(root: Path) -> tuple[Path, list[LoRARequest]]:
    from lorafleet.worker.demo.synthetic import build_random_adapter, build_random_model

    model = build_random_model(root / "model", "llama", seed=1)
    loras = [
        LoRARequest(
            f"a{i}",
            i + 1,
            str(build_random_adapter(model, root / "adapters" / f"a{i}", rank=8, seed=i)),
        )
        for i in range(3)
    ]
    return model, loras


async def _submit(
    client: Client,
    job_id: str,
    prompt: str,
    params: SamplingParams,
    lora: LoRARequest | None,
    tenant: str | None = None,
) -> JobHandle:
    """Submit with the retry policy: the same job id until Redis acknowledges it."""
    while True:
        try:
            return await client.submit(prompt, params, lora, job_id=job_id, tenant=tenant)
        except QueueUnavailableError:
            await asyncio.sleep(0.5)


async def _outcome(
    client: Client, handle: JobHandle, follow: bool, tally: Tally
) -> tuple[RequestOutput | LoraFleetError, str | None]:
    """The job's outcome and, if followed, its streamed text; a wait cut off by a lost
    connection re-attaches by job id."""
    streamed: str | None = None
    while True:
        try:
            if follow and streamed is None:
                streamed = "".join([d async for d in handle.stream()])
            return await handle.result(), streamed
        except StreamRestartedError:
            tally.stream_restarts += 1
            follow = False
        except QueueUnavailableError:
            await asyncio.sleep(0.5)
            with contextlib.suppress(QueueUnavailableError):
                handle = await client.job(handle.job_id)
        except LoraFleetError as e:
            return e, streamed


async def _one_job(
    client: Client,
    i: int,
    rng: random.Random,
    loras: list[LoRARequest],
    params: SamplingParams,
    tally: Tally,
    tenants: list[str | None],
) -> None:
    job_id = f"soak-{i}-{uuid.uuid4().hex[:8]}"
    prompt, lora = rng.choice(PROMPTS), rng.choice([None, *loras])
    tenant = rng.choice(tenants)
    follow = rng.random() < 0.25
    handle = await _submit(client, job_id, prompt, params, lora, tenant)
    tally.enqueued += 1
    tally.job_ids.append(job_id)
    outcome, streamed = await _outcome(client, handle, follow, tally)
    tally.delivered[job_id] += 1
    if isinstance(outcome, JobNotFoundError):
        tally.lost.append(job_id)
    elif isinstance(outcome, LoraFleetError):
        tally.failed[outcome.code] += 1
    else:
        tally.completed += 1
        text = outcome.outputs[0].text
        if streamed is not None and streamed != text:
            tally.garbled += 1
        key = (prompt, lora.lora_name if lora else None)
        tally.outputs.setdefault(key, set()).add(tuple(outcome.outputs[0].token_ids))
        tally.usage[job_id] = (tenant, lora.lora_name if lora else None, outcome.usage)


async def _chaos(
    fleet: Fleet, args: argparse.Namespace, rng: random.Random, tally: Tally, stop: asyncio.Event
) -> None:
    rotation: list[str] = []
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), args.chaos_every)
            return
        if not rotation:
            rotation = rng.sample(FAULTS, len(FAULTS))
        fault = rotation.pop()
        if fault == "redis":
            await asyncio.to_thread(fleet.server.restart)
        else:
            victim = fleet.pick_worker(rng)
            victim.signal(signal.SIGKILL if fault == "kill" else signal.SIGTERM)
            fleet.start_worker()
        tally.faults[fault] += 1
        print(f"  t={time.monotonic() - args.t0:6.1f}s  {fault}", flush=True)


async def _load(
    fleet: Fleet, args: argparse.Namespace, loras: list[LoRARequest], tally: Tally
) -> None:
    rng = random.Random(args.seed)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    tenants: list[str | None] = [None, *(f"tenant{i}" for i in range(args.tenants))]
    stop = asyncio.Event()
    chaos = asyncio.create_task(_chaos(fleet, args, random.Random(args.seed + 1), tally, stop))
    async with Client(fleet.server.url, queue_name=fleet.base.queue, connect_timeout=15) as client:
        jobs = []
        deadline = args.t0 + args.duration
        while len(jobs) < args.jobs and time.monotonic() < deadline:
            job = _one_job(client, len(jobs), rng, loras, params, tally, tenants)
            jobs.append(asyncio.create_task(job))
            await asyncio.sleep(1 / args.rate)
        stop.set()
        await chaos
        print(f"  load over: {len(jobs)} jobs; settling for at most {args.settle:g}s", flush=True)
        done, pending = await asyncio.wait(jobs, timeout=args.settle)
        for task in pending:
            task.cancel()
        tally.lost += [f"unsettled-{i}" for i in range(len(pending))]
        for task in done:
            task.result()  # a bug in the soak itself must not hide


def _executions(url: str, job_ids: list[str]) -> tuple[int, int]:
    """(jobs whose final result came from attempt >= 2, extra final events)."""
    reruns = extra = 0
    with redis.Redis.from_url(url) as r:
        for job_id in job_ids:
            finals = [decode_event(f[FIELD]) for _, f in r.xrange(stream_key(job_id)) if FIELD in f]
            finals = [e for e in finals if e.final]
            reruns += any(e.attempt > 1 for e in finals[:1])
            extra += max(0, len(finals) - 1)
    return reruns, extra


@dataclass
class LedgerCheck:
    """The ledger against the results the client received."""

    twice: int = 0
    missing: int = 0
    totals_equal: bool = False
    received: UsageRow = field(default_factory=UsageRow)
    ledger: UsageRow = field(default_factory=UsageRow)
    waste: list[WasteRow] = field(default_factory=list)


def _check_ledger(url: str, tally: Tally) -> LedgerCheck:
    """Compare the ledger with the usage on the results received: per job (its dedupe
    record holds the usage it was counted with) and per tenant and adapter (the counters)."""
    check = LedgerCheck()
    with redis.Redis.from_url(url) as r:
        pipe = r.pipeline(transaction=False)
        for job_id in tally.usage:
            pipe.get(metered_key(job_id))
        # The soak's own fresh Redis holds only markers of the current form (strings).
        for (_, _, usage), recorded in zip(tally.usage.values(), pipe.execute(), strict=True):
            if recorded is None:
                check.missing += 1
            elif recorded_usage(recorded) != usage:
                check.twice += 1  # counted with another run's usage than the one received

    async def read() -> UsageReport:
        client = redis.asyncio.Redis.from_url(url)
        try:
            return await read_usage(client, by="tenant,adapter")
        finally:
            await client.aclose()

    report = asyncio.run(read())
    expected: dict[tuple[str, str], UsageRow] = {}
    for tenant, adapter, usage in tally.usage.values():
        key = (tenant or NO_TENANT, adapter or BASE_ADAPTER)
        row = expected.setdefault(key, UsageRow(*key))
        row.requests += 1
        row.prompt_tokens += usage.prompt_tokens
        row.completion_tokens += usage.completion_tokens
        row.engine_us += to_us(usage.engine_s)
        row.adapter_load_us += to_us(usage.adapter_load_s)
    got = {(row.tenant, row.adapter): row for row in report.rows}
    for key in expected.keys() | got.keys():
        surplus = got.get(key, UsageRow()).requests - expected.get(key, UsageRow()).requests
        check.twice += max(surplus, 0)
    check.totals_equal = expected == got
    for row in expected.values():
        check.received = _add(check.received, row)
    check.ledger = report.total
    check.waste = report.waste
    return check


def _add(total: UsageRow, row: UsageRow) -> UsageRow:
    return UsageRow(
        requests=total.requests + row.requests,
        prompt_tokens=total.prompt_tokens + row.prompt_tokens,
        completion_tokens=total.completion_tokens + row.completion_tokens,
        engine_us=total.engine_us + row.engine_us,
        adapter_load_us=total.adapter_load_us + row.adapter_load_us,
    )


def _totals(row: UsageRow) -> str:
    return (
        f"{row.requests} req, {row.prompt_tokens} + {row.completion_tokens} tokens, "
        f"engine {row.engine_us} us, adapter load {row.adapter_load_us} us"
    )


def _report(
    args: argparse.Namespace, tally: Tally, reruns: int, extra: int, ledger: LedgerCheck
) -> bool:
    duplicates = sum(1 for n in tally.delivered.values() if n > 1)
    wrong = sum(len(v) - 1 for v in tally.outputs.values())
    failed = sum(tally.failed.values())
    rows = [
        ("duration (s)", f"{time.monotonic() - args.t0:.0f}"),
        ("jobs enqueued", tally.enqueued),
        ("workers killed (SIGKILL)", tally.faults["kill"]),
        ("workers drained (SIGTERM)", tally.faults["drain"]),
        ("Redis restarts", tally.faults["redis"]),
        ("jobs completed", tally.completed),
        ("jobs failed (typed errors, must be 0)", f"{failed} {dict(tally.failed) or ''}"),
        ("jobs lost (must be 0)", len(tally.lost)),
        ("duplicate results delivered (must be 0)", duplicates),
        ("garbled streams (must be 0)", tally.garbled),
        ("wrong outputs (must be 0)", wrong),
        ("re-runs (final result from attempt >= 2)", reruns),
        ("extra executions (deduplicated by clients)", extra),
        ("streams restarted with different text", tally.stream_restarts),
        ("tenants (+ jobs without one)", args.tenants),
        ("usage received by the client", _totals(ledger.received)),
        ("usage in the ledger", _totals(ledger.ledger)),
        ("ledger totals equal, per tenant x adapter", "yes" if ledger.totals_equal else "NO"),
        ("ledger entries counted twice (must be 0)", ledger.twice),
        ("ledger entries missing (must be 0)", ledger.missing),
        ("waste: runs not delivered", sum(w.attempts for w in ledger.waste)),
        ("waste: completion tokens", sum(w.completion_tokens for w in ledger.waste)),
    ]
    rows += [
        (f"  waste of {w.worker}", f"{w.attempts} runs, {w.completion_tokens} tokens")
        for w in ledger.waste
    ]
    for label, value in rows:
        print(f"{label:<46} {value}")
    metering_ok = ledger.totals_equal and not (ledger.twice or ledger.missing)
    return metering_ok and not (failed or tally.lost or duplicates or tally.garbled or wrong)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--duration", type=float, default=180, help="seconds of load (default 180)")
    p.add_argument("--jobs", type=int, default=4000, help="most jobs to enqueue (default 4000)")
    p.add_argument("--workers", type=int, default=2, help="workers running at once (default 2)")
    p.add_argument("--rate", type=float, default=20, help="jobs submitted per second")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per job (greedy)")
    p.add_argument("--chaos-every", type=float, default=10, help="seconds between faults")
    p.add_argument(
        "--heartbeat-ttl", type=float, default=5, help="workers' LORAFLEET_HEARTBEAT_TTL"
    )
    p.add_argument("--settle", type=float, default=120, help="most seconds to wait at the end")
    p.add_argument("--tenants", type=int, default=3, help="tenants the jobs run for")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="lorafleet-soak-") as tmp:
        root = Path(tmp)
        model, loras = _assets(root)
        server = EmbeddedRedis(persist=True, data_dir=root / "redis").start()
        base = WorkerConfig.create(
            model=str(model),
            device="cpu",
            adapter_roots=(str(root / "adapters"),),
            redis_url=server.url,
            queue=f"lorafleet:soak:{uuid.uuid4().hex[:8]}",
            max_num_seqs=32,
            kv_cache_mb=64,
            heartbeat_ttl=args.heartbeat_ttl,
            drain_timeout=5,
        )
        (root / "logs").mkdir()
        fleet = Fleet(server, base, root / "logs")
        try:
            for _ in range(args.workers):
                fleet.start_worker()
            for worker in fleet.workers:
                worker.wait_ready(timeout=300)
            print(
                f"soak: {args.workers} workers ready on {server.url} (AOF on); load starts",
                flush=True,
            )
            tally = Tally()
            args.t0 = time.monotonic()
            asyncio.run(_load(fleet, args, loras, tally))
            reruns, extra = _executions(server.url, tally.job_ids)
            fleet.stop_all()  # drained: every run they finish is in the ledger first
            ledger = _check_ledger(server.url, tally)
        finally:
            fleet.stop_all()
            server.stop()
    ok = _report(args, tally, reruns, extra, ledger)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
