"""A worker's liveness in Redis: short-lived claims on its jobs, and the workers registry.

arq claims a job it runs with the key ``arq:in-progress:{job_id}`` and re-runs a job only
once no such key exists. arq sets that key to expire after the longest function timeout
plus 10 s, so a worker killed with SIGKILL holds its jobs for ``job_timeout + 10`` seconds
(ten minutes by default) before anyone else may run them. The ``Heartbeat`` decouples
recovery from the job timeout: arq creates the key with a short TTL (``heartbeat_ttl``,
15 s by default) and every ``ttl / 3`` the heartbeat extends the keys of the jobs whose
arq task is still alive in this process. A dead worker stops extending; its keys lapse
within ``ttl`` and another worker runs the jobs again as their next attempt. arq's job
timeout still bounds how long one job may run; it no longer bounds recovery.

The same beat writes this worker's entry in ``lorafleet:workers`` (a JSON object: pid,
model, queue, ``heartbeat`` time and ``ttl``, ``state`` ``ready`` or ``draining``, jobs held,
jobs ``sent_to_engine`` and ``released`` by a drain, and an ``engine`` snapshot: requests,
KV blocks, adapter slots, adapter load counters) and removes entries whose beat stopped
three TTLs ago, so the registry lists live workers only. With a ``fleet`` provider the entry
also carries what routing reads (``fleet``: adapters held in device slots and CPU cache,
recent traffic per adapter; see ``lorafleet.worker.serve.homes``), and ``publish`` rewrites
the entry between beats when that changes.

Trade-off: a worker that cannot reach Redis, or whose event loop stalls, for longer than the
TTL loses its claims, and its jobs may then run twice. Clients still see one result per job
(the first final event wins); a run is never mixed with another (attempt numbers).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field
from typing import TYPE_CHECKING, Any

from arq.constants import in_progress_key_prefix
from arq.worker import Worker

from lorafleet.producer.keys import WORKERS_KEY
from lorafleet.worker.serve.background import stop_task

if TYPE_CHECKING:
    from lorafleet.worker.process.async_engine import AsyncEngine
    from lorafleet.worker.serve.drain import JobTracker

logger = logging.getLogger(__name__)

#: A registry entry whose heartbeat is this many of its TTLs old belongs to a dead worker.
STALE_AFTER_TTLS = 3


def engine_snapshot(engine: AsyncEngine) -> dict[str, int]:
    """Counters of the engine as of its latest step (Prometheus metrics are the precise
    record; this is for liveness and debugging)."""
    snap = engine.snapshot
    return {
        "requests": engine.num_requests,
        "running": snap.running,
        "waiting": snap.waiting,
        "free_blocks": snap.free_blocks,
        "num_blocks": snap.num_blocks,
        "slots_in_use": snap.slots_in_use,
        "adapter_disk_loads": snap.adapters.disk_loads,
        "adapter_slot_loads": snap.adapters.slot_loads,
        "adapter_load_failures": snap.adapters.disk_load_failures,
        "adapter_failure_cache_hits": snap.adapters.failure_cache_hits,
    }


@dataclass(eq=False)
class Heartbeat:
    """Keeps this worker's job claims and registry entry alive. ``await start()`` from arq's
    ``on_startup`` (it shortens arq's claim TTL and registers the worker at once);
    ``await close()`` withdraws the entry."""

    redis: Any
    worker: Worker
    _: KW_ONLY
    name: str
    ttl: float
    info: dict[str, Any]
    engine: AsyncEngine
    jobs: JobTracker
    fleet: Callable[[], dict[str, Any]] | None = None
    state: str = field(default="ready", init=False)
    _task: asyncio.Task[None] | None = field(default=None, init=False, repr=False)
    _draining_beat: asyncio.Task[None] | None = field(default=None, init=False, repr=False)

    async def start(self) -> None:
        # Claims made from now on expire after one TTL unless this heartbeat extends them.
        self.worker.in_progress_timeout_s = self.ttl
        await self.beat()
        self._task = asyncio.create_task(self._beat_forever(), name="lorafleet-heartbeat")

    def mark_draining(self) -> None:
        """Show the worker as ``draining`` in the registry, with a beat right away."""
        self.state = "draining"
        self._draining_beat = asyncio.get_running_loop().create_task(self._beat_logged())

    async def close(self) -> None:
        await stop_task(self._task)
        await self.redis.hdel(WORKERS_KEY, self.name)

    def held_jobs(self) -> list[str]:
        """Ids of the jobs whose arq task is alive in this process."""
        return [job_id for job_id, task in self.worker.tasks.items() if not task.done()]

    async def beat(self) -> None:
        """Extend the claims of held jobs and refresh the registry entry (one round trip),
        then drop registry entries of dead workers."""
        held = self.held_jobs()
        ttl_ms = int(self.ttl * 1000)
        async with self.redis.pipeline(transaction=False) as pipe:
            # PEXPIRE never creates a key: a job that finished meanwhile stays finished.
            for job_id in held:
                pipe.pexpire(in_progress_key_prefix + job_id, ttl_ms)
            pipe.hset(WORKERS_KEY, self.name, json.dumps(self._entry(len(held))))
            await pipe.execute()
        await self._prune()

    async def publish(self) -> None:
        """Rewrite this worker's registry entry now (what it holds changed); claims are left
        to the beat. A no-op before the first beat and after ``close``, so a late call never
        re-registers a worker that left."""
        if self._task is None or self._task.done():
            return
        await self.redis.hset(WORKERS_KEY, self.name, json.dumps(self._entry(None)))

    def _entry(self, jobs: int | None) -> dict[str, Any]:
        entry = {
            **self.info,
            "heartbeat": time.time(),
            "ttl": self.ttl,
            "state": self.state,
            "jobs": len(self.held_jobs()) if jobs is None else jobs,
            "engine": engine_snapshot(self.engine),
            "released": self.jobs.released,
            "sent_to_engine": self.jobs.sent_to_engine,
        }
        if self.fleet is not None:
            entry["fleet"] = self.fleet()
        return entry

    async def _prune(self) -> None:
        now = time.time()
        stale = []
        for name, raw in (await self.redis.hgetall(WORKERS_KEY)).items():
            try:
                entry = json.loads(raw)
                age = now - float(entry["heartbeat"])
                limit = STALE_AFTER_TTLS * float(entry["ttl"])
            except (ValueError, KeyError, TypeError):
                continue  # not written by a heartbeat: leave it to whoever wrote it
            if age > limit:
                stale.append(name)
        if stale:
            logger.info("removing %d dead workers from the registry: %s", len(stale), stale)
            await self.redis.hdel(WORKERS_KEY, *stale)

    async def _beat_forever(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            await self._beat_logged()

    async def _beat_logged(self) -> None:
        try:
            await self.beat()
        except Exception:  # never stop beating: a missed beat is retried on the next
            logger.exception("heartbeat failed")
