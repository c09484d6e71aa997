"""Redis restarts (persistence on, same port) in the middle of a load: the worker rides it
out in the same process, the client keeps waiting, and every acknowledged job is answered
exactly once."""

from __future__ import annotations

import asyncio
import signal

import pytest
from reliability_support import stream_events, wait_until

from lorafleet.producer import Client, SamplingParams
from lorafleet.producer.redis_server import EmbeddedRedis

pytestmark = pytest.mark.slow

PARAMS = SamplingParams(max_tokens=150, temperature=0.0, ignore_eos=True)
NUM_JOBS = 40


@pytest.fixture
def persistent_redis(tmp_path):
    server = EmbeddedRedis(persist=True, data_dir=tmp_path / "redis")
    with server:
        yield server


def test_redis_restart_mid_load_loses_no_acknowledged_job(
    persistent_redis, make_config, start_worker, rel_adapters
):
    url = persistent_redis.url
    worker = start_worker(make_config(url))
    queue, pid = worker.config.queue, worker.pid
    loras = [None, *rel_adapters]

    async def scenario():
        # connect_timeout is the client's patience with a lost connection (its retry policy).
        async with Client(url, queue_name=queue, connect_timeout=15) as client:
            # Frozen while the jobs are enqueued: all of them are in Redis, most still queued
            # and the rest running, when Redis goes down.
            worker.signal(signal.SIGSTOP)
            handles = [
                await client.submit(f"restart {i}", PARAMS, loras[i % len(loras)])
                for i in range(NUM_JOBS)
            ]
            worker.signal(signal.SIGCONT)
            await asyncio.to_thread(
                wait_until,
                lambda: sum(h.done for h in handles) >= 5,
                30,
                "the first results",
            )
            assert sum(h.done for h in handles) < NUM_JOBS // 2
            await asyncio.to_thread(persistent_redis.restart)
            outputs = await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), 120)
            return [h.job_id for h in handles], outputs

    ids, outputs = asyncio.run(scenario())

    assert [o.request_id for o in outputs] == ids
    assert all(len(o.outputs[0].token_ids) == PARAMS.max_tokens for o in outputs)
    assert all(o.lora_request == loras[i % len(loras)] for i, o in enumerate(outputs))
    assert worker.running and worker.pid == pid
    for job_id in ids:  # answered once: one final event in its stream
        assert sum(e.final for e in stream_events(url, job_id)) == 1
