"""A worker killed with SIGKILL mid-batch: its jobs run again elsewhere within the heartbeat
TTL (not arq's job timeout + 10 s), each client gets exactly one result per job, and a
client streaming a job's text sees it restart cleanly at the new attempt."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
import redis
from reliability_support import HEARTBEAT_TTL, registry_entry, stream_events, streaming, wait_until

from lorafleet.producer import Client, SamplingParams
from lorafleet.producer.keys import arq_job_key

pytestmark = pytest.mark.slow

LONG = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
NUM_JOBS = 8


def _in_progress(url: str, job_ids: list[str]) -> int:
    with redis.Redis.from_url(url) as r:
        return sum(r.exists(f"arq:in-progress:{j}") for j in job_ids)


async def _follow(handle) -> str:
    return "".join([delta async for delta in handle.stream()])


def test_sigkill_mid_batch_reruns_every_job_once_within_the_ttl(
    rel_redis, make_config, start_worker, rel_adapters
):
    url = rel_redis.url
    # job_timeout stays at its default (600 s): arq alone would wait 610 s to re-run.
    # Routing off: the first worker takes every job at once (the rescuer is stopped; with
    # routing, jobs homed on it would wait the steal delay and start later).
    first = start_worker(make_config(url, affinity=False))
    config = first.config
    assert config.job_timeout == 600
    # The rescuer starts now (start-up takes seconds) but is frozen, so that the first
    # worker takes every job; it thaws only once all of them are claimed.
    rescuer = start_worker(make_config(url, queue=config.queue, affinity=False))
    rescuer.signal(signal.SIGSTOP)
    loras = [None, rel_adapters[0], rel_adapters[1], None]

    async def scenario():
        async with Client(url, queue_name=config.queue) as client:
            handles = [
                await client.submit(f"crash test {i}", LONG, loras[i % len(loras)])
                for i in range(NUM_JOBS)
            ]
            ids = [h.job_id for h in handles]
            followers = [asyncio.create_task(_follow(h)) for h in handles]
            await asyncio.to_thread(streaming, url, ids, 30)
            assert not any(h.done for h in handles), "jobs must be mid-generation"
            first.signal(signal.SIGKILL)
            killed_at = time.monotonic()
            rescuer.signal(signal.SIGCONT)
            await asyncio.to_thread(
                wait_until,
                lambda: all(e.attempt == 2 for j in ids for e in stream_events(url, j)[-1:]),
                30,
                "every job to restart on the rescuer",
            )
            recovered_in = time.monotonic() - killed_at
            outputs = await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), 60)
            texts = await asyncio.wait_for(asyncio.gather(*followers), 10)
            # The live worker removes the dead one from the registry (3 TTLs of silence).
            await asyncio.to_thread(
                wait_until,
                lambda: registry_entry(url, config.name) is None,
                3 * HEARTBEAT_TTL + 5 - (time.monotonic() - killed_at),
                "the dead worker to leave the registry",
            )
            return ids, outputs, texts, recovered_in

    ids, outputs, texts, recovered_in = asyncio.run(scenario())

    assert recovered_in < HEARTBEAT_TTL + 2, f"recovery took {recovered_in:.1f}s"
    for job_id, output, text in zip(ids, outputs, texts, strict=True):
        assert output.request_id == job_id and output.finished
        assert len(output.outputs[0].token_ids) == LONG.max_tokens
        # The stream restarted at attempt 2 without repeating or mixing text.
        assert text == output.outputs[0].text
        events = stream_events(url, job_id)
        assert {e.attempt for e in events} == {1, 2}
        assert [e.attempt for e in events if e.final] == [2]
    with redis.Redis.from_url(url) as r:
        assert r.zcard(config.queue) == 0
        assert _in_progress(url, ids) == 0
        assert not any(r.exists(arq_job_key(j)) for j in ids)
