"""The router's verdicts on a real queue in a real Redis: jobs enqueued by the real client,
registry entries as heartbeats write them; the clock is the router's own, moved by hand."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis
from arq.constants import job_key_prefix

from lorafleet.producer import Client, LoRARequest, SamplingParams
from lorafleet.producer.keys import WORKERS_KEY
from lorafleet.producer.redis_server import EmbeddedRedis
from lorafleet.worker.serve.homes import WorkerView, homes
from lorafleet.worker.serve.routing import IDLE_STEAL_SHARE, LIGHTER_BY, Router

STEAL_AFTER = 2.0
PARAMS = SamplingParams(max_tokens=2)


@pytest.fixture(scope="module")
def server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as s:
        yield s


def adapter_homed_at(home: str, names: list[str], start: int = 1, skip=()) -> int:
    """The first adapter id from ``start`` whose (single) home among ``names`` is ``home``."""
    views = [WorkerView(n) for n in names]
    return next(a for a in range(start, 10_000) if a not in skip and homes(a, views)[0] == home)


def lora(adapter: int) -> LoRARequest:
    return LoRARequest(f"r{adapter}", adapter, f"/adapters/r{adapter}")


class Scene:
    """A queue, a registry and a router for worker ``me``; ``t`` is the router's clock."""

    def __init__(self, url: str, *, affinity: bool = True) -> None:
        self.url = url
        self.queue = f"lorafleet:test-routing:{uuid.uuid4().hex[:6]}"
        self.me = f"me-{uuid.uuid4().hex[:4]}"
        self.other = f"other-{uuid.uuid4().hex[:4]}"
        self.t = time.time()
        self.slots: frozenset[int] = frozenset()
        self.cached: frozenset[int] = frozenset()
        self.jobs_held = 1  # busy unless a test says otherwise
        self.redis = aioredis.Redis.from_url(url)
        self.router = Router(
            self.redis,
            self.me,
            self.queue,
            affinity=affinity,
            steal_after=STEAL_AFTER,
            holdings=lambda: (self.slots, self.cached),
            load=lambda: self.jobs_held,
            clock=lambda: self.t,
        )

    async def register(self, name: str, *, age: float = 0.0, state: str = "ready", **fleet):
        entry = {
            "heartbeat": self.t - age,
            "ttl": 3.0,
            "state": state,
            "queue": self.queue,
            "fleet": {"slots": [], "cached": [], "traffic": {}, **fleet},
        }
        await self.redis.hset(WORKERS_KEY, name, json.dumps(entry))
        self.router._view = None  # read the registry again on the next poll

    async def enqueue(self, *adapters: int | None) -> list[bytes]:
        async with Client(self.url, queue_name=self.queue) as client:
            handles = [
                await client.submit("hi", PARAMS, None if a is None else lora(a)) for a in adapters
            ]
        self.t = max(self.t, time.time())  # the jobs' enqueue times are the real clock's
        return [h.job_id.encode() for h in handles]

    async def head(self) -> list[bytes]:
        return await self.redis.zrange(self.queue, 0, -1)

    async def verdict(self, capacity: int = 100) -> list[tuple[bytes, str]]:
        return (await self.router.decide(await self.head(), capacity)).claim

    def homed_at(self, home: str, skip=()) -> int:
        """The first adapter whose (single) home among me and the other worker is ``home``."""
        return adapter_homed_at(home, [self.me, self.other], skip=skip)

    async def meet(self, **other) -> None:
        """Register me, then the other worker with ``other`` (``register``'s keywords)."""
        await self.register(self.me)
        await self.register(self.other, **other)


def play(server: EmbeddedRedis, scenario, **scene) -> None:
    """Run ``await scenario(Scene(...))`` to the end, then close the scene's connection."""

    async def go():
        s = Scene(server.url, **scene)
        try:
            await scenario(s)
        finally:
            await s.redis.aclose()

    asyncio.run(go())


def test_held_and_homed_jobs_are_claimed_now_others_after_the_bounded_wait(server):
    async def scenario(s: Scene):
        await s.meet()
        mine = s.homed_at(s.me)
        theirs = s.homed_at(s.other)
        held = s.homed_at(s.other, skip={theirs})
        s.cached = frozenset({held})
        j_mine, j_theirs, j_held, j_base = await s.enqueue(mine, theirs, held, None)
        assert dict(await s.verdict()) == {j_mine: "homed", j_held: "held", j_base: "base"}
        s.t += STEAL_AFTER * 0.9
        assert j_theirs not in dict(await s.verdict())  # its home may still take it
        s.t += STEAL_AFTER * 0.1
        assert dict(await s.verdict())[j_theirs] == "stolen"
        # Now-claims first, then the overdue ones (each group in queue order, which for jobs
        # enqueued in the same millisecond is their ids' order).
        order = [j for j, _ in await s.verdict()]
        assert set(order[:3]) == {j_mine, j_held, j_base} and order[3] == j_theirs

    play(server, scenario)


