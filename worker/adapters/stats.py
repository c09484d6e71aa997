"""The adapter tiers' counters (torch-free: metrics and heartbeats read them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class AdapterStats:
    """Monotonic counters of an ``AdapterManager``, read by metrics."""

    disk_loads: int = 0
    disk_load_seconds: float = 0.0
    disk_load_failures: int = 0
    failure_cache_hits: int = 0
    cpu_hits: int = 0
    slot_hits: int = 0
    slot_loads: int = 0
    cpu_evictions: int = 0
    slot_evictions: int = 0
    #: Adapters read ahead of their requests (``lorafleet.worker.adapters.prefetch``): put
    #: in the CPU cache, then taken by a request (used) or evicted or already there (wasted).
    prefetch_loads: int = 0
    prefetch_used: int = 0
    prefetch_wasted: int = 0
