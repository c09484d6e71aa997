"""A worker's part in the fleet as Prometheus metrics, read at scrape time.

Routing's counters (``RoutingCounters``: affinity hits and misses, steals, re-homes) and
the engine's prefetch counters (reads ahead, used, wasted) become ``lorafleet_fleet_*``
series with the ``worker`` label, like ``EngineCollector``'s.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from lorafleet.worker.process.async_engine import AsyncEngine
    from lorafleet.worker.serve.routing import Router

#: ``reason`` label values of claimed jobs (see ``lorafleet.worker.serve.routing``).
REASONS = ("held", "homed", "base", "stolen")


class FleetCollector(Collector):
    """Routing and prefetch counters of one worker."""

    def __init__(self, worker: str, router: Router, engine: AsyncEngine) -> None:
        self.worker = worker
        self.router = router
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        c = self.router.counters
        stats = self.engine.snapshot.adapters
        w = self.worker
        yield _counter(
            "lorafleet_fleet_affinity",
            "Adapter jobs this worker claimed, by whether it held the adapter (`hit`: in a "
            "device slot or the CPU cache) or not (`miss`).",
            {(w, "hit"): c.hits, (w, "miss"): c.misses},
            "result",
        )
        yield _counter(
            "lorafleet_fleet_claims",
            "Jobs this worker claimed, by routing reason: `held` adapter, `homed` here, "
            "`base` model (or unreadable), `stolen` from busy or dead homes.",
            {(w, r): c.claimed.get(r, 0) for r in REASONS},
            "reason",
        )
        yield _counter(
            "lorafleet_fleet_steals",
            "Jobs claimed that were homed on other workers.",
            {(w,): c.steals},
        )
        yield _counter(
            "lorafleet_fleet_rehomes",
            "Adapters this worker became a home of because the fleet changed.",
            {(w,): c.rehomes},
        )
        yield _counter(
            "lorafleet_fleet_reruns",
            "Jobs started here at attempt 2 or later: their earlier run's worker died or drained.",
            {(w,): c.reruns},
        )
        yield _counter(
            "lorafleet_fleet_prefetches",
            "Adapters read ahead from the queue, by fate: `loaded` into the CPU cache, then "
            "`used` by a request or `wasted` (evicted unused, or already there).",
            {
                (w, "loaded"): stats.prefetch_loads,
                (w, "used"): stats.prefetch_used,
                (w, "wasted"): stats.prefetch_wasted,
            },
            "fate",
        )
        gauge = GaugeMetricFamily(
            "lorafleet_fleet_routing_affinity",
            "1 when adapter-affine routing is on.",
            labels=["worker"],
        )
        gauge.add_metric([w], 1.0 if self.router.affinity else 0.0)
        yield gauge


def _counter(
    name: str, doc: str, values: dict[tuple[str, ...], float], label: str | None = None
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=["worker", *([label] if label else [])])
    for label_values, value in values.items():
        family.add_metric(list(label_values), value)
    return family