def test_an_idle_worker_steals_sooner(server):
    async def scenario(s: Scene):
        await s.meet()
        theirs = s.homed_at(s.other)
        (job,) = await s.enqueue(theirs)
        s.jobs_held = 0
        assert await s.verdict() == []
        s.t += STEAL_AFTER * IDLE_STEAL_SHARE
        assert await s.verdict() == [(job, "stolen")]
        s.jobs_held = 3  # busy again: the full wait applies
        assert await s.verdict() == []

    play(server, scenario)


def test_a_cold_adapter_held_elsewhere_stays_there_and_its_home_waits(server):
    async def scenario(s: Scene):
        mine = s.homed_at(s.me)
        await s.meet(cached=[mine])
        (job,) = await s.enqueue(mine)
        assert await s.verdict() == []  # the holder serves it without reading the disk
        s.t += STEAL_AFTER
        assert await s.verdict() == [(job, "homed")]  # ...unless it does not in time

    play(server, scenario)


def test_dead_and_draining_workers_lose_their_adapters_and_rehomes_are_counted(server):
    async def scenario(s: Scene):
        theirs = s.homed_at(s.other)
        await s.meet()
        (job,) = await s.enqueue(theirs)
        assert await s.verdict() == []
        assert s.router.counters.rehomes == 0
        await s.register(s.other, age=3.5)  # its last beat is older than its TTL: dead
        assert await s.verdict() == [(job, "homed")]
        assert s.router.counters.rehomes == 1
        await s.register(s.other)  # back: the adapter goes home
        assert await s.verdict() == []
        await s.register(s.other, state="draining")
        assert await s.verdict() == [(job, "homed")]
        assert s.router.counters.rehomes == 2

    play(server, scenario)


def test_workers_of_other_queues_do_not_count(server):
    async def scenario(s: Scene):
        theirs = s.homed_at(s.other)
        await s.register(s.me)
        entry = {"heartbeat": s.t, "ttl": 3.0, "state": "ready", "queue": "lorafleet:else"}
        await s.redis.hset(WORKERS_KEY, s.other, json.dumps(entry))
        (job,) = await s.enqueue(theirs)
        assert await s.verdict() == [(job, "homed")]  # the only live worker of this queue

    play(server, scenario)


def test_a_payload_routing_cannot_read_is_claimed_now_for_its_run_to_report(server):
    async def scenario(s: Scene):
        await s.meet()
        (job,) = await s.enqueue(None)
        await s.redis.set(job_key_prefix + job.decode(), b"\xc1 not msgpack")
        s.router._jobs.clear()
        assert await s.verdict() == [(job, "base")]

    play(server, scenario)


def test_with_affinity_off_every_job_is_claimed_in_queue_order(server):
    async def scenario(s: Scene):
        await s.meet()
        theirs = s.homed_at(s.other)
        s.cached = frozenset({5})
        jobs = await s.enqueue(theirs, None, 5)
        verdict = await s.verdict()
        assert dict(verdict) == dict(zip(jobs, ["stolen", "base", "held"], strict=True))
        assert [j for j, _ in verdict] == await s.head()  # as arq read them

    play(server, scenario, affinity=False)


def test_a_worker_much_lighter_than_the_homes_and_holders_steals_sooner(server):
    async def scenario(s: Scene):
        theirs = s.homed_at(s.other)
        await s.meet(load=5)
        (job,) = await s.enqueue(theirs)
        s.jobs_held = 4  # lighter, but by fewer than LIGHTER_BY jobs: the full wait
        s.t += STEAL_AFTER * IDLE_STEAL_SHARE
        assert await s.verdict() == []
        s.jobs_held = 5 - LIGHTER_BY
        assert await s.verdict() == [(job, "stolen")]
        await s.register(s.me, cached=[theirs])  # I do not count as a holder against myself
        await s.register("third-" + s.other, load=1, cached=[theirs])  # a light holder
        assert await s.verdict() == []

    play(server, scenario)
