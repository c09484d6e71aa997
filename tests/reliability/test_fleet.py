"""The fleet with real worker processes on a real Redis: adapter-affine routing, stealing
after the bounded wait, re-homing after a kill and after a drain, workers joining, and
arq's guarantees kept throughout (every job answered exactly once).

Adapter ids are picked so that their home (rendezvous hashing over the test's worker names,
``lorafleet.worker.serve.homes``) is the worker a test wants; every id points at the same
adapter folder. Each test sends fewer adapter jobs than ``MIN_TRAFFIC``, so every adapter
has exactly one home.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from reliability_support import (
    HEARTBEAT_TTL,
    fresh_entry,
    registry_entry,
    stream_events,
    streaming,
    wait_until,
)

from lorafleet.producer import Client, LoRARequest, RequestOutput, SamplingParams
from lorafleet.worker.local.launcher import WorkerProcess
from lorafleet.worker.serve.homes import MIN_TRAFFIC, WorkerView, homes
from lorafleet.worker.serve.routing import IDLE_STEAL_SHARE, REFRESH_S

pytestmark = pytest.mark.slow

SHORT = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
LONG = SamplingParams(max_tokens=300, temperature=0.0, ignore_eos=True)
LONGEST = SamplingParams(max_tokens=480, temperature=0.0, ignore_eos=True)  # < max_model_len
MEDIUM = SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True)


def names(n: int) -> list[str]:
    tag = uuid.uuid4().hex[:6]
    return [f"fleet-{tag}-{chr(ord('a') + i)}" for i in range(n)]


def homed_at(home: str, among: list[str], skip: set[int] = frozenset()) -> int:
    """An adapter id (>= 100) whose one home among ``among`` is ``home``."""
    views = [WorkerView(n) for n in among]
    return next(a for a in range(100, 10_000) if a not in skip and homes(a, views)[0] == home)


def settle() -> None:
    """Let every router re-read the registry (workers that just joined are in its view)."""
    time.sleep(2 * REFRESH_S + 0.1)


def served_by(url: str, job_id: str) -> list[str]:
    """The workers that wrote a final event for the job (one per answer)."""
    return [e.result.worker for e in stream_events(url, job_id) if e.result is not None]


def fleet_part(url: str, name: str, fresh: bool = False) -> dict[str, Any]:
    """The ``fleet`` part of the worker's registry entry (``fresh``: from a beat after now)."""
    if fresh:
        return fresh_entry(url, name, after=time.time())["fleet"]
    entry = registry_entry(url, name)
    assert entry is not None, f"{name} is not in the registry"
    return entry["fleet"]


@pytest.fixture
def fleet(rel_redis, make_config, start_worker, rel_adapters):
    """(count, **overrides) -> (queue, worker names, start(name, ready=True), start_all(*names),
    lora(adapter id) -> LoRARequest): workers of one fresh queue, stopped after the test."""

    started: list[WorkerProcess] = []

    def make(count: int, **overrides: Any):
        queue = f"lorafleet:fleet:{uuid.uuid4().hex[:6]}"
        fleet_names = names(count)

        def start(name: str, ready: bool = True) -> WorkerProcess:
            config = make_config(rel_redis.url, queue=queue, name=name, **overrides)
            started.append(start_worker(config, ready=ready))
            return started[-1]

        def start_all(*names: str) -> list[WorkerProcess]:
            """Start workers side by side (start-up is mostly the engine's model load)."""
            processes = [start(name, ready=False) for name in names]
            ready = [p.wait_ready(timeout=180) for p in processes]
            settle()
            return ready

        def lora(adapter: int) -> LoRARequest:
            return LoRARequest(f"fleet{adapter}", adapter, rel_adapters[0].lora_path)

        return queue, fleet_names, start, start_all, lora

    yield make
    # This test's workers leave now, not at the session's end (they would poll meanwhile).
    for process in started:
        process.signal(signal.SIGCONT)
        process.signal(signal.SIGTERM)
    for process in started:
        process.stop(timeout=15)


async def _keep_busy(client: Client, handles: list[Any], stop: asyncio.Event, tokens: int) -> None:
    """Base-model jobs of ``tokens`` tokens, one after another, until ``stop``."""
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    while not stop.is_set():
        handle = await client.submit(f"keep B busy {uuid.uuid4().hex}", params)
        handles.append(handle)
        await handle.result(timeout=60)


async def _one(client: Client, lora: LoRARequest | None, params=SHORT) -> tuple[str, RequestOutput]:
    handle = await client.submit("fleet test", params, lora)
    return handle.job_id, await handle.result(timeout=60)


