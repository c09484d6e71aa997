"""The fleet as one adapter cache: adapter-affine routing vs random routing, in one run.

Same code, same workload, same machine, one after the other: a fleet of ``--workers``
worker processes on one embedded Redis, started cold for each side, serves an open-loop
load test (Poisson arrivals at ``--rate``); the sides differ only in
``LORAFLEET_AFFINITY`` (on: lorafleet's routing, see docs/fleet.md; off: every worker takes
any job as it comes, which is random routing). Prefetch is on for both unless
``--no-prefetch``; ``--prefetch-ab`` adds a third side, affinity with prefetch off.

Each round runs every side once, the order alternating between rounds (a machine busy with
something else then hurts both sides alike); with ``--rounds`` above 1 the median ratios
follow. Printed per scenario, round and side: fleet-wide adapter disk loads and slot loads (the workers'
own Prometheus counters), run time (first send to last answer), TTFT p50 / p99 (client
clock), TTFT p50 of requests whose adapter the serving worker did not hold, per-worker
job counts, steals and affinity hits; then the ratios random / affinity.

Scenarios (``--scenarios``, comma-separated):

- ``issue``: 48 adapters, zipf(1.0), the issue's setting;
- ``twice``: 96 adapters, zipf(1.0): twice as many as the fleet's CPU caches hold;
- ``wide``: 160 adapters, zipf(0.8): flatter still; 360 jobs touch about 115 adapters, each
  read from disk at least once under any routing, which bounds the ratio near 2.3x;
- ``hot``: 48 adapters, zipf(1.7): the top adapter carries about half the traffic, so it
  must spread over several workers (per-worker job counts against their mean).

    python benchmarks/bench_fleet.py --scenarios issue,twice,wide,hot
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import shutil
import statistics
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

from lorafleet.producer import LoRARequest
from lorafleet.producer.loadreport import RequestRecord
from lorafleet.producer.loadtest import LoadTestSpec, run_load_test
from lorafleet.producer.redis_server import EmbeddedRedis, free_port
from lorafleet.producer.workload import AdapterMix, Arrivals, Length, Prompts, Workload
from lorafleet.worker.local.launcher import WorkerProcess
from lorafleet.worker.serve.settings import WorkerConfig

#: Adapters built with PEFT (about 2 s each here); the others are copies of them, each in
#: a folder of its own under its own id, which is all routing and the caches see.
DISTINCT_ADAPTERS = 8

#: name -> (adapters, zipf alpha). ``issue``: the issue's setting (the fleet's CPU caches
#: hold all 48); ``twice``: twice as many adapters as the fleet's CPU caches hold (96);
#: ``wide``: 160 flatter (360 jobs touch about 115 of them: as many reads under any
#: routing); ``hot``: one adapter about half the traffic.
SCENARIOS = {
    "issue": (48, 1.0),
    "twice": (96, 1.0),
    "wide": (160, 0.8),
    "hot": (48, 1.7),
}


@dataclass
class Side:
    """One side's figures."""

    name: str
    elapsed: float = 0.0
    records: list[RequestRecord] = field(default_factory=list)
    disk_loads: float = 0.0
    slot_loads: float = 0.0
    per_worker: dict[str, dict[str, float]] = field(default_factory=dict)
    cold_buckets: dict[float, float] = field(default_factory=dict)  # le -> count, summed

    def cold_p50(self) -> float:
        """TTFT p50 of jobs whose adapter their worker did not hold when it first saw them
        (from the workers' histograms, interpolated inside the bucket as Prometheus'
        ``histogram_quantile`` does)."""
        return bucket_quantile(self.cold_buckets, 0.5)

    def cold_count(self) -> float:
        return self.cold_buckets.get(float("inf"), 0.0)

    def ttfts(self) -> list[float]:
        return [r.ttft for r in self.records if r.ok and r.ttft is not None]

    def failed(self) -> int:
        return sum(not r.ok for r in self.records)


