"""Homes for adapters: which live workers an adapter's jobs go to first.

Every worker computes the same answer from the same registry snapshot
(``lorafleet:workers``, written by ``lorafleet.worker.serve.heartbeat``), so no coordinator
is needed:

- The live workers are the registry entries of this queue whose last beat is at most one
  heartbeat TTL old and whose state is ``ready``: a dead worker drops out within one TTL, a
  draining one at once, a new one from its first beat.
- An adapter gets ``k`` homes, more for hotter adapters: ``k`` grows with the adapter's
  share of the fleet's recent traffic (each worker publishes its recent jobs per adapter;
  the shares are measured, never configured), from 1 for a cold adapter (pinned to one
  worker, so the fleet's caches add up instead of all holding it) to every worker for one
  that alone would keep several busy (``home_count``).
- The homes are the top ``k`` live workers by rendezvous hashing (highest random weight):
  spread evenly, and stable under changes of the fleet (a worker leaving moves only the
  adapters it was home to, one joining takes over about ``1 / N`` of them).

Homes are where an adapter's jobs go first; a worker that holds the adapter (device slot or
CPU cache) may take them too, since it serves them without reading the disk (see
``lorafleet.worker.serve.routing``).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

#: A home is added per this share of one worker's fair share of traffic an adapter carries
#: beyond the first: an adapter with 1 / N of the traffic on N workers gets 2 homes.
SPREAD = 1.5
#: Recent adapter jobs (decayed, fleet-wide) below which traffic is not measured.
MIN_TRAFFIC = 20.0


@dataclass(frozen=True)
class WorkerView:
    """What routing knows of one live worker: the adapters (``lora_int_id``) in its device
    slots and CPU cache, its recent jobs per adapter (decayed counts), and its load (jobs it
    holds, as last published)."""

    name: str
    slots: frozenset[int] = frozenset()
    cached: frozenset[int] = frozenset()
    traffic: Mapping[int, float] = field(default_factory=dict)
    load: int = 0

    @property
    def holds(self) -> frozenset[int]:
        return self.slots | self.cached


def rendezvous_score(adapter: int, worker: str) -> int:
    """The weight of ``worker`` for ``adapter``: the top-weighted workers are its homes."""
    digest = hashlib.blake2b(f"{adapter}\0{worker}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def traffic_shares(workers: Sequence[WorkerView]) -> dict[int, float]:
    """Each adapter's share of the fleet's recent adapter jobs (they sum to 1); none while
    the fleet has seen fewer than ``MIN_TRAFFIC`` recent jobs (too few to tell a hot
    adapter from chance: every adapter keeps one home)."""
    totals: dict[int, float] = {}
    for w in workers:
        for adapter, count in w.traffic.items():
            totals[adapter] = totals.get(adapter, 0.0) + count
    whole = sum(totals.values())
    return {a: c / whole for a, c in totals.items()} if whole >= MIN_TRAFFIC else {}


def home_count(share: float, num_workers: int) -> int:
    """Homes for an adapter with ``share`` of the traffic among ``num_workers``: at least
    1, one more per ``1 / SPREAD`` of a worker's fair share it carries, at most all."""
    if num_workers < 1:
        return 0
    return max(1, min(num_workers, math.ceil(share * num_workers * SPREAD)))


def homes(adapter: int, workers: Sequence[WorkerView], share: float = 0.0) -> list[str]:
    """The names of ``adapter``'s homes among ``workers`` (the live ones), best first."""
    k = home_count(share, len(workers))
    ranked = sorted(workers, key=lambda w: rendezvous_score(adapter, w.name), reverse=True)
    return [w.name for w in ranked[:k]]


@dataclass
class FleetView:
    """The live workers of one queue as the registry shows them, and each adapter's traffic
    share; ``homes_of`` is memoized per view (a view is rebuilt on every registry read)."""

    workers: list[WorkerView]
    shares: dict[int, float]
    _homes: dict[int, list[str]] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, entries: Mapping[bytes | str, bytes | str], queue: str, now: float) -> FleetView:
        """From ``lorafleet:workers`` (name -> JSON entry): the workers of ``queue`` whose
        last beat is within their TTL (Unix time ``now``) and that are ``ready``. Entries
        that do not parse are skipped (the heartbeat prunes its own kind)."""
        workers = []
        for name, raw in entries.items():
            try:
                entry = json.loads(raw)
                fresh = now - float(entry["heartbeat"]) <= float(entry["ttl"])
                fleet = entry.get("fleet") or {}
                view = WorkerView(
                    name=name.decode() if isinstance(name, bytes) else name,
                    slots=frozenset(int(a) for a in fleet.get("slots", ())),
                    cached=frozenset(int(a) for a in fleet.get("cached", ())),
                    traffic={int(a): float(c) for a, c in fleet.get("traffic", {}).items()},
                    load=int(fleet.get("load", entry.get("jobs", 0))),
                )
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
            if fresh and entry.get("state") == "ready" and entry.get("queue") == queue:
                workers.append(view)
        workers.sort(key=lambda w: w.name)
        return cls(workers, traffic_shares(workers))

    def homes_of(self, adapter: int) -> list[str]:
        if adapter not in self._homes:
            self._homes[adapter] = homes(adapter, self.workers, self.shares.get(adapter, 0.0))
        return self._homes[adapter]

    def held_by_others(self, adapter: int, name: str) -> bool:
        """Whether a live worker other than ``name`` holds ``adapter`` (slot or CPU cache)."""
        return any(adapter in w.holds for w in self.workers if w.name != name)

    def lightest_of(self, adapter: int, name: str) -> int | None:
        """The least load (jobs held) among the workers other than ``name`` that are a
        home of ``adapter`` or hold it; None if there is none."""
        homes = set(self.homes_of(adapter))
        loads = [
            w.load
            for w in self.workers
            if w.name != name and (w.name in homes or adapter in w.holds)
        ]
        return min(loads) if loads else None

    def names(self) -> frozenset[str]:
        return frozenset(w.name for w in self.workers)
