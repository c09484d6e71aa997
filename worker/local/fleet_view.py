"""What each worker of a queue did, as the registry (``lorafleet:workers``) shows it: jobs
it claimed (by routing reason), adapter disk and slot loads, steals, and the adapters it
holds. ``lorafleet loadtest --workers N`` prints it after the run."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import redis

from lorafleet.producer.keys import WORKERS_KEY


@dataclass(frozen=True)
class WorkerCounts:
    name: str
    jobs: int
    disk_loads: int
    slot_loads: int
    steals: int
    hits: int
    held: int


def read_fleet(
    url: str, queue: str, *, after: float | None = None, timeout: float = 30.0
) -> list[WorkerCounts]:
    """The workers of ``queue`` in the registry, by name. With ``after`` (Unix time), waits
    up to ``timeout`` seconds until every one has beaten since then, so the counts include
    everything up to that moment."""
    deadline = time.monotonic() + timeout
    with redis.Redis.from_url(url) as r:
        while True:
            entries = {k.decode(): json.loads(v) for k, v in r.hgetall(WORKERS_KEY).items()}
            mine = {n: e for n, e in entries.items() if e.get("queue") == queue}
            fresh = after is None or all(e["heartbeat"] > after for e in mine.values())
            if fresh or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    return [_counts(name, mine[name]) for name in sorted(mine)]


def _counts(name: str, entry: dict) -> WorkerCounts:
    engine = entry.get("engine", {})
    fleet = entry.get("fleet", {})
    counters = fleet.get("counters", {})
    return WorkerCounts(
        name=name,
        jobs=sum(counters.get("claimed", {}).values()),
        disk_loads=engine.get("adapter_disk_loads", 0),
        slot_loads=engine.get("adapter_slot_loads", 0),
        steals=counters.get("steals", 0),
        hits=counters.get("hits", 0),
        held=len(set(fleet.get("slots", [])) | set(fleet.get("cached", []))),
    )


def format_fleet(workers: list[WorkerCounts]) -> str:
    """A per-worker table and the fleet's totals."""
    lines = [
        f"{'worker':<24}{'jobs':>7}{'disk loads':>12}{'slot loads':>12}{'steals':>8}{'hits':>7}{'held':>6}"
    ]
    for w in workers:
        lines.append(
            f"{w.name:<24}{w.jobs:>7}{w.disk_loads:>12}{w.slot_loads:>12}{w.steals:>8}{w.hits:>7}{w.held:>6}"
        )

    def total(field: str) -> int:
        return sum(getattr(w, field) for w in workers)

    lines.append(
        f"{'fleet':<24}{total('jobs'):>7}{total('disk_loads'):>12}{total('slot_loads'):>12}"
        f"{total('steals'):>8}{total('hits'):>7}"
    )
    return "\n".join(lines)
