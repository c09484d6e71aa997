"""Queue pipeline overhead: lorafleet end to end vs plain arq no-op jobs, in one run.

Both sides share one embedded Redis, the same arq settings (poll delay, max_jobs, msgpack
serializer) and the same enqueue call; they differ in what runs: lorafleet's worker runs a
real generation of one token on the tiny model (mixed adapters and the base model) and
streams it back, the no-op worker returns at once.

- light load: one job at a time; latency from enqueue to the first token (lorafleet: the
  first stream delta; no-op: its result seen by ``Job.result`` polling every 1 ms, arq's
  own floor).
- throughput: a burst of jobs submitted at once; jobs/s until the last result is in
  (lorafleet: ``Client.generate``; no-op: enqueue all, then watch the result keys).
- engine alone: the same burst through the in-process ``LLM.generate`` (no queue), the
  ceiling the pipeline's throughput is bounded by.

    python benchmarks/bench_pipeline.py --light 200 --burst 1000

``--metering`` measures the cost of usage metering instead: two lorafleet workers on the
same Redis, one with metering on, one with ``LORAFLEET_METERING=0`` (metering is the ledger
write in each final event's transaction, and the fold of its pending counts, which each
burst ends with; tenants add their quota bookkeeping either way).
Each round runs a burst of jobs without a tenant on each worker back to back, then a burst
of jobs of several tenants on each, then one of no-op jobs; which worker goes first
alternates. Each round's metered / unmetered ratio pairs two bursts a moment apart, and
the geometric mean of many rounds' ratios, with its 95% confidence interval, is the
figure: this 2-core VM's speed drifts 2x within seconds, so the bursts must be many and
short (a single burst's ratio spreads +-20%). Half the rounds run with the two workers'
places (queue, start order) swapped. ``--control`` runs both workers unmetered: its
interval shows the method's own spread around 1.000:

    python benchmarks/bench_pipeline.py --metering --burst 100 --rounds 300
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from arq.connections import RedisSettings, create_pool
from redis.asyncio import Redis

from lorafleet.producer import Client, LoRARequest, SamplingParams
from lorafleet.producer.codec import arq_deserialize, arq_serialize
from lorafleet.producer.keys import arq_result_key
from lorafleet.producer.ledger import fold_pending
from lorafleet.producer.redis_server import EmbeddedRedis
from lorafleet.worker.local.launcher import WorkerProcess
from lorafleet.worker.serve.settings import WorkerConfig

NOOP_QUEUE = "bench:noop"
PIPE_QUEUE = "bench:lorafleet"
UNMETERED_QUEUE = "bench:lorafleet-unmetered"
ONE_TOKEN = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)


# -- the no-op side --------------------------------------------------------------------------


async def noop(ctx: dict, payload: bytes) -> bytes:
    return b""


def run_noop_worker(url: str, poll_delay: float, max_jobs: int) -> None:
    """Child process: an arq worker with lorafleet's settings and a function that does nothing."""
    from arq.worker import run_worker

    run_worker(
        {
            "functions": [noop],
            "queue_name": NOOP_QUEUE,
            "redis_settings": RedisSettings.from_dsn(url),
            "job_serializer": arq_serialize,
            "job_deserializer": arq_deserialize,
            "max_jobs": max_jobs,
            "poll_delay": poll_delay,
            "log_results": False,
        }
    )


async def noop_light(url: str, n: int) -> list[float]:
    pool = await create_pool(
        RedisSettings.from_dsn(url),
        job_serializer=arq_serialize,
        job_deserializer=arq_deserialize,
        default_queue_name=NOOP_QUEUE,
    )
    latencies = []
    for _ in range(n):
        t0 = time.perf_counter()
        job = await pool.enqueue_job("noop", b"x")
        await job.result(poll_delay=0.001)
        latencies.append(time.perf_counter() - t0)
    await pool.aclose()
    return latencies