def pct(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def bucket_quantile(buckets: dict[float, float], q: float) -> float:
    """The ``q`` quantile of a cumulative histogram (``le`` -> count), linear in a bucket."""
    bounds = sorted(buckets)
    total = buckets.get(float("inf"), 0.0)
    if total == 0:
        return float("nan")
    rank, lower, below = q * total, 0.0, 0.0
    for le in bounds:
        count = buckets[le]
        if count >= rank:
            if le == float("inf"):
                return lower
            return lower + (le - lower) * (rank - below) / max(count - below, 1e-9)
        lower, below = le, count
    return lower


def build_assets(root: Path, adapters: int) -> tuple[Path, list[LoRARequest]]:
    from lorafleet.worker.demo.synthetic import build_random_adapter, build_random_model

    model = build_random_model(root / "model", "llama", seed=1)
    loras = []
    for i in range(adapters):
        folder = root / "adapters" / f"a{i}"
        if i < DISTINCT_ADAPTERS:
            build_random_adapter(model, folder, rank=8, seed=i)
        else:  # a copy in its own folder: read from disk and cached as an adapter of its own
            shutil.copytree(root / "adapters" / f"a{i % DISTINCT_ADAPTERS}", folder)
        loras.append(LoRARequest(f"a{i}", i + 1, str(folder)))
    return model, loras


_SAMPLE = re.compile(r"^(\w+)\{([^}]*)\} ([0-9.e+-]+)$")


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The worker's ``/metrics`` as {(name, labels): value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            labels = frozenset(
                tuple(kv.split("=", 1)) for kv in re.findall(r'\w+="[^"]*"', m.group(2))
            )
            labels = frozenset((k, v.strip('"')) for k, v in labels)
            out[(m.group(1), labels)] = float(m.group(3))
    return out