def test_jobs_go_to_the_worker_holding_their_adapter_and_a_joining_worker_takes_its_homes(
    rel_redis, fleet
):
    url = rel_redis.url
    queue, (a, b), start, _, lora = fleet(2, steal_after=HEARTBEAT_TTL)
    x = homed_at(a, [a, b])  # A's by hashing, but B will hold it
    y = homed_at(a, [a, b], skip={x})  # A's, held by nobody
    start(b)

    async def scenario() -> tuple[list[str], list[str], list[float]]:
        async with Client(url, queue_name=queue) as client:
            await _one(client, lora(x))  # B, the only worker, now holds X
            start(a)  # A joins
            wait_until(lambda: x in fleet_part(url, b)["cached"], 10, "B to publish X")
            settle()
            x_jobs = [(await _one(client, lora(x)))[0] for _ in range(3)]
            y_runs = [await _one(client, lora(y)) for _ in range(3)]
        waits = [out.metrics.time_in_queue for _, out in y_runs]
        return x_jobs, [j for j, _ in y_runs], waits

    x_jobs, y_jobs, y_waits = asyncio.run(scenario())
    assert [served_by(url, j) for j in x_jobs] == [[b]] * 3  # held beats homed
    assert [served_by(url, j) for j in y_jobs] == [[a]] * 3  # the newcomer takes its homes
    # ...at once, not after the wait a steal would take.
    assert max(y_waits) < HEARTBEAT_TTL * IDLE_STEAL_SHARE, y_waits
    assert fleet_part(url, b, fresh=True)["counters"]["claimed"].get("held", 0) >= 3
    assert sorted(fleet_part(url, a)["cached"]) == [y]
    assert MIN_TRAFFIC > 7  # every adapter here had one home


def test_jobs_of_a_stalled_home_are_stolen_after_the_bounded_wait(rel_redis, fleet):
    url = rel_redis.url
    steal_after = 2.0
    # A long TTL: the stalled home stays live in the registry, so only stealing can help.
    queue, (a, b), _, start_all, lora = fleet(2, steal_after=steal_after, heartbeat_ttl=10.0)
    x = homed_at(a, [a, b])
    x2 = homed_at(a, [a, b], skip={x})  # B holds X after stealing it: a second adapter
    home, _ = start_all(a, b)
    home.signal(signal.SIGSTOP)  # busy or hung: it polls no more

    async def scenario() -> tuple[float, float, str, str]:
        async with Client(url, queue_name=queue) as client:
            idle_job, idle_out = await _one(client, lora(x))  # B is idle: a short wait
            # Busy for longer than the wait, however fast B generates: long base-model jobs
            # of staggered lengths, each submitted again as it ends, so B never runs dry.
            longs: list[Any] = []
            stop = asyncio.Event()
            feeders = [
                asyncio.create_task(_keep_busy(client, longs, stop, max_tokens))
                for max_tokens in (LONGEST.max_tokens, 2 * LONGEST.max_tokens // 3, 40)
            ]
            await asyncio.to_thread(
                wait_until,
                lambda: len(longs) >= 3 and all(stream_events(url, h.job_id) for h in longs[:3]),
                30,
                "B to start",
            )
            busy_job, busy_out = await _one(client, lora(x2))  # B is busy: the full wait
            stop.set()
            for handle in longs:
                await handle.abort()
            await asyncio.gather(*feeders, return_exceptions=True)
        return (
            idle_out.metrics.time_in_queue,
            busy_out.metrics.time_in_queue,
            idle_job,
            busy_job,
        )

    try:
        idle_wait, busy_wait, idle_job, busy_job = asyncio.run(scenario())
    finally:
        home.signal(signal.SIGCONT)
    assert served_by(url, idle_job) == [b] and served_by(url, busy_job) == [b]
    assert steal_after * IDLE_STEAL_SHARE <= idle_wait < steal_after, idle_wait
    assert steal_after <= busy_wait < 10.0, busy_wait
    assert fleet_part(url, b, fresh=True)["counters"]["steals"] >= 1


def test_a_killed_home_re_homes_its_adapters_and_no_job_is_left_behind(rel_redis, fleet):
    url = rel_redis.url
    queue, (a, b, c), _, start_all, lora = fleet(3, steal_after=HEARTBEAT_TTL)
    x = homed_at(a, [a, b, c])
    heir = homes(x, [WorkerView(b), WorkerView(c)])[0]
    victim, _, _ = start_all(a, b, c)

    async def scenario() -> list[str]:
        async with Client(url, queue_name=queue) as client:
            first, _ = await _one(client, lora(x))
            assert served_by(url, first) == [a]
            running = [await client.submit(f"long {i}", MEDIUM, lora(x)) for i in range(4)]
            await asyncio.to_thread(streaming, url, [h.job_id for h in running], 30)
            victim.signal(signal.SIGKILL)  # X's only home dies mid-generation
            queued = [await client.submit(f"after {i}", SHORT, lora(x)) for i in range(4)]
            # Once the registry drops A, X has a new home.
            await asyncio.to_thread(
                wait_until,
                lambda: fleet_part(url, heir)["counters"]["rehomes"] >= 1,
                3 * HEARTBEAT_TTL,
                "X's new home to count the re-home",
            )
            later = [await _one(client, lora(x)) for _ in range(2)]
            handles = running + queued
            await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), 120)
            return [h.job_id for h in handles] + [j for j, _ in later]

    jobs = asyncio.run(scenario())
    for i, job_id in enumerate(jobs):
        answers = served_by(url, job_id)
        assert len(answers) == 1, (job_id, answers)  # exactly once
        if i >= 4:  # sent after the kill
            assert answers[0] in (b, c), (job_id, answers)