async def noop_burst(url: str, n: int) -> float:
    pool = await create_pool(
        RedisSettings.from_dsn(url),
        job_serializer=arq_serialize,
        job_deserializer=arq_deserialize,
        default_queue_name=NOOP_QUEUE,
    )
    t0 = time.perf_counter()
    jobs = await asyncio.gather(*(pool.enqueue_job("noop", b"x") for _ in range(n)))
    keys = [arq_result_key(j.job_id) for j in jobs]
    while await pool.exists(*keys) < n:
        await asyncio.sleep(0.002)
    elapsed = time.perf_counter() - t0
    await pool.aclose()
    return n / elapsed


# -- the lorafleet side -------------------------------------------------------------------


async def pipeline_light(url: str, n: int, loras: list[LoRARequest | None]) -> list[float]:
    latencies = []
    async with Client(url, queue_name=PIPE_QUEUE) as client:
        for i in range(n):
            t0 = time.perf_counter()
            handle = await client.submit(f"light {i}", ONE_TOKEN, loras[i % len(loras)])
            async for _ in handle.stream():
                latencies.append(time.perf_counter() - t0)
                break
            await handle.result()
    return latencies


async def pipeline_burst(
    client: Client, redis: Redis, n: int, loras: list[LoRARequest | None], tenants: int = 0
) -> float:
    """jobs/s of a burst of ``n`` through ``client``; with ``tenants``, the jobs go to that
    many tenants. The burst ends when every result is in and the ledger's pending counts are
    added to its buckets (``fold_pending`` on ``redis``), so a metered burst pays for its
    fold whenever a worker would have run it."""
    prompts = [f"burst {i}" for i in range(n)]
    per_prompt = [loras[i % len(loras)] for i in range(n)]
    t0 = time.perf_counter()
    if tenants:
        # One generate per tenant, all at once: the same burst, split among tenants.
        await asyncio.gather(
            *(
                client.generate(
                    prompts[t::tenants],
                    ONE_TOKEN,
                    lora_request=per_prompt[t::tenants],
                    tenant=f"bench{t}",
                )
                for t in range(tenants)
            )
        )
    else:
        await client.generate(prompts, ONE_TOKEN, lora_request=per_prompt)
    await fold_pending(redis)
    return n / (time.perf_counter() - t0)


def engine_alone(model: Path, n: int, rounds: int, loras: list[LoRARequest | None]) -> float:
    from lorafleet.worker import LLM

    llm = LLM(model=str(model), max_loras=4)
    prompts = [f"burst {i}" for i in range(n)]
    per_prompt = [loras[i % len(loras)] for i in range(n)]
    llm.generate(prompts[:64], ONE_TOKEN, lora_request=per_prompt[:64])  # warm-up
    best = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        llm.generate(prompts, ONE_TOKEN, lora_request=per_prompt)
        best = max(best, n / (time.perf_counter() - t0))
    return best


# -- driver --------------------------------------------------------------------------------


