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
same Redis, one with metering on, one with ``LORAFLEET_METERING=0``. Bursts rotate among
jobs without a tenant and jobs of several tenants, each on the metered and on the
unmetered worker (metering is the ledger write in each final event's transaction; tenants
add their quota bookkeeping either way), and the no-op worker, ``--rounds`` times; each
metered side is compared with the unmetered side of the same jobs, best against best and
as the median of the rounds' ratios (sides a moment apart see the same machine):

    python benchmarks/bench_pipeline.py --metering --burst 1000 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
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
    url: str,
    n: int,
    loras: list[LoRARequest | None],
    queue: str = PIPE_QUEUE,
    tenants: int = 0,
) -> float:
    """jobs/s of a burst of ``n``; with ``tenants``, the jobs go to that many tenants."""
    async with Client(url, queue_name=queue) as client:
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
    parser.add_argument("--rounds", type=int, default=3, help="bursts per side (best is kept)")
    parser.add_argument("--adapters", type=int, default=4, help="adapters mixed with the base")
    parser.add_argument("--max-num-seqs", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cuda-graphs", action="store_true", help="worker decodes from graphs")
    parser.add_argument(
        "--metering", action="store_true", help="compare bursts with metering on and off"
    )
    parser.add_argument("--tenants", type=int, default=4, help="with --metering: tenants")
    parser.add_argument("--noop-worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.noop_worker:
        url, poll_delay, max_jobs = args.noop_worker
        run_noop_worker(url, float(poll_delay), int(max_jobs))
        return

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
                off = replace(config, queue=UNMETERED_QUEUE, metering=False, name="unmetered")
                on = replace(config, name="metered")
                with (
                    WorkerProcess(on, log_path=Path(tmp) / "metered.log"),
                    WorkerProcess(off, log_path=Path(tmp) / "unmetered.log"),
                ):
                    results = asyncio.run(measure_metering(server.url, args, loras))
                report_metering(args, config, results)
                return
            with WorkerProcess(config, log_path=Path(tmp) / "worker.log"):
                results = asyncio.run(measure(server.url, args, loras))
        finally:
            noop_proc.terminate()
            noop_proc.wait(15)
        results["engine_burst"] = engine_alone(model, args.burst, args.rounds, loras)
    report(args, config, results)


async def measure(url: str, args, loras) -> dict[str, object]:
    await pipeline_burst(url, 64, loras)  # warm-up: adapters loaded, first steps done
    await noop_burst(url, 64)
    return {
        "pipe_light": await pipeline_light(url, args.light, loras),
        "noop_light": await noop_light(url, args.light),
        "pipe_burst": max(
            [await pipeline_burst(url, args.burst, loras) for _ in range(args.rounds)]
        ),
        "noop_burst": max([await noop_burst(url, args.burst) for _ in range(args.rounds)]),
    }


def busy_cpu_seconds() -> float:
    """CPU seconds this host spent busy so far, every process together (``/proc/stat``:
    user, nice, system, irq, softirq; not idle, I/O wait or time stolen by a hypervisor).
    Jobs per busy CPU-second is what a side costs whatever else slows the machine down:
    on a host whose speed drifts, a steadier figure than jobs per second."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


async def redis_cpu_seconds(redis: Redis) -> float:
    """CPU seconds the Redis server has used so far (``INFO cpu``)."""
    info = await redis.info("cpu")
    return info["used_cpu_user"] + info["used_cpu_sys"]


@dataclass
class MeteringRuns:
    """Per side, each round's jobs/s (``jobs_per_s``), jobs per busy CPU-second of the host
    (``per_cpu_s``) and the Redis server's CPU us per job (``redis_us``); over the run, the
    ledger script's Redis time per metered job, an XADD's per call, and script calls."""

    jobs_per_s: dict[str, list[float]]
    per_cpu_s: dict[str, list[float]]
    redis_us: dict[str, list[float]]
    eval_us_per_job: float
    xadd_us: float
    eval_calls: int


async def measure_metering(url: str, args, loras) -> MeteringRuns:
    """Bursts rotating among metered with tenants, metered without, unmetered and no-op,
    ``args.rounds`` times each (the order shifts every round, so none always goes first)."""
    n, off = args.burst, UNMETERED_QUEUE
    sides = {
        "tenants": lambda: pipeline_burst(url, n, loras, tenants=args.tenants),
        "off_tenants": lambda: pipeline_burst(url, n, loras, queue=off, tenants=args.tenants),
        "ledger": lambda: pipeline_burst(url, n, loras),
        "off": lambda: pipeline_burst(url, n, loras, queue=off),
        "noop": lambda: noop_burst(url, n),
    }
    await pipeline_burst(url, 64, loras, tenants=args.tenants)  # warm-up
    await pipeline_burst(url, 64, loras, queue=UNMETERED_QUEUE)
    await noop_burst(url, 64)
    runs, cpu, in_redis = ({side: [] for side in sides} for _ in range(3))
    redis = Redis.from_url(url)
    await redis.config_resetstat()
    order = list(sides)
    for i in range(args.rounds):
        for side in order[i % len(order) :] + order[: i % len(order)]:
            before, redis_before = busy_cpu_seconds(), await redis_cpu_seconds(redis)
            runs[side].append(await sides[side]())
            cpu[side].append(n / (busy_cpu_seconds() - before))
            in_redis[side].append((await redis_cpu_seconds(redis) - redis_before) / n * 1e6)
    # Time inside Redis of the ledger's script (EVAL: only metered jobs run it, one call per
    # publisher flush), per metered job: a figure that other processes on the host disturb
    # much less than jobs/s.
    stats = await redis.info("commandstats")
    await redis.aclose()
    evals, xadds = stats.get("cmdstat_eval", {}), stats.get("cmdstat_xadd", {})
    return MeteringRuns(
        runs,
        cpu,
        in_redis,
        eval_us_per_job=evals.get("usec", 0) / (2 * args.rounds * n),
        xadd_us=xadds.get("usec_per_call", 0.0),
        eval_calls=evals.get("calls", 0),
    )


def report_metering(args, config: WorkerConfig, found: MeteringRuns) -> None:
    """Best and median of each side; the ratios to metering off (the target: within 5%)."""
    runs, cpu, in_redis = found.jobs_per_s, found.per_cpu_s, found.redis_us
    best = {side: max(values) for side, values in runs.items()}
    median = {side: statistics.median(values) for side, values in runs.items()}
    print(
        f"metering overhead: tiny llama, max_tokens=1, base + {args.adapters} adapters, "
        f"bursts of {args.burst}, {args.rounds} rounds rotating; "
        f"{platform.node()} ({os.cpu_count()} cores, Python {platform.python_version()}, "
        f"load average {os.getloadavg()[0]:.1f})"
    )
    print(f"{'':42}{'best':>7}{'median':>8}{'/ no-op':>9}  all rounds (jobs/s)")
    labels = {
        "tenants": f"metering on, jobs of {args.tenants} tenants",
        "off_tenants": f"metering off, jobs of {args.tenants} tenants",
        "ledger": "metering on, jobs without tenant",
        "off": "metering off (LORAFLEET_METERING=0)",
        "noop": "arq no-op",
    }
    for side, label in labels.items():
        shown = " / ".join(f"{x:.0f}" for x in runs[side])
        ratio = best[side] / best["noop"]
        print(f"{label:42}{best[side]:>7.0f}{median[side]:>8.0f}{ratio:>9.1%}  {shown}")
    for side, off in (("ledger", "off"), ("tenants", "off_tenants")):
        b = best[side] / best[off]
        m = statistics.median(x / y for x, y in zip(runs[side], runs[off], strict=True))
        c = statistics.median(cpu[side]) / statistics.median(cpu[off])
        verdict = "within" if min(b, m) >= 0.95 else "OUTSIDE"
        print(
            f"{labels[side]} / {labels[off]}: best {b:.3f}, median of rounds {m:.3f} "
            f"({verdict} 5%); jobs per busy CPU-second {c:.3f}"
        )
    print("jobs per busy CPU-second of the host, median and all rounds; Redis CPU us per job:")
    for side, label in labels.items():
        shown = " / ".join(f"{x:.0f}" for x in cpu[side])
        redis_us = statistics.median(in_redis[side])
        print(f"{label:42}{statistics.median(cpu[side]):>7.0f}  {shown}  | Redis {redis_us:.0f}")
    print(
        f"inside Redis: the ledger script {found.eval_us_per_job:.1f} us per metered job "
        f"({found.eval_calls} calls), for scale an XADD of a stream event {found.xadd_us:.1f} us"
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
