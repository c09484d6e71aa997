"""Prefetch from the queue on a real Redis: while a worker's job slots are full, it reads
ahead the adapters of the jobs waiting for it, and only those, once each."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from arq.connections import create_pool
from arq.constants import in_progress_key_prefix
from arq.worker import Worker, func

from lorafleet.producer import Client, LoRARequest, SamplingParams
from lorafleet.producer.keys import WORKERS_KEY
from lorafleet.producer.redis_server import EmbeddedRedis
from lorafleet.worker.serve.homes import WorkerView, homes
from lorafleet.worker.serve.prefetch import QueuePrefetch
from lorafleet.worker.serve.redis_url import redis_settings_from_url
from lorafleet.worker.serve.routing import Router


async def _never(ctx: dict, payload: bytes) -> None:  # the arq function; never run here
    raise AssertionError("not run in this test")


def _homed(home: str, names: list[str], skip: set[int]) -> int:
    views = [WorkerView(n) for n in names]
    return next(a for a in range(1, 10_000) if a not in skip and homes(a, views)[0] == home)


def test_a_full_worker_reads_ahead_for_its_waiting_jobs_once():
    async def scenario(url: str) -> None:
        queue = f"lorafleet:test-prefetch:{uuid.uuid4().hex[:6]}"
        me, other = f"me-{uuid.uuid4().hex[:4]}", f"other-{uuid.uuid4().hex[:4]}"
        pool = await create_pool(redis_settings_from_url(url))
        worker = Worker(
            functions=[func(_never, name="generate")], queue_name=queue, redis_pool=pool, max_jobs=2
        )
        router = Router(
            pool,
            me,
            queue,
            affinity=True,
            steal_after=1.0,
            holdings=lambda: (frozenset(), frozenset()),
            load=lambda: worker.job_counter,
        )
        sent: list[list[LoRARequest]] = []
        prefetch = QueuePrefetch(worker, router, sent.append)
        names = [me, other]
        mine = _homed(me, names, set())
        held_elsewhere = _homed(me, names, {mine})
        running = _homed(me, names, {mine, held_elsewhere})
        theirs = _homed(other, names, set())
        for name, cached in ((me, []), (other, [held_elsewhere])):
            entry = {"heartbeat": time.time(), "ttl": 30.0, "state": "ready", "queue": queue,
                     "fleet": {"cached": cached}}  # fmt: skip
            await pool.hset(WORKERS_KEY, name, json.dumps(entry))
        loras = {
            a: LoRARequest(f"p{a}", a, f"/adapters/p{a}")
            for a in (mine, held_elsewhere, running, theirs)
        }
        async with Client(url, queue_name=queue) as client:
            params = SamplingParams(max_tokens=1)
            handles = [
                await client.submit("x", params, loras[a])
                for a in (mine, mine, held_elsewhere, running, theirs)
            ]
        await pool.set(in_progress_key_prefix + handles[3].job_id, b"1")  # another runs it
        worker.job_counter = 1  # room: arq's own poll claims the worker's jobs
        assert await prefetch.look() == [] and sent == []
        worker.job_counter = 2  # full
        assert await prefetch.look() == [loras[mine]]
        assert await prefetch.look() == []  # asked once while full
        worker.job_counter = 1
        await prefetch.look()
        worker.job_counter = 2  # full again: asked again
        assert await prefetch.look() == [loras[mine]]
        assert sent == [[loras[mine]], [loras[mine]]]
        assert router.counters.prefetches_requested == 2
        await pool.aclose()

    with EmbeddedRedis() as server:
        asyncio.run(scenario(server.url))
