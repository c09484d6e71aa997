"""The engine's state as Prometheus metrics, read at scrape time.

The engine process reports its counters and gauges with every step (``EngineSnapshot``);
``EngineCollector`` turns the latest of them into series when Prometheus scrapes (on the
HTTP server's thread), so the engine needs no metrics code of its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from lorafleet.worker.process.async_engine import AsyncEngine

_CONFIG_LABELS = (
    "model",
    "device",
    "dtype",
    "queue",
    "max_loras",
    "max_cpu_loras",
    "max_lora_rank",
    "max_num_seqs",
    "max_model_len",
)


class EngineCollector(Collector):
    """Engine state read at scrape time (from the HTTP server's thread): the engine
    process's snapshot as of its latest step, and the facts fixed at load."""

    def __init__(self, worker: str, engine: AsyncEngine, queue: str) -> None:
        self.worker = worker
        self.engine = engine
        self.queue = queue

    def collect(self) -> Iterator[Metric]:
        info, snap = self.engine.info, self.engine.snapshot
        stats, config = snap.adapters, info.config
        gauges = (
            ("lorafleet_requests_running", "Requests in the running batch.", snap.running),
            ("lorafleet_requests_waiting", "Requests waiting for admission in the engine.", snap.waiting),
            ("lorafleet_requests_waiting_for_adapter_slot", "Waiting requests whose adapter cannot get a device slot now: every slot is held by running requests on other adapters (raise max_loras if it persists).", snap.waiting_for_slot),
            ("lorafleet_adapter_slots", "Adapter slots on the device (max_loras).", config.max_loras),
            ("lorafleet_adapter_slots_used", "Adapter slots pinned by running requests.", snap.slots_in_use),
            ("lorafleet_adapter_cpu_cache_adapters", "Adapters held in the CPU cache.", snap.cpu_adapters),
            ("lorafleet_adapter_cpu_cache_capacity", "Adapters the CPU cache holds at most.", config.max_cpu_loras),
            ("lorafleet_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use.", snap.kv_cache_usage),
            ("lorafleet_kv_cache_blocks", "KV-cache blocks in all.", snap.num_blocks),
        )  # fmt: skip
        for name, doc, value in gauges:
            yield self._gauge(name, doc, value)
        counters = (
            ("lorafleet_adapter_loads", "Adapter weight look-ups by source: `disk` reads and validates a PEFT folder, `cpu_cache` finds them in host memory.", "source", {("disk",): stats.disk_loads, ("cpu_cache",): stats.cpu_hits}),
            ("lorafleet_adapter_disk_load_seconds", "Time spent reading and validating adapters from disk.", None, {(): stats.disk_load_seconds}),
            ("lorafleet_adapter_slot_loads", "Adapters written into a device slot (slot misses).", None, {(): stats.slot_loads}),
            ("lorafleet_adapter_slot_hits", "Admissions whose adapter already held a device slot.", None, {(): stats.slot_hits}),
            ("lorafleet_adapter_evictions", "Adapters evicted, by tier (`slot`: device slot, `cpu`: CPU cache).", "tier", {("slot",): stats.slot_evictions, ("cpu",): stats.cpu_evictions}),
            ("lorafleet_preemptions", "Running requests preempted for lack of KV-cache blocks (recomputed later).", None, {(): snap.preemptions}),
        )  # fmt: skip
        for name, doc, label, values in counters:
            yield self._counter(name, doc, values, label)
        family = GaugeMetricFamily(
            "lorafleet_worker_info",
            "Configuration of the worker's engine.",
            labels=["worker", *_CONFIG_LABELS],
        )
        family.add_metric([self.worker, *self._config_values()], 1)
        yield family

    def _config_values(self) -> list[str]:
        info = self.engine.info
        config = info.config
        return [
            config.model,
            config.device,
            info.dtype,
            self.queue,
            str(config.max_loras),
            str(config.max_cpu_loras),
            str(config.max_lora_rank),
            str(config.max_num_seqs),
            str(info.max_model_len),
        ]

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, doc, labels=["worker"])
        family.add_metric([self.worker], value)
        return family

    def _counter(
        self, name: str, doc: str, values: dict[tuple[str, ...], float], label: str | None = None
    ) -> CounterMetricFamily:
        family = CounterMetricFamily(name, doc, labels=["worker", *([label] if label else [])])
        for label_values, value in values.items():
            family.add_metric([self.worker, *label_values], value)
        return family