def test_a_draining_home_hands_its_adapters_over_at_once(rel_redis, fleet):
    url = rel_redis.url
    queue, (a, b), _, start_all, lora = fleet(2, steal_after=HEARTBEAT_TTL)
    x = homed_at(a, [a, b])
    home, _ = start_all(a, b)

    async def scenario() -> tuple[list[str], list[float]]:
        async with Client(url, queue_name=queue) as client:
            first, _ = await _one(client, lora(x))
            assert served_by(url, first) == [a]
            home.signal(signal.SIGTERM)
            await asyncio.to_thread(
                wait_until,
                lambda: (registry_entry(url, a) or {"state": "draining"})["state"] == "draining",
                10,
                "A to show as draining",
            )
            await asyncio.sleep(0.5)  # B re-reads the registry
            runs = [await _one(client, lora(x)) for _ in range(3)]
        return [j for j, _ in runs], [out.metrics.time_in_queue for _, out in runs]

    jobs, waits = asyncio.run(scenario())
    assert [served_by(url, j) for j in jobs] == [[b]] * 3
    assert max(waits) < HEARTBEAT_TTL * IDLE_STEAL_SHARE, waits  # homed, not stolen
    assert fleet_part(url, b, fresh=True)["counters"]["rehomes"] >= 1


def test_under_load_a_killed_worker_and_a_joining_one_every_job_answered_exactly_once(
    rel_redis, fleet
):
    url = rel_redis.url
    queue, (a, b, c, d), start, start_all, lora = fleet(4)
    victim, _, _ = start_all(a, b, c)
    adapters = [lora(i) for i in range(1, 13)] + [None]
    # Homed at the joiner, and new to the fleet when it joins (no one holds it: a holder
    # would serve it first), so the joiner's part does not hang on which of 1..12 happen
    # to be homed at it and free (random worker names: about one run in three had none).
    joiners = [*adapters[:12], lora(homed_at(d, [a, b, c, d])), None]
    rate = 8.0

    async def send(client: Client, count: int, offset: int, loras: list) -> list:
        handles = []
        for i in range(count):
            params = MEDIUM if i % 8 == 0 else SHORT  # some are mid-generation at the kill
            lora_request = loras[i % len(loras)]
            handles.append(await client.submit(f"load {offset + i}", params, lora_request))
            await asyncio.sleep(1 / rate)
        return handles

    async def scenario(joiner: Callable[[], WorkerProcess]) -> list:
        async with Client(url, queue_name=queue) as client:
            first = await send(client, 16, 0, adapters)
            newcomer = await asyncio.to_thread(joiner)  # started meanwhile: ready now
            assert newcomer.running
            victim.signal(signal.SIGKILL)
            killed = time.monotonic()
            second = await send(client, 32, 16, joiners)
            handles = first + second
            outs = await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), 180)
            assert all(o.finished for o in outs)
            assert time.monotonic() - killed < 180
            return handles

    pending = start(d, ready=False)
    handles = asyncio.run(scenario(lambda: pending.wait_ready(timeout=180)))
    answers = {h.job_id: served_by(url, h.job_id) for h in handles}
    assert all(len(w) == 1 for w in answers.values()), answers  # exactly once
    served = [w[0] for w in answers.values()]
    assert served.count(d) >= 1, "the worker that joined took no job"
    assert {b, c} <= set(served)
