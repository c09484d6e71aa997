"""Metering under a real crash: a worker SIGKILLed mid-generation, its jobs re-run on
another worker. The ledger counts each job once, with the usage its client received, and
the killed runs count as waste of the killed worker, with the tokens they streamed."""

from __future__ import annotations

import asyncio
import signal
import uuid

import pytest
import redis.asyncio as aioredis
from reliability_support import stream_events, streaming

from lorafleet.producer import Client, SamplingParams
from lorafleet.producer.ledger import read_usage, to_us

pytestmark = pytest.mark.slow

LONG = SamplingParams(max_tokens=160, temperature=0.0, ignore_eos=True)
NUM_JOBS = 4


def test_a_sigkilled_run_is_waste_and_the_rerun_is_counted_once(
    rel_redis, make_config, start_worker, rel_adapters
):
    url = rel_redis.url
    # Routing off: with it, jobs homed on the stopped rescuer would start on the first worker
    # only after the steal wait, and the ones that started at once could end before the kill.
    first = start_worker(make_config(url, name=f"doomed-{uuid.uuid4().hex[:6]}", affinity=False))
    config = first.config
    rescuer = start_worker(make_config(url, queue=config.queue, affinity=False))
    rescuer.signal(signal.SIGSTOP)  # the first worker takes every job, all at once
    tenant = f"crash-{uuid.uuid4().hex[:6]}"

    async def scenario():
        async with Client(url, queue_name=config.queue) as client:
            handles = [
                await client.submit(f"meter crash {i}", LONG, rel_adapters[i % 2], tenant=tenant)
                for i in range(NUM_JOBS)
            ]
            ids = [h.job_id for h in handles]
            await asyncio.to_thread(streaming, url, ids, 30)
            first.signal(signal.SIGKILL)
            rescuer.signal(signal.SIGCONT)
            outputs = await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), 90)
            r = aioredis.Redis.from_url(url)
            try:
                report = await read_usage(r, by="tenant,adapter")
            finally:
                await r.aclose()
            return ids, outputs, report

    ids, outputs, report = asyncio.run(scenario())
    # Tokens the killed runs streamed (attempt 1 events), per the streams.
    streamed = sum(len(e.token_ids) for j in ids for e in stream_events(url, j) if e.attempt == 1)
    assert streamed > 0
    rows = [row for row in report.rows if row.tenant == tenant]
    assert sum(row.requests for row in rows) == NUM_JOBS
    assert (
        sum(row.completion_tokens for row in rows)
        == sum(o.usage.completion_tokens for o in outputs)
        == NUM_JOBS * LONG.max_tokens
    )
    assert sum(row.prompt_tokens for row in rows) == sum(o.usage.prompt_tokens for o in outputs)
    assert sum(row.engine_us for row in rows) == sum(to_us(o.usage.engine_s) for o in outputs)
    (waste,) = [w for w in report.waste if w.worker == config.name]
    assert waste.attempts == NUM_JOBS
    assert waste.completion_tokens == streamed
    assert waste.prompt_tokens == sum(o.usage.prompt_tokens for o in outputs)
