"""SIGTERM drains a worker: it takes no more jobs, finishes the ones generating within the
grace period, hands back untouched the ones it had not started, and re-queues the rest
when the grace period runs out."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
import redis
from arq.constants import retry_key_prefix
from reliability_support import registry_entry, stream_events, streaming, wait_until

from lorafleet.producer import Client, SamplingParams
from lorafleet.producer.keys import stream_key
from lorafleet.producer.stream import FIELD, StreamEvent, decode_event

pytestmark = pytest.mark.slow

LONG = SamplingParams(max_tokens=480, temperature=0.0, ignore_eos=True)
SHORT = SamplingParams(max_tokens=4, temperature=0.0)


def _claimed(url: str, job_id: str) -> bool:
    with redis.Redis.from_url(url) as r:
        return bool(r.exists(f"arq:in-progress:{job_id}"))


def _tries(url: str, job_id: str) -> int:
    with redis.Redis.from_url(url) as r:
        return int(r.get(retry_key_prefix + job_id) or 0)


@pytest.fixture(scope="module")
def rescuer(rel_redis, make_config, start_worker):
    """A second worker on the queue of this module's tests. Each test freezes it (SIGSTOP)
    before the draining worker takes jobs and thaws it (SIGCONT) when it should run them."""
    return start_worker(make_config(rel_redis.url))


@pytest.fixture
def draining_worker(rel_redis, make_config, start_worker, rescuer):
    """``draining_worker(**config)`` freezes the rescuer (the test thaws it when it should
    run jobs) and starts the worker to drain on its queue, with ``config``. Returns (Redis
    URL, queue, draining worker)."""

    def start(**config):
        url, queue = rel_redis.url, rescuer.config.queue
        rescuer.signal(signal.SIGSTOP)
        return url, queue, start_worker(make_config(url, queue=queue, **config))

    return start


async def _submit_followed(client: Client, prompt: str):
    """Submits ``prompt`` (``LONG``); returns its handle and a task reading its whole stream."""
    handle = await client.submit(prompt, LONG)
    return handle, asyncio.create_task(_text(handle))


def test_sigterm_finishes_running_jobs_and_hands_back_the_rest(rescuer, draining_worker):
    # Two sequences at a time: two jobs generate, two more wait inside the engine, and the
    # remaining four stay in the queue (the worker holds at most four).
    url, queue, draining = draining_worker(max_num_seqs=2, max_jobs=4, drain_timeout=20)

    async def scenario():
        async with Client(url, queue_name=queue) as client:
            running = [await client.submit(f"running {i}", LONG) for i in range(2)]
            await asyncio.to_thread(streaming, url, [h.job_id for h in running], 20)
            # Frozen while the other jobs are queued: the long jobs keep nearly all their
            # work for after the thaw, which leaves ample time to signal mid-generation.
            draining.signal(signal.SIGSTOP)
            short = [await client.submit(f"short {i}", SHORT) for i in range(6)]
            draining.signal(signal.SIGCONT)
            # arq orders jobs enqueued in the same millisecond by id: which two it takes
            # is known only once it has.
            await asyncio.to_thread(
                wait_until,
                lambda: sum(_claimed(url, h.job_id) for h in short) == 2,
                20,
                "the worker to hold two more jobs",
            )
            waiting = [h for h in short if _claimed(url, h.job_id)]
            draining.signal(signal.SIGTERM)
            signalled = time.monotonic()
            # Handed back at once, with the try arq counted for them given back.
            await asyncio.to_thread(
                wait_until,
                lambda: not any(_claimed(url, h.job_id) for h in waiting),
                5,
                "the unstarted jobs to be handed back",
            )
            assert all(_tries(url, h.job_id) == 0 for h in waiting)
            entry = registry_entry(url, draining.config.name)
            assert entry is not None and entry["state"] == "draining"
            finished = await asyncio.wait_for(asyncio.gather(*(h.result() for h in running)), 20)
            exit_code = await asyncio.to_thread(draining.stop, 20)
            drained_in = time.monotonic() - signalled
            rescuer.signal(signal.SIGCONT)
            later = await asyncio.wait_for(asyncio.gather(*(h.result() for h in short)), 30)
            return running, finished, short, later, exit_code, drained_in

    running, finished, rest, later, exit_code, drained_in = asyncio.run(scenario())

    assert exit_code == 0 and drained_in < 20
    for handle, output in zip(running, finished, strict=True):
        assert len(output.outputs[0].token_ids) == LONG.max_tokens
        events = stream_events(url, handle.job_id)
        assert [(e.attempt, e.result.worker) for e in events if e.final] == [
            (1, draining.config.name)
        ]
    for handle, output in zip(rest, later, strict=True):
        assert output.finished
        # Untouched: the rescuer ran them as their first attempt, the drained worker never
        # wrote a single event for them.
        events = stream_events(url, handle.job_id)
        assert {e.attempt for e in events} == {1}
        assert {e.result.worker for e in events if e.final} == {rescuer.config.name}
    assert registry_entry(url, draining.config.name) is None


def test_jobs_still_running_when_the_grace_period_ends_are_re_run(rescuer, draining_worker):
    url, queue, draining = draining_worker(drain_timeout=0)

    async def scenario():
        async with Client(url, queue_name=queue) as client:
            handle, follower = await _submit_followed(client, "cut short")
            await asyncio.to_thread(
                wait_until, lambda: stream_events(url, handle.job_id), 20, "the job to generate"
            )
            draining.signal(signal.SIGTERM)
            exit_code = await asyncio.to_thread(draining.stop, 20)
            assert not handle.done
            rescuer.signal(signal.SIGCONT)
            output = await asyncio.wait_for(handle.result(), 30)
            return handle.job_id, output, await asyncio.wait_for(follower, 10), exit_code

    job_id, output, text, exit_code = asyncio.run(scenario())

    assert exit_code == 0
    assert text == output.outputs[0].text and len(output.outputs[0].token_ids) == LONG.max_tokens
    events = stream_events(url, job_id)
    runs = [(e.attempt, e.result.worker if e.final else None) for e in events if e.final]
    assert {e.attempt for e in events} == {1, 2}, f"attempts seen; final events: {runs}"
    assert runs == [(2, rescuer.config.name)]


async def _text(handle) -> str:
    return "".join([delta async for delta in handle.stream()])


def _entries(url: str, job_id: str) -> list[tuple[float, StreamEvent]]:
    """(Redis time the entry was added, in seconds; event) for each event of the stream."""
    with redis.Redis.from_url(url) as r:
        return [
            (int(entry_id.split(b"-")[0]) / 1000, decode_event(fields[FIELD]))
            for entry_id, fields in r.xrange(stream_key(job_id))
        ]


def test_a_drained_long_job_continues_where_it_stopped(rescuer, draining_worker):
    """The grace period ends mid-generation: the re-run continues after the tokens already
    streamed instead of starting over; the client's stream pauses, never restarts."""
    url, queue, draining = draining_worker(drain_timeout=0.3)

    async def scenario():
        async with Client(url, queue_name=queue) as client:
            handle, follower = await _submit_followed(client, "keep going")
            await asyncio.to_thread(
                wait_until,
                lambda: len(stream_events(url, handle.job_id)) >= 3,
                20,
                "the job to stream a few tokens",
            )
            rescuer.signal(signal.SIGCONT)  # ready to take the job over once it is back
            draining.signal(signal.SIGTERM)
            exit_code = await asyncio.to_thread(draining.stop, 20)
            output = await asyncio.wait_for(handle.result(), 60)
            text = await asyncio.wait_for(follower, 10)
            (uninterrupted,) = await client.generate("keep going", LONG)
            return handle.job_id, output, text, exit_code, uninterrupted

    job_id, output, text, exit_code, uninterrupted = asyncio.run(scenario())

    assert exit_code == 0
    entries = _entries(url, job_id)
    first = [(t, e) for t, e in entries if e.attempt == 1]
    second = [(t, e) for t, e in entries if e.attempt == 2]
    assert first and second and not any(e.final for _, e in first), "the run was not cut"
    streamed = [tok for _, e in first for tok in e.token_ids]
    continued_from = second[0][1].token_ids
    assert len(streamed) >= 2 and continued_from == streamed[:-1]
    made_again = sum(len(e.token_ids) for _, e in second) - len(continued_from)
    assert made_again == LONG.max_tokens - len(continued_from)  # no token made twice but one
    gap = second[0][0] - first[-1][0]
    assert gap < 5.0, f"the stream paused {gap:.2f}s"
    assert output.outputs[0].token_ids == uninterrupted.outputs[0].token_ids
    assert text == output.outputs[0].text  # the client's stream continued, never restarted
    assert second[-1][1].final and second[-1][1].result.worker == rescuer.config.name
