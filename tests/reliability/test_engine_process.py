"""The engine runs in a child process of each worker. Its death takes the worker down at
once, and the jobs run again elsewhere exactly once; a worker's death never leaves its
engine process behind."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
from reliability_support import HEARTBEAT_TTL, registry_entry, stream_events, streaming, wait_until

from lorafleet.producer import Client, SamplingParams

pytestmark = pytest.mark.slow

LONG = SamplingParams(max_tokens=300, temperature=0.0, ignore_eos=True)
NUM_JOBS = 6


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def test_engine_death_ends_the_worker_and_its_jobs_run_again_once(
    rel_redis, make_config, start_worker, rel_adapters
):
    url = rel_redis.url
    first = start_worker(make_config(url, affinity=False))  # every job at once (routing off)
    engine_pid = registry_entry(url, first.config.name)["engine_pid"]
    assert engine_pid != first.pid and _alive(engine_pid)
    rescuer = start_worker(make_config(url, queue=first.config.queue, affinity=False))
    rescuer.signal(signal.SIGSTOP)  # thawed once the first worker holds every job
    loras = [None, rel_adapters[0], rel_adapters[2]]

    async def scenario():
        async with Client(url, queue_name=first.config.queue) as client:
            handles = [
                await client.submit(f"engine crash {i}", LONG, loras[i % len(loras)])
                for i in range(NUM_JOBS)
            ]
            ids = [h.job_id for h in handles]
            await asyncio.to_thread(streaming, url, ids, 30)
            os.kill(engine_pid, signal.SIGKILL)
            await asyncio.to_thread(
                wait_until, lambda: not first.running, 10, "the worker to exit after its engine"
            )
            killed_at = time.monotonic()
            rescuer.signal(signal.SIGCONT)
            outputs = await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), 60)
            return ids, outputs, time.monotonic() - killed_at

    ids, outputs, recovered_in = asyncio.run(scenario())

    assert first.stop() == 70
    assert "engine process exited" in first.log_tail()
    assert recovered_in < HEARTBEAT_TTL + 30
    for job_id, output in zip(ids, outputs, strict=True):
        assert output.request_id == job_id
        assert len(output.outputs[0].token_ids) == LONG.max_tokens
        events = stream_events(url, job_id)
        assert [e.attempt for e in events if e.final] == [2]


def test_hung_engine_ends_the_worker_and_its_jobs_run_again_once(
    rel_redis, make_config, start_worker
):
    """SIGSTOP freezes the engine without killing it: the stall watchdog must turn the hang
    into the death path (kill, worker exit 70), so the jobs run on the rescuer instead of
    waiting out the job timeout."""
    url = rel_redis.url
    stall = 2.0
    first = start_worker(make_config(url, engine_stall_timeout=stall, affinity=False))
    engine_pid = registry_entry(url, first.config.name)["engine_pid"]
    rescuer = start_worker(make_config(url, queue=first.config.queue, affinity=False))
    rescuer.signal(signal.SIGSTOP)

    async def scenario():
        async with Client(url, queue_name=first.config.queue) as client:
            handles = [await client.submit(f"engine hang {i}", LONG) for i in range(3)]
            ids = [h.job_id for h in handles]
            await asyncio.to_thread(streaming, url, ids, 30)
            os.kill(engine_pid, signal.SIGSTOP)
            frozen_at = time.monotonic()
            await asyncio.to_thread(
                wait_until, lambda: not first.running, stall + 10, "the worker to exit"
            )
            exited_after = time.monotonic() - frozen_at
            rescuer.signal(signal.SIGCONT)
            outputs = await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), 60)
            return ids, outputs, exited_after

    ids, outputs, exited_after = asyncio.run(scenario())

    assert first.stop() == 70
    assert "hung (no step in 2s) and was killed" in first.log_tail()
    assert stall <= exited_after < stall + 10
    assert not _alive(engine_pid)
    for job_id, output in zip(ids, outputs, strict=True):
        assert len(output.outputs[0].token_ids) == LONG.max_tokens
        assert [e.attempt for e in stream_events(url, job_id) if e.final] == [2]


def test_killed_worker_leaves_no_engine_process(rel_redis, make_config, start_worker):
    worker = start_worker(make_config(rel_redis.url))
    engine_pid = registry_entry(rel_redis.url, worker.config.name)["engine_pid"]
    assert _alive(engine_pid)
    worker.signal(signal.SIGKILL)
    wait_until(lambda: not _alive(engine_pid), 10, "the engine process to exit")


def test_ctrl_c_drains_the_worker_before_its_engine_stops(rel_redis, make_config, start_worker):
    """SIGINT to the whole process group (a terminal's Ctrl-C) reaches the engine too: it
    must ignore it, so the worker finishes its running job before stopping the engine."""
    worker = start_worker(make_config(rel_redis.url))
    engine_pid = registry_entry(rel_redis.url, worker.config.name)["engine_pid"]

    async def scenario():
        async with Client(rel_redis.url, queue_name=worker.config.queue) as client:
            handle = await client.submit("ctrl-c", LONG)
            await asyncio.to_thread(
                wait_until, lambda: stream_events(rel_redis.url, handle.job_id), 30, "tokens"
            )
            os.kill(engine_pid, signal.SIGINT)
            worker.signal(signal.SIGINT)
            return await asyncio.wait_for(handle.result(), 60)

    output = asyncio.run(scenario())
    assert len(output.outputs[0].token_ids) == LONG.max_tokens
    wait_until(lambda: not worker.running, 30, "the worker to exit after draining")
    assert worker.stop() == 0
    assert not _alive(engine_pid)
