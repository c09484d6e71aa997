"""A worker's part in the fleet: route its claims by adapter, publish what it holds, read
ahead for the jobs waiting for it, count it all.

``FleetMember.start`` (from the worker's start-up, after ``guard_claims``) builds the
``Router``, patches arq's claim and starts the queue prefetch; its ``entry`` goes into the heartbeat's registry entry;
``attach`` (once the heartbeat runs) republishes that entry whenever what the engine holds
changes. See docs/fleet.md.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from arq.worker import Worker

from lorafleet.worker.serve.prefetch import QueuePrefetch
from lorafleet.worker.serve.routing import HoldingsWatch, Router, install_routing

if TYPE_CHECKING:
    from lorafleet.worker.process.async_engine import AsyncEngine
    from lorafleet.worker.serve.metrics import WorkerMetrics
    from lorafleet.worker.serve.settings import WorkerConfig


def engine_holdings(engine: AsyncEngine) -> tuple[frozenset[int], frozenset[int]]:
    """The ``lora_int_id``s in the engine's device slots and CPU cache, as of its latest
    report."""
    snap = engine.snapshot
    return frozenset(snap.adapters_in_slots), frozenset(snap.adapters_in_cpu)


@dataclass
class FleetMember:
    router: Router
    prefetch: QueuePrefetch | None = None
    watch: HoldingsWatch | None = None

    @classmethod
    def start(
        cls,
        redis: Any,
        worker: Worker,
        config: WorkerConfig,
        engine: AsyncEngine,
        metrics: WorkerMetrics,
    ) -> FleetMember:
        router = Router(
            redis,
            config.worker_name,
            config.queue,
            affinity=config.affinity,
            steal_after=config.steal_after,
            holdings=lambda: engine_holdings(engine),
            load=lambda: worker.job_counter,
        )
        install_routing(worker, router)
        # Without affinity no job waits for this worker in particular: nothing to read ahead.
        reads_ahead = config.prefetch and config.affinity
        prefetch = QueuePrefetch(worker, router, engine.prefetch) if reads_ahead else None
        if prefetch is not None:
            prefetch.start()
        if config.metrics_port:
            from lorafleet.worker.serve.fleet_collector import FleetCollector

            metrics.registry.register(FleetCollector(config.worker_name, router, engine))
        return cls(router, prefetch)

    def job_started(self, job_id: str, attempt: int, metrics: WorkerMetrics) -> None:
        """A claimed job starts: count a re-run (its earlier attempt's worker died or
        drained), and mark it cold for the metrics if its adapter was not held here."""
        if attempt > 1:
            self.router.counters.reruns += 1
        if self.router.claimed_cold(job_id):
            metrics.job_cold(job_id)

    def entry(self) -> dict[str, Any]:
        """This worker's ``fleet`` part of its registry entry."""
        return self.router.fleet_entry()

    def attach(self, publish: Callable[[], Awaitable[None]]) -> None:
        """Republish the registry entry (``publish``) when what the engine holds changes."""
        self.watch = HoldingsWatch(self.router.holdings, publish, self.router.load)
        self.watch.start()

    async def close(self) -> None:
        if self.prefetch is not None:
            await self.prefetch.close()
        if self.watch is not None:
            await self.watch.close()
