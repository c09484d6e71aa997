"""Deadlines and aborts, checked against the worker's engine state (its registry entry): a
job past its deadline never reaches the engine; an abort frees the job's KV blocks and
adapter slot while the rest of the batch runs on."""

from __future__ import annotations

import asyncio
import time

import pytest
from reliability_support import fresh_entry, stream_events, wait_until

from lorafleet.producer import Client, SamplingParams
from lorafleet.producer.errors import AbortedError, DeadlineExceededError

pytestmark = pytest.mark.slow

LONG = SamplingParams(max_tokens=480, temperature=0.0, ignore_eos=True)
SHORT = SamplingParams(max_tokens=4, temperature=0.0)
OTHERS = 62


def test_a_job_past_its_deadline_fails_without_engine_work(shared_worker):
    url, queue, name = (
        shared_worker.config.redis_url,
        shared_worker.config.queue,
        shared_worker.config.name,
    )
    before = fresh_entry(url, name, time.time())

    async def scenario():
        async with Client(url, queue_name=queue) as client:
            handles = [
                await client.submit(f"late {i}", SHORT, deadline=time.time() - 1) for i in range(20)
            ]
            return await asyncio.gather(*(h.result() for h in handles), return_exceptions=True)

    outcomes = asyncio.run(scenario())
    assert all(isinstance(o, DeadlineExceededError) for o in outcomes)
    assert all("in the queue" in o.message for o in outcomes)
    after = fresh_entry(url, name, time.time())
    assert after["sent_to_engine"] == before["sent_to_engine"]


def test_deadline_and_abort_free_kv_blocks_and_the_adapter_slot(shared_worker, rel_adapters):
    url, queue, name = (
        shared_worker.config.redis_url,
        shared_worker.config.queue,
        shared_worker.config.name,
    )
    # Long base-model jobs fill the engine (64 sequences) for a few seconds; the two victims
    # are the only users of their adapters.
    deadlined_lora, aborted_lora = rel_adapters[1], rel_adapters[2]

    async def scenario():
        async with Client(url, queue_name=queue) as client:
            others = [await client.submit(f"busy {i}", LONG) for i in range(OTHERS)]
            aborted = await client.submit("abort me", LONG, aborted_lora)
            deadlined = await client.submit("too slow", LONG, deadlined_lora, timeout=1.0)
            await asyncio.to_thread(
                wait_until,
                lambda: stream_events(url, aborted.job_id) and stream_events(url, deadlined.job_id),
                10,
                "the victims to generate",
            )
            busy = await asyncio.to_thread(fresh_entry, url, name, time.time())
            await aborted.abort()
            errors = await asyncio.gather(
                aborted.result(), deadlined.result(), return_exceptions=True
            )
            freed = await asyncio.to_thread(fresh_entry, url, name, time.time())
            still_running = sum(not h.done for h in others)
            await asyncio.gather(*(h.result() for h in others))
            idle = await asyncio.to_thread(fresh_entry, url, name, time.time())
            return busy["engine"], errors, freed["engine"], still_running, idle["engine"]

    busy, errors, freed, still_running, idle = asyncio.run(scenario())

    assert isinstance(errors[0], AbortedError) and isinstance(errors[1], DeadlineExceededError)
    assert still_running == OTHERS, "the batch must still be running when the victims are gone"
    assert busy["slots_in_use"] == 2 and busy["running"] == OTHERS + 2
    # The victims left the engine at once (finishing a sequence releases its blocks and
    # slot in the same call), and no block of theirs was lost: all are free once idle.
    assert freed["slots_in_use"] == 0 and freed["running"] == OTHERS and freed["requests"] == OTHERS
    assert idle["free_blocks"] == idle["num_blocks"] and idle["running"] == 0


def test_a_deadline_mid_generation_keeps_the_text_made_so_far(shared_worker):
    url, queue = shared_worker.config.redis_url, shared_worker.config.queue

    async def scenario():
        async with Client(url, queue_name=queue) as client:
            # A deadline at half of what the whole job takes here, however fast this machine.
            started = time.monotonic()
            await (await client.submit("how long", LONG)).result(timeout=120)
            deadline = (time.monotonic() - started) / 2
            handle = await client.submit("cut by the clock", LONG, timeout=deadline)
            streamed = []
            with pytest.raises(DeadlineExceededError) as caught:
                async for delta in handle.stream():
                    streamed.append(delta)
            return "".join(streamed), caught.value

    streamed, error = asyncio.run(scenario())
    completion = error.output.outputs[0]
    assert 0 < len(completion.token_ids) < LONG.max_tokens
    assert completion.finish_reason == "abort"
    assert error.partial_text == completion.text and completion.text.startswith(streamed)
    assert f"after {len(completion.token_ids)} tokens" in error.message
