"""A noisy tenant against a quiet one, with and without a quota: the quiet tenant's latency.

    python scripts/noisy_tenant.py --quiet-jobs 40 --flood 64

One embedded Redis and one worker (tiny random Llama on CPU). The quiet tenant sends
``--quiet-jobs`` requests one after another (greedy, ``--quiet-tokens`` tokens) and its
end-to-end latencies are measured in three phases:

1. alone;
2. while the noisy tenant keeps ``--flood`` long jobs outstanding (``--noisy-tokens``
   tokens each, resubmitted as they finish), with no quota;
3. the same flood, the noisy tenant held to ``--max-in-flight`` jobs in flight (refused
   submits wait the ``retry_after`` they are told, then try again).

Printed: per phase, the quiet tenant's p50 / p99 / max latency, the noisy jobs completed
and the refusals. The quota should bring phase 3's quiet latency back near phase 1's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from lorafleet.producer import Client, SamplingParams
from lorafleet.producer.errors import QuotaExceededError
from lorafleet.producer.redis_server import EmbeddedRedis
from lorafleet.worker.local.launcher import WorkerProcess
from lorafleet.worker.serve.settings import WorkerConfig


async def quiet_phase(client: Client, args: argparse.Namespace, tenant: str) -> list[float]:
    params = SamplingParams(max_tokens=args.quiet_tokens, temperature=0.0, ignore_eos=True)
    latencies = []
    for i in range(args.quiet_jobs):
        t0 = time.perf_counter()
        await (await client.submit(f"quiet {i}", params, tenant=tenant)).result()
        latencies.append(time.perf_counter() - t0)
    return latencies


async def flood(client: Client, args: argparse.Namespace, stop: asyncio.Event) -> tuple[int, int]:
    """Keep ``args.flood`` noisy jobs outstanding until ``stop``; (completed, refused)."""
    params = SamplingParams(max_tokens=args.noisy_tokens, temperature=0.0, ignore_eos=True)
    done = refused = 0

    async def one_slot(k: int) -> None:
        nonlocal done, refused
        while not stop.is_set():
            try:
                handle = await client.submit(f"noisy {k}", params, tenant="noisy")
            except QuotaExceededError as e:
                refused += 1
                await asyncio.sleep(max(e.retry_after, 0.05))
                continue
            await handle.result()
            done += 1

    await asyncio.gather(*(one_slot(k) for k in range(args.flood)))
    return done, refused


async def run(url: str, queue: str, args: argparse.Namespace) -> list[tuple]:
    rows = []
    async with Client(url, queue_name=queue, max_connections=args.flood + 8) as client:
        await quiet_phase(client, args, "quiet")  # warm-up
        rows.append(("quiet alone", await quiet_phase(client, args, "quiet"), 0, 0))
        for label, quota in (("noisy flood, no quota", False), ("noisy flood, quota", True)):
            if quota:
                await client.set_quota("noisy", max_in_flight=args.max_in_flight)
            stop = asyncio.Event()
            noisy = asyncio.create_task(flood(client, args, stop))
            await asyncio.sleep(args.ramp)  # the flood fills the queue first
            latencies = await quiet_phase(client, args, f"quiet-{uuid.uuid4().hex[:4]}")
            stop.set()
            done, refused = await noisy
            rows.append((label, latencies, done, refused))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quiet-jobs", type=int, default=40)
    p.add_argument("--quiet-tokens", type=int, default=8)
    p.add_argument("--flood", type=int, default=64, help="noisy jobs kept outstanding")
    p.add_argument("--noisy-tokens", type=int, default=64)
    p.add_argument("--max-in-flight", type=int, default=4, help="the noisy tenant's quota")
    p.add_argument("--ramp", type=float, default=3.0, help="seconds of flood before measuring")
    args = p.parse_args()
    from lorafleet.worker.demo.synthetic import build_random_model

    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis() as server:
        model = build_random_model(Path(tmp) / "model", "llama", seed=1)
        config = WorkerConfig.create(
            model=str(model),
            device="cpu",
            redis_url=server.url,
            queue=f"noisy:{uuid.uuid4().hex[:6]}",
            max_num_seqs=16,
        )
        with WorkerProcess(config, log_path=Path(tmp) / "worker.log"):
            rows = asyncio.run(run(server.url, config.queue, args))
    print(
        f"noisy tenant: 1 worker (max_num_seqs 16, max_jobs {config.jobs_at_once}), quiet "
        f"{args.quiet_jobs} x {args.quiet_tokens} tokens sequential, flood {args.flood} x "
        f"{args.noisy_tokens} tokens, quota max_in_flight {args.max_in_flight}; "
        f"{platform.node()} ({os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f})"
    )
    print(f"{'phase':26}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'noisy done':>12}{'refused':>9}")
    for label, lat, done, refused in rows:
        q = statistics.quantiles(lat, n=100, method="inclusive")
        print(
            f"{label:26}{q[49] * 1000:>9.0f}{q[98] * 1000:>9.0f}{max(lat) * 1000:>9.0f}"
            f"{done:>12}{refused:>9}"
        )


if __name__ == "__main__":
    main()