def metric(samples: dict, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def run_side(
    name: str,
    base: WorkerConfig,
    args: argparse.Namespace,
    loras: list[LoRARequest],
    alpha: float,
    logs: Path,
) -> Side:
    side = Side(name)
    with EmbeddedRedis() as server:
        queue = f"lorafleet:bench-fleet:{uuid.uuid4().hex[:6]}"
        workers = []
        for i in range(args.workers):
            config = replace(
                base,
                redis_url=server.url,
                queue=queue,
                name=f"{name}-w{i}",
                metrics_port=free_port(),
            )
            workers.append(WorkerProcess(config, log_path=logs / f"{name}-w{i}.log").start())
        try:
            for w in workers:
                w.wait_ready(timeout=300)
            mix = AdapterMix("zipf", len(loras), alpha)
            workload = Workload(
                mix, Prompts(Length(args.prompt_chars, args.prompt_chars)),
                Length(args.tokens, args.tokens), seed=args.seed,
            )  # fmt: skip
            spec = LoadTestSpec(
                workload,
                loras,
                arrivals=Arrivals(args.rate),
                num_requests=args.jobs,
                warmup=0,
                request_timeout=300,
            )
            side.records, side.elapsed = asyncio.run(
                run_load_test(server.url, spec, queue_name=queue)
            )
            time.sleep(0.5)  # the engines' last snapshots reach their workers
            for w in workers:
                samples = scrape(w.config.metrics_port)
                disk = metric(samples, "lorafleet_adapter_loads_total", source="disk")
                slot = metric(samples, "lorafleet_adapter_slot_loads_total")
                for (n, ls), v in samples.items():
                    if n == "lorafleet_time_to_first_token_cold_adapter_seconds_bucket":
                        le = float(dict(ls)["le"].replace("+Inf", "inf"))
                        side.cold_buckets[le] = side.cold_buckets.get(le, 0.0) + v
                side.disk_loads += disk
                side.slot_loads += slot
                side.per_worker[w.config.name] = {
                    "jobs": metric(samples, "lorafleet_requests_total"),
                    "disk": disk,
                    "slot": slot,
                    "steals": metric(samples, "lorafleet_fleet_steals_total"),
                    "disk_seconds": metric(samples, "lorafleet_adapter_disk_load_seconds_total"),
                    "hits": metric(samples, "lorafleet_fleet_affinity_total", result="hit"),
                    "misses": metric(samples, "lorafleet_fleet_affinity_total", result="miss"),
                    "prefetched": metric(samples, "lorafleet_fleet_prefetches_total", fate="loaded"),
                    "prefetch_used": metric(samples, "lorafleet_fleet_prefetches_total", fate="used"),
                }  # fmt: skip
        finally:
            for w in workers:
                w.stop(timeout=30)
    return side


def report_scenario(title: str, sides: list[Side]) -> dict[str, float]:
    print(f"\n== {title}")
    rows = [
        ("adapter disk loads (fleet)", lambda s: s.disk_loads, "{:.0f}"),
        ("adapter slot loads (fleet)", lambda s: s.slot_loads, "{:.0f}"),
        ("  disk read per load (ms)", lambda s: _disk_ms(s), "{:.1f}"),
        ("run time (s)", lambda s: s.elapsed, "{:.2f}"),
        ("TTFT p50 (ms)", lambda s: pct(s.ttfts(), 50) * 1000, "{:.0f}"),
        ("TTFT p99 (ms)", lambda s: pct(s.ttfts(), 99) * 1000, "{:.0f}"),
        ("queue wait p50 (ms)", lambda s: _queue_p50(s) * 1000, "{:.0f}"),
        ("cold-adapter requests", lambda s: s.cold_count(), "{:.0f}"),
        ("  their TTFT p50 (ms)", lambda s: s.cold_p50() * 1000, "{:.0f}"),
        ("requests failed", lambda s: s.failed(), "{:.0f}"),
        ("steals", lambda s: sum(w["steals"] for w in s.per_worker.values()), "{:.0f}"),
        ("affinity hits / misses", None, ""),
        ("prefetched / used", None, ""),
        ("jobs per worker", None, ""),
        ("max worker jobs / mean", lambda s: _spread(s), "{:.2f}"),
    ]
    print(f"{'':30}" + "".join(f"{s.name:>22}" for s in sides))
    for label, fn, fmt in rows:
        cells = []
        for s in sides:
            if label == "jobs per worker":
                cells.append(" ".join(f"{w['jobs']:.0f}" for w in s.per_worker.values()))
            elif label == "affinity hits / misses":
                hits = sum(w["hits"] for w in s.per_worker.values())
                misses = sum(w["misses"] for w in s.per_worker.values())
                cells.append(f"{hits:.0f} / {misses:.0f}")
            elif label == "prefetched / used":
                got = sum(w["prefetched"] for w in s.per_worker.values())
                used = sum(w["prefetch_used"] for w in s.per_worker.values())
                cells.append(f"{got:.0f} / {used:.0f}")
            else:
                cells.append(fmt.format(fn(s)))
        print(f"{label:30}" + "".join(f"{c:>22}" for c in cells))
    if len(sides) > 2:
        off = sides[2]
        print(
            f"prefetch on/off (affinity both): cold-adapter TTFT p50 "
            f"{ours_cold(sides[0]):.0f} / {ours_cold(off):.0f} ms "
            f"({sides[0].cold_p50() / off.cold_p50():.2f}x), TTFT p50 "
            f"{pct(sides[0].ttfts(), 50) / pct(off.ttfts(), 50):.2f}x"
        )
    r = ratios(sides)
    print(
        f"ratios random/affinity: disk loads {r['disk']:.2f}x, slot loads {r['slot']:.2f}x; "
        f"affinity/random: run time {r['time']:.2f}x, TTFT p99 {r['p99']:.2f}x, "
        f"TTFT p50 {r['p50']:.2f}x"
        + (f"; prefetch on/off: cold-adapter TTFT p50 {r['cold']:.2f}x" if "cold" in r else "")
    )
    return r


def ratios(sides: list[Side]) -> dict[str, float]:
    """Goal ratios of one round: ``sides`` are affinity, random (, affinity without
    prefetch)."""
    ours, rnd = sides[0], sides[1]
    out = {
        "disk": rnd.disk_loads / max(ours.disk_loads, 1),
        "slot": rnd.slot_loads / max(ours.slot_loads, 1),
        "time": ours.elapsed / rnd.elapsed,
        "p99": pct(ours.ttfts(), 99) / pct(rnd.ttfts(), 99),
        "p50": pct(ours.ttfts(), 50) / pct(rnd.ttfts(), 50),
    }
    if len(sides) > 2:
        out["cold"] = ours.cold_p50() / sides[2].cold_p50()
    return out


def ours_cold(side: Side) -> float:
    return side.cold_p50() * 1000


def _disk_ms(side: Side) -> float:
    seconds = sum(w["disk_seconds"] for w in side.per_worker.values())
    return 1000 * seconds / side.disk_loads if side.disk_loads else float("nan")


def _queue_p50(side: Side) -> float:
    return pct([r.queue_wait for r in side.records if r.queue_wait is not None], 50)


def _spread(side: Side) -> float:
    jobs = [w["jobs"] for w in side.per_worker.values()]
    return max(jobs) / statistics.mean(jobs) if jobs and statistics.mean(jobs) else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", default="issue,twice,wide,hot")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--max-loras", type=int, default=4)
    parser.add_argument("--max-cpu-loras", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="engine threads per worker")
    parser.add_argument("--jobs", type=int, default=360)
    parser.add_argument("--rate", type=float, default=30.0, help="arrivals per second")
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--prompt-chars", type=int, default=32)
    parser.add_argument("--steal-after", type=float, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=None, help="engine batch size")
    parser.add_argument("--max-jobs", type=int, default=None, help="jobs a worker holds")
    parser.add_argument("--no-prefetch", action="store_true")
    parser.add_argument("--prefetch-ab", action="store_true", help="add affinity, prefetch off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=1, help="rounds, sides in turn")
    args = parser.parse_args()
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown:
        parser.error(f"--scenarios: unknown {unknown}; choose from {sorted(SCENARIOS)}")
    most = max(SCENARIOS[s][0] for s in scenarios)
    print(
        f"fleet benchmark: {args.workers} workers, max_loras {args.max_loras}, max_cpu_loras "
        f"{args.max_cpu_loras}, {args.threads} engine thread(s) each, max_num_seqs "
        f"{args.max_num_seqs or 'default'}, max_jobs {args.max_jobs or 'default'}, tiny random "
        f"llama on CPU; "
        f"{args.jobs} jobs at {args.rate:g}/s (Poisson), {args.prompt_chars}-char prompts, "
        f"{args.tokens} tokens; {platform.node()} ({os.cpu_count()} cores, "
        f"Python {platform.python_version()})"
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, all_loras = build_assets(root, most)
        given = {
            "steal_after": args.steal_after,
            "max_num_seqs": args.max_num_seqs,
            "max_jobs": args.max_jobs,
        }
        extra = {k: v for k, v in given.items() if v is not None}
        base = dict(
            model=str(model),
            device="cpu",
            adapter_roots=(str(root / "adapters"),),
            max_loras=args.max_loras,
            max_cpu_loras=args.max_cpu_loras,
            engine_threads=args.threads,
            prefetch=not args.no_prefetch,
            **extra,
        )
        sides_of = [("affinity", {}), ("random", {"affinity": False})]
        if args.prefetch_ab:
            sides_of.append(("affinity-noprefetch", {"prefetch": False}))
        for scenario in scenarios:
            count, alpha = SCENARIOS[scenario]
            loras = all_loras[:count]
            rounds = []
            for r in range(args.rounds):
                # Alternate the order: a machine busy with something else hurts both sides.
                order = sides_of if r % 2 == 0 else sides_of[::-1]
                done = {
                    name: run_side(
                        name, WorkerConfig.create(**{**base, **over}), args, loras, alpha, root
                    )
                    for name, over in order
                }
                title = f"{scenario}: {count} adapters, zipf({alpha:g}), round {r + 1}"
                rounds.append(report_scenario(title, [done[name] for name, _ in sides_of]))
            if args.rounds > 1:
                medians = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
                print(
                    f"-- {scenario}, median of {args.rounds} rounds: "
                    + ", ".join(f"{k} {v:.2f}x" for k, v in medians.items())
                )


if __name__ == "__main__":
    main()