def build_assets(root: Path, adapters: int) -> tuple[Path, list[LoRARequest | None]]:
    from lorafleet.worker.demo.synthetic import build_random_adapter, build_random_model

    model = build_random_model(root / "model", "llama", seed=1)
    (root / "adapters").mkdir()
    loras: list[LoRARequest | None] = [None]
    for i in range(adapters):
        path = build_random_adapter(model, root / "adapters" / f"a{i}", rank=8, seed=i)
        loras.append(LoRARequest(f"a{i}", i + 1, str(path)))
    return model, loras


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--light", type=int, default=200, help="sequential jobs per side")
    parser.add_argument("--burst", type=int, default=1000, help="jobs per throughput burst")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="bursts per side (best is kept); with --metering: paired rounds, half per placement",
    )
    parser.add_argument("--adapters", type=int, default=4, help="adapters mixed with the base")
    parser.add_argument("--max-num-seqs", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cuda-graphs", action="store_true", help="worker decodes from graphs")
    parser.add_argument(
        "--metering", action="store_true", help="compare bursts with metering on and off"
    )
    parser.add_argument("--tenants", type=int, default=4, help="with --metering: tenants")
    parser.add_argument(
        "--control",
        action="store_true",
        help="with --metering: both workers unmetered, to see the method's own spread",
    )
    parser.add_argument("--noop-worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.noop_worker:
        url, poll_delay, max_jobs = args.noop_worker
        run_noop_worker(url, float(poll_delay), int(max_jobs))
        return
    if args.control and not args.metering:
        parser.error("--control goes with --metering")
    if args.metering and args.rounds < 4:
        parser.error("--metering needs --rounds >= 4 (half in each placement, two or more each)")

    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis() as server:
        model, loras = build_assets(Path(tmp), args.adapters)
        config = WorkerConfig.create(
            model=str(model),
            device=args.device,
            adapter_roots=(str(Path(tmp) / "adapters"),),
            redis_url=server.url,
            queue=PIPE_QUEUE,
            max_num_seqs=args.max_num_seqs,
            cuda_graphs=args.cuda_graphs,
        )
        noop_proc = subprocess.Popen(
            [sys.executable, __file__, "--noop-worker", server.url, str(config.poll_delay),
             str(config.jobs_at_once)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            if args.metering:
                halves = []
                for swapped in (False, True):
                    on, off = placed(config, swapped, metering=not args.control)
                    first, second = (off, on) if swapped else (on, off)
                    with (
                        WorkerProcess(first, log_path=Path(tmp) / f"{first.name}.log"),
                        WorkerProcess(second, log_path=Path(tmp) / f"{second.name}.log"),
                    ):
                        run = measure_metering(server.url, args, loras, on.queue, off.queue)
                        halves.append(asyncio.run(run))
                report_metering(args, halves)
                return
            with WorkerProcess(config, log_path=Path(tmp) / "worker.log"):
                results = asyncio.run(measure(server.url, args, loras))
        finally:
            noop_proc.terminate()
            noop_proc.wait(15)
        results["engine_burst"] = engine_alone(model, args.burst, args.rounds, loras)
    report(args, config, results)


async def measure(url: str, args, loras) -> dict[str, object]:
    async with Redis.from_url(url) as redis, Client(url, queue_name=PIPE_QUEUE) as client:
        # Warm-up: adapters loaded, first steps done.
        await pipeline_burst(client, redis, 64, loras)
        await noop_burst(url, 64)
        return {
            "pipe_light": await pipeline_light(url, args.light, loras),
            "noop_light": await noop_light(url, args.light),
            "pipe_burst": max(
                [await pipeline_burst(client, redis, args.burst, loras) for _ in range(args.rounds)]
            ),
            "noop_burst": max([await noop_burst(url, args.burst) for _ in range(args.rounds)]),
        }


#: The metered sides, each with the unmetered side of the same jobs.
PAIRS = (("ledger", "off"), ("tenants", "off_tenants"))


@dataclass
class MeteringRuns:
    """Per side (and ``noop``), each round's jobs/s; per metered side, each round's ratio to
    its unmetered twin run right before or after it; over the run, the time inside Redis
    per metered job of the ledger's record script and of its fold, an XADD's per call, and
    the two scripts' calls."""

    jobs_per_s: dict[str, list[float]]
    ratios: dict[str, list[float]]
    record_us_per_job: float
    fold_us_per_job: float
    xadd_us: float
    record_calls: int
    fold_calls: int


def placed(config: WorkerConfig, swapped: bool, *, metering: bool) -> tuple[WorkerConfig, ...]:
    """The metered worker's config and the unmetered one's (``metering=False``, for
    ``--control``, leaves both unmetered). Unswapped, the metered one takes ``PIPE_QUEUE``
    and is started first; swapped, the two trade places. A place can be worth a few percent
    on this host (in a control run the worker started first ran slower), so a run measures
    half its rounds in each placement."""
    queues = (UNMETERED_QUEUE, PIPE_QUEUE) if swapped else (PIPE_QUEUE, UNMETERED_QUEUE)
    suffix = "-swapped" if swapped else ""
    return (
        replace(config, queue=queues[0], metering=metering, name="metered" + suffix),
        replace(config, queue=queues[1], metering=False, name="unmetered" + suffix),
    )


async def measure_metering(
    url: str, args, loras, metered_queue: str, unmetered_queue: str
) -> MeteringRuns:
    """Half of ``args.rounds`` rounds; in each, every metered side and its unmetered twin
    run back to back (which goes first alternates round by round, so a drift of the host's
    speed favours neither), then no-op."""
    n = args.burst
    runs: dict[str, list[float]] = {side: [] for pair in PAIRS for side in pair}
    runs["noop"] = []
    ratios: dict[str, list[float]] = {on: [] for on, _ in PAIRS}
    redis = Redis.from_url(url)
    async with (
        Client(url, queue_name=metered_queue) as metered,
        Client(url, queue_name=unmetered_queue) as unmetered,
    ):
        clients = {
            "ledger": metered,
            "tenants": metered,
            "off": unmetered,
            "off_tenants": unmetered,
        }
        tenants = {"ledger": 0, "tenants": args.tenants}  # per burst of each pair
        for on, off in PAIRS:  # warm-up: adapters loaded, tenants seen
            for side in (on, off):
                await pipeline_burst(clients[side], redis, 64, loras, tenants[on])
        await noop_burst(url, 64)
        await redis.config_resetstat()
        for i in range(args.rounds // 2):
            for on, off in PAIRS:
                for side in (on, off) if i % 2 == 0 else (off, on):
                    rate = await pipeline_burst(clients[side], redis, n, loras, tenants[on])
                    runs[side].append(rate)
                ratios[on].append(runs[on][-1] / runs[off][-1])
            runs["noop"].append(await noop_burst(url, n))
    # Time inside Redis of the ledger's scripts, per metered job: a figure that the host's
    # drift disturbs much less. The record script is an EVAL (one call per publisher flush
    # of a metered worker), the fold an EVALSHA (after each burst, and the workers' own).
    stats = await redis.info("commandstats")
    await redis.aclose()
    jobs = len(PAIRS) * (args.rounds // 2) * n
    record, fold = stats.get("cmdstat_eval", {}), stats.get("cmdstat_evalsha", {})
    return MeteringRuns(
        runs,
        ratios,
        record_us_per_job=record.get("usec", 0) / jobs,
        fold_us_per_job=fold.get("usec", 0) / jobs,
        xadd_us=stats.get("cmdstat_xadd", {}).get("usec_per_call", 0.0),
        record_calls=record.get("calls", 0),
        fold_calls=fold.get("calls", 0),
    )


def geometric_interval(ratios: list[float]) -> tuple[float, float, float]:
    """Geometric mean of ``ratios`` and its 95% confidence interval (normal on the logs:
    rounds are independent pairs, their log-ratios spread symmetrically)."""
    logs = [math.log(r) for r in ratios]
    mean = statistics.fmean(logs)
    half = 1.96 * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def report_metering(args, halves: list[MeteringRuns]) -> None:
    """Each side's jobs/s and share of no-op; each metered side's ratio to its unmetered twin
    over both placements, with its confidence interval (the target: within 5%), and per
    placement."""
    runs = {side: [x for h in halves for x in h.jobs_per_s[side]] for side in halves[0].jobs_per_s}
    ratios = {side: [x for h in halves for x in h.ratios[side]] for side in halves[0].ratios}
    control = " (CONTROL: both workers unmetered)" if args.control else ""
    print(
        f"metering overhead{control}: tiny llama, max_tokens=1, base + {args.adapters} "
        f"adapters, bursts of {args.burst}, {args.rounds} rounds (half in each placement); "
        f"{platform.node()} ({os.cpu_count()} cores, Python {platform.python_version()}, "
        f"load average {os.getloadavg()[0]:.1f})"
    )
    labels = {
        "ledger": "metering on, jobs without tenant",
        "off": "metering off (LORAFLEET_METERING=0)",
        "tenants": f"metering on, jobs of {args.tenants} tenants",
        "off_tenants": f"metering off, jobs of {args.tenants} tenants",
        "noop": "arq no-op",
    }
    noop = statistics.median(runs["noop"])
    print(f"{'':42}{'median':>8}{'best':>7}{'/ no-op':>9}  (jobs/s; / no-op: of the medians)")
    for side, label in labels.items():
        median = statistics.median(runs[side])
        print(f"{label:42}{median:>8.0f}{max(runs[side]):>7.0f}{median / noop:>9.1%}")
    for on, _off in PAIRS:
        mean, lo, hi = geometric_interval(ratios[on])
        if lo >= 0.95:
            verdict = "WITHIN 5%, the whole interval"
        elif mean >= 0.95:
            verdict = "within 5% by the estimate, not by all of its interval"
        else:
            verdict = "OUTSIDE 5%"
        per_half = ", ".join(f"{geometric_interval(h.ratios[on])[0]:.3f}" for h in halves)
        print(
            f"{labels[on]} / its unmetered twin: {mean:.3f} (95% CI {lo:.3f}-{hi:.3f}; "
            f"median of rounds {statistics.median(ratios[on]):.3f}; per placement "
            f"{per_half}): {verdict}"
        )
    print(
        "inside Redis, per metered job: the ledger's record script "
        f"{statistics.fmean(h.record_us_per_job for h in halves):.1f} us "
        f"({sum(h.record_calls for h in halves)} calls), its fold "
        f"{statistics.fmean(h.fold_us_per_job for h in halves):.1f} us "
        f"({sum(h.fold_calls for h in halves)} calls); for scale an XADD of a stream event "
        f"{statistics.fmean(h.xadd_us for h in halves):.1f} us"
    )


def report(args, config: WorkerConfig, r: dict) -> None:
    p50, p99 = pct(r["pipe_light"], 50), pct(r["pipe_light"], 99)
    n50, n99 = pct(r["noop_light"], 50), pct(r["noop_light"], 99)
    ratio = r["pipe_burst"] / r["noop_burst"]
    print(
        f"pipeline benchmark: tiny llama, max_tokens=1, base + {args.adapters} adapters, "
        f"1 worker ({args.device}), poll_delay {config.poll_delay}s, max_jobs "
        f"{config.jobs_at_once}; {platform.node()} ({os.cpu_count()} cores, "
        f"Python {platform.python_version()})"
    )
    print(f"{'':34}{'lorafleet':>12}{'arq no-op':>12}")
    print(f"{'enqueue->first token p50 (ms)':34}{p50:>12.1f}{n50:>12.1f}")
    print(f"{'enqueue->first token p99 (ms)':34}{p99:>12.1f}{n99:>12.1f}")
    print(
        f"{'throughput, burst of ' + str(args.burst) + ' (jobs/s)':34}{r['pipe_burst']:>12.0f}{r['noop_burst']:>12.0f}"
    )
    print(f"{'engine alone, same burst (jobs/s)':34}{r['engine_burst']:>12.0f}")
    print(
        f"lorafleet throughput = {ratio:.0%} of arq no-op round trip, "
        f"{r['pipe_burst'] / r['engine_burst']:.0%} of the engine alone"
    )
    print(
        f"targets: p50 < 20 ms: {'met' if p50 < 20 else 'MISSED'}; "
        f"throughput >= 50% of no-op: {'met' if ratio >= 0.5 else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
