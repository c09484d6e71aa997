"""Pull with affinity: which of the jobs at the head of the shared queue this worker claims.

Every worker still reads the one arq queue and arq still claims each job for one worker
(at-least-once, heartbeat-short claims, drains, one result per job): routing only decides,
per poll, which of the waiting jobs this worker passes on to arq's claim now and which it
leaves in the queue for others a while longer:

- ``held``: a job for an adapter in this worker's device slots or CPU cache (it serves it
  without reading the disk): now;
- ``homed``: a job for an adapter this worker is a home of (``lorafleet.worker.serve.homes``):
  now, unless the adapter has one home (it is cold) and another live worker holds it:
  that worker serves it without a disk read, so the home waits like any other worker;
- a hot adapter's job (several homes) that this worker holds or is home to, while it holds
  ``LIGHTER_BY`` jobs more than another of those workers: after the short wait, so the
  lighter one takes it first (hot adapters spread by load);
- ``base``: a job for the base model, or one whose adapter cannot be read from its payload
  (its run reports what is wrong): now;
- ``stolen``: any other job, once it has waited ``steal_after`` seconds since it was
  enqueued (its homes are busy or gone), or a fifth of that when this worker holds no job
  at all, or ``LIGHTER_BY`` jobs fewer than every worker the adapter is homed on or held
  by (they are saturated relative to it; the fifth gives a home with room the time of a
  poll or two to take its own job first).

So nothing waits on a busy or dead home for longer than ``steal_after``: a job skipped now
stays in the queue, and any worker with room takes it after that wait. With affinity off
every job is claimed as it comes (arq's plain pull: random routing).

Jobs homed here that wait while the worker's job slots are full are prefetched
(``lorafleet.worker.serve.prefetch``): their adapters are read into the CPU cache while the
engine steps.

What each worker holds and how much traffic each adapter had comes from the registry
(``lorafleet:workers``), read at most every ``REFRESH_S``; the ``HoldingsWatch`` republishes
this worker's entry within ``WATCH_S`` of a change to what it holds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec
from arq.constants import in_progress_key_prefix
from arq.worker import Worker
from redis.exceptions import RedisError

from lorafleet.producer.codec import arq_deserialize
from lorafleet.producer.keys import WORKERS_KEY, arq_job_key
from lorafleet.producer.types import LoRARequest
from lorafleet.worker.serve.background import BackgroundLoop
from lorafleet.worker.serve.homes import FleetView
from lorafleet.worker.serve.traffic import AdapterTraffic

logger = logging.getLogger(__name__)

#: Seconds a read of the registry is reused.
REFRESH_S = 0.25
#: Seconds between looks at what the engine holds (republished when it changed).
WATCH_S = 0.1
#: An idle worker, or one lighter than a job's homes and holders, steals after this share
#: of ``steal_after``.
IDLE_STEAL_SHARE = 0.2
#: Jobs by which a worker must be lighter than a job's homes and holders to steal early.
LIGHTER_BY = 2
#: Adapters whose home status a worker remembers, to count re-homes.
MAX_REMEMBERED_HOMES = 4096

Reason = Literal["held", "homed", "base", "stolen"]


class _Route(msgspec.Struct):
    """The part of a ``GenerateJob`` routing reads (the rest of the map is skipped)."""

    lora_request: LoRARequest | None = None


_route_decoder = msgspec.msgpack.Decoder(_Route)


@dataclass(frozen=True)
class QueuedJob:
    """What routing knows of a job in the queue: its adapter (None: base model or
    unreadable) and when it was enqueued (Unix seconds, the producer's clock, as arq's
    own queue scores)."""

    lora: LoRARequest | None
    enqueued_at: float


def read_queued_job(envelope: bytes | None, now: float) -> QueuedJob:
    """The ``QueuedJob`` of the arq job stored as ``envelope``. Anything that does not
    decode routes as a base-model job enqueued ``now``: its own run reports the problem."""
    if not envelope:
        return QueuedJob(None, now)
    try:
        data = arq_deserialize(envelope)
        enqueued = float(data.get("et", now * 1000)) / 1000
        lora = _route_decoder.decode(data["a"][0]).lora_request
    except (msgspec.DecodeError, KeyError, IndexError, TypeError, ValueError, AttributeError):
        return QueuedJob(None, now)
    return QueuedJob(lora, enqueued)


@dataclass
class Decision:
    """One poll's verdict: the jobs to pass to arq's claim, in that order, with why."""

    claim: list[tuple[bytes, Reason]] = field(default_factory=list)


@dataclass
class RoutingCounters:
    """Monotonic counters of one worker's routing (exported as ``lorafleet_fleet_*``).

    ``hits``: adapter jobs claimed whose adapter this worker held; ``misses``: adapter jobs
    claimed that it did not hold (a disk read, unless prefetched); ``steals``: jobs claimed
    that were homed on other workers; ``rehomes``: adapters this worker became a home of
    because the fleet changed (a worker died, drained or joined); ``prefetches_requested``:
    adapters asked of the engine's prefetch; ``reruns``: jobs started here at attempt 2 or
    later (an earlier run's worker died or drained)."""

    hits: int = 0
    misses: int = 0
    steals: int = 0
    rehomes: int = 0
    prefetches_requested: int = 0
    reruns: int = 0
    claimed: dict[str, int] = field(default_factory=dict)


class Router:
    """Decides, per poll, which queued jobs this worker (``name``, serving ``queue``) claims.

    ``holdings()`` gives the ``lora_int_id``s in this worker's device slots and CPU cache
    now; ``load()`` how many jobs it holds. With ``affinity`` off every job is claimed in
    queue order (counters are still kept, so both modes can be compared)."""

    def __init__(
        self,
        redis: Any,
        name: str,
        queue: str,
        *,
        affinity: bool,
        steal_after: float,
        holdings: Callable[[], tuple[frozenset[int], frozenset[int]]],
        load: Callable[[], int],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.name = name
        self.queue = queue
        self.affinity = affinity
        self.steal_after = steal_after
        self.holdings = holdings
        self.load = load
        self.clock = clock
        self.traffic = AdapterTraffic()
        self.counters = RoutingCounters()
        self._jobs: dict[bytes, QueuedJob] = {}
        self._view: FleetView | None = None
        self._view_at = float("-inf")
        self._members: frozenset[str] | None = None
        self._was_home: dict[int, bool] = {}
        # Jobs whose adapter this worker did not hold when it first saw them in the queue,
        # and those of them it claimed (until ``claimed_cold`` is asked, or too many).
        self._cold_when_seen: set[bytes] = set()
        self._cold_claims: set[str] = set()

    # -- the poll --------------------------------------------------------------------------

    async def decide(self, job_ids: Sequence[bytes], capacity: int) -> Decision:
        """The jobs among ``job_ids`` (the queue's head, oldest first; some may be running
        elsewhere, which arq's claim skips) to claim now, and adapters to prefetch.
        ``capacity``: job slots free in this worker."""
        now = self.clock()
        await self._learn(job_ids, now)
        decision = Decision()
        if not self.affinity:
            decision.claim = [(j, self._reason_plain(j)) for j in job_ids]
            return decision
        view = await self.fleet(now)
        slots, cached = self.holdings()
        held = slots | cached
        load = self.load()
        short_wait = self.steal_after * IDLE_STEAL_SHARE
        now_claims: list[tuple[bytes, Reason]] = []
        later: list[tuple[bytes, Reason]] = []
        for job_id in job_ids:
            job = self._jobs[job_id]
            if job.lora is None:
                now_claims.append((job_id, "base"))
                continue
            adapter = job.lora.lora_int_id
            homes = view.homes_of(adapter)
            home = self.name in homes
            if len(homes) > 1 and (home or adapter in held) and self._heavier(view, adapter, load):
                # A hot adapter spreads by load: a lighter home or holder takes it first.
                if now - job.enqueued_at >= short_wait:
                    later.append((job_id, "held" if adapter in held else "homed"))
            elif adapter in held:
                now_claims.append((job_id, "held"))
            elif home and (len(homes) > 1 or not view.held_by_others(adapter, self.name)):
                # A cold adapter (one home) another worker holds stays there: its home would
                # read it from disk for nothing. A hot one (several homes) goes to them all.
                now_claims.append((job_id, "homed"))
            elif now - job.enqueued_at >= self._wait(view, adapter, load, short_wait):
                later.append((job_id, "homed" if home else "stolen"))
        decision.claim = now_claims + later
        self._note_rehomes(view)
        return decision

    async def waiting_for_me(self, job_ids: Sequence[bytes]) -> list[LoRARequest]:
        """The adapters, once each, of the jobs among ``job_ids`` that wait for this worker
        (homed here; not held here, nor, for a cold adapter, by another worker) and that
        nobody runs yet: what to read ahead while this worker's job slots are full."""
        now = self.clock()
        await self._learn(job_ids, now, prune=False)
        view = await self.fleet(now)
        slots, cached = self.holdings()
        held = slots | cached
        mine: list[tuple[bytes, LoRARequest]] = []
        for job_id in job_ids:
            job = self._jobs.get(job_id)
            if job is None or job.lora is None or job.lora.lora_int_id in held:
                continue
            adapter = job.lora.lora_int_id
            homes = view.homes_of(adapter)
            if self.name in homes and (
                len(homes) > 1 or not view.held_by_others(adapter, self.name)
            ):
                mine.append((job_id, job.lora))
        if not mine:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id, _ in mine:
                pipe.exists(in_progress_key_prefix + job_id.decode())
            running = await pipe.execute()
        return _distinct(
            [lora for (_, lora), busy in zip(mine, running, strict=True) if not busy], held
        )

    def _wait(self, view: FleetView, adapter: int, load: int, short_wait: float) -> float:
        """How long a job for ``adapter`` that is not this worker's waits before it takes
        it: the short wait when this worker is idle or lighter, by ``LIGHTER_BY`` jobs,
        than every other worker the adapter is homed on or held by (they are saturated
        relative to it); else ``steal_after``."""
        if load == 0:
            return short_wait
        lightest = view.lightest_of(adapter, self.name)
        if lightest is None or load + LIGHTER_BY <= lightest:
            return short_wait
        return self.steal_after

    def _heavier(self, view: FleetView, adapter: int, load: int) -> bool:
        """Whether this worker holds ``LIGHTER_BY`` jobs more than the lightest other
        worker the adapter is homed on or held by."""
        lightest = view.lightest_of(adapter, self.name)
        return lightest is not None and load >= lightest + LIGHTER_BY

    def claimed(self, job_id: bytes, reason: Reason) -> None:
        """arq claimed ``job_id`` for this worker: count it and note its adapter's traffic."""
        c = self.counters
        c.claimed[reason] = c.claimed.get(reason, 0) + 1
        job = self._jobs.get(job_id)
        if job is None or job.lora is None:
            return
        self.traffic.note(job.lora.lora_int_id)
        if job_id in self._cold_when_seen:
            if len(self._cold_claims) >= MAX_REMEMBERED_HOMES:
                self._cold_claims.clear()  # asked for at job start: only a leak is dropped
            self._cold_claims.add(job_id.decode())
        if reason == "held":
            c.hits += 1
        else:
            c.misses += 1
        if reason == "stolen":
            c.steals += 1

    def claimed_cold(self, job_id: str) -> bool:
        """Whether this worker claimed ``job_id`` with an adapter it did not hold when it
        first saw the job (asked once, at the job's start: the answer is forgotten)."""
        if job_id in self._cold_claims:
            self._cold_claims.discard(job_id)
            return True
        return False

    def _reason_plain(self, job_id: bytes) -> Reason:
        job = self._jobs[job_id]
        if job.lora is None:
            return "base"
        slots, cached = self.holdings()
        return "held" if job.lora.lora_int_id in slots | cached else "stolen"

    # -- what the fleet looks like ------------------------------------------------------------

    async def fleet(self, now: float | None = None) -> FleetView:
        """The registry's live workers of this queue (re-read at most every ``REFRESH_S``)."""
        mono = time.monotonic()
        if self._view is None or mono - self._view_at >= REFRESH_S:
            entries = await self.redis.hgetall(WORKERS_KEY)
            self._view = FleetView.of(entries, self.queue, self.clock() if now is None else now)
            self._view_at = mono
        return self._view

    def fleet_entry(self) -> dict[str, Any]:
        """This worker's part of its registry entry: what it holds and its recent traffic."""
        slots, cached = self.holdings()
        return {
            "slots": sorted(slots),
            "cached": sorted(cached),
            "traffic": {str(a): c for a, c in self.traffic.top().items()},
            "affinity": self.affinity,
            "load": self.load(),
            "counters": {
                "hits": self.counters.hits,
                "misses": self.counters.misses,
                "steals": self.counters.steals,
                "rehomes": self.counters.rehomes,
                "reruns": self.counters.reruns,
                "claimed": dict(self.counters.claimed),
            },
        }

    async def _learn(self, job_ids: Sequence[bytes], now: float, prune: bool = True) -> None:
        """Read the adapters of jobs not seen before (one round trip); with ``prune``
        (``job_ids`` is the whole head arq read), forget jobs that left the queue's head."""
        unknown = [j for j in job_ids if j not in self._jobs]
        if unknown:
            async with self.redis.pipeline(transaction=False) as pipe:
                for job_id in unknown:
                    pipe.get(arq_job_key(job_id.decode()))
                envelopes = await pipe.execute()
            slots, cached = self.holdings()
            held = slots | cached
            for job_id, envelope in zip(unknown, envelopes, strict=True):
                job = read_queued_job(envelope, now)
                self._jobs[job_id] = job
                if job.lora is not None and job.lora.lora_int_id not in held:
                    self._cold_when_seen.add(job_id)
        if prune and len(self._jobs) > len(job_ids):
            current = set(job_ids)
            self._jobs = {j: q for j, q in self._jobs.items() if j in current}
            self._cold_when_seen &= current

    def _note_rehomes(self, view: FleetView) -> None:
        """When the fleet's membership changed, count the adapters this worker became a
        home of (among those it has seen)."""
        members = view.names()
        changed = self._members is not None and members != self._members
        self._members = members
        if self.name not in members:
            return  # not registered yet, or draining: homes were computed without it
        for job in self._jobs.values():
            if job.lora is not None and job.lora.lora_int_id not in self._was_home:
                if len(self._was_home) >= MAX_REMEMBERED_HOMES:
                    self._was_home.clear()
                adapter = job.lora.lora_int_id
                self._was_home[adapter] = self.name in view.homes_of(adapter)
        if not changed:
            return
        for adapter, was in self._was_home.items():
            now_home = self.name in view.homes_of(adapter)
            if now_home and not was:
                self.counters.rehomes += 1
            self._was_home[adapter] = now_home


def _distinct(loras: Sequence[LoRARequest], held: frozenset[int]) -> list[LoRARequest]:
    wanted: dict[int, LoRARequest] = {}
    for lora in loras:
        if lora.lora_int_id not in held:
            wanted.setdefault(lora.lora_int_id, lora)
    return list(wanted.values())


def install_routing(worker: Worker, router: Router) -> None:
    """Route ``worker``'s claims through ``router``: patch ``worker.start_jobs`` (call after
    ``guard_claims``, whose patched claim this one wraps) so arq claims only what the
    router picked, in its order. Jobs left out stay in the queue untouched. A registry read
    that fails falls back to claiming every job as it comes (arq's plain pull)."""
    start_jobs = worker.start_jobs

    async def start_jobs_routed(job_ids: list[bytes]) -> None:
        capacity = worker.max_jobs - worker.job_counter
        try:
            decision = await router.decide(job_ids, capacity)
        except (RedisError, OSError) as e:
            logger.warning("routing failed (%s: %s); claiming jobs as they come", type(e), e)
            await start_jobs(job_ids)
            return
        if not decision.claim:
            return
        before = set(worker.tasks)
        await start_jobs([j for j, _ in decision.claim])
        for job_id, reason in decision.claim:
            key = job_id.decode()
            if key in worker.tasks and key not in before:
                router.claimed(job_id, reason)

    worker.start_jobs = start_jobs_routed  # type: ignore[method-assign]


class HoldingsWatch(BackgroundLoop):
    """Republishes this worker's registry entry (``publish``) within ``WATCH_S`` of a
    change to what its engine holds, or of its load by ``LIGHTER_BY`` jobs, so routing uses
    what is held and how busy each worker is now, not as of the last heartbeat."""

    task_name = "holdings"

    def __init__(
        self,
        holdings: Callable[[], tuple[frozenset[int], frozenset[int]]],
        publish: Callable[[], Awaitable[None]],
        load: Callable[[], int] = lambda: 0,
    ) -> None:
        self._holdings = holdings
        self._publish = publish
        self._load = load

    async def run(self) -> None:
        last, last_load = self._holdings(), self._load()
        while True:
            await asyncio.sleep(WATCH_S)
            now, load = self._holdings(), self._load()
            if now != last or abs(load - last_load) >= LIGHTER_BY:
                try:
                    await self._publish()
                    last, last_load = now, load
                except (RedisError, OSError) as e:  # the next heartbeat publishes it anyway
                    logger.debug("publishing what this worker holds failed: %r", e)
