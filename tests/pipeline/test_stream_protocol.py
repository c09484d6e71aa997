"""The per-job stream protocol against a real Redis, without a worker: the worker-side
publisher writes, the client reads. Covers coalescing, re-runs, trimming and duplicates."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis

from lorafleet.producer import Client, CompletionOutput, RequestOutput
from lorafleet.producer.codec import JobResult
from lorafleet.producer.errors import (
    AdapterNotFoundError,
    ErrorInfo,
    JobNotFoundError,
    StreamRestartedError,
)
from lorafleet.producer.keys import arq_job_key, stream_key
from lorafleet.producer.stream import (
    StreamEvent,
    add_event,
    add_reply,
    decode_event,
    encode_event,
)
from lorafleet.worker.serve.publisher import StreamPublisher


def _result(job_id: str, text: str) -> JobResult:
    out = RequestOutput(
        request_id=job_id,
        prompt="p",
        prompt_token_ids=[1],
        outputs=[CompletionOutput(index=0, text=text, token_ids=[], finish_reason="length")],
        finished=True,
    )
    return JobResult(request_id=job_id, output=out)


async def _with_job(url: str, body):
    """Run ``body(redis, client, job_id)`` for a fresh job id that looks queued to arq."""
    job_id = uuid.uuid4().hex
    r = aioredis.Redis.from_url(url)
    await r.set(arq_job_key(job_id), b"placeholder", ex=60)  # so the client's sweep waits
    try:
        async with Client(url) as client:
            return await body(r, client, job_id)
    finally:
        await r.aclose()


async def _collect(client: Client, job_id: str) -> list[str]:
    handle = await client.job(job_id)
    return [d async for d in handle.stream()]


def test_event_round_trip():
    ev = StreamEvent(attempt=2, seq=5, text="hé", token_ids=[1, 2], result=_result("j", "hé"))
    back = decode_event(encode_event(ev))
    assert back == ev and back.final


def test_publisher_coalesces_and_finishes(redis_server):
    async def body(r, client, job_id):
        pub = StreamPublisher(r)
        await pub.start()
        reader = asyncio.create_task(_collect(client, job_id))
        for piece in ("a", "b", "c"):  # no await between: one pending event
            pub.delta(job_id, 1, piece, [ord(piece)])
        await asyncio.sleep(0.05)
        pub.delta(job_id, 1, "d", [100])
        await pub.finish(job_id, 1, _result(job_id, "abcd"))
        deltas = await asyncio.wait_for(reader, 5)
        entries = await r.xrange(stream_key(job_id))
        await pub.close()
        return deltas, [decode_event(f[b"e"]) for _, f in entries]

    deltas, events = asyncio.run(_with_job(redis_server.url, body))
    assert "".join(deltas) == "abcd"
    assert [e.text for e in events] == ["abc", "d"]
    assert [e.seq for e in events] == [0, 1] and events[-1].final
    assert events[0].token_ids == [97, 98, 99]


def _write(r, job_id: str, events: list[StreamEvent]):
    async def go():
        async with r.pipeline(transaction=False) as pipe:
            for ev in events:
                add_event(pipe, job_id, ev, maxlen=1000, ttl_s=60)
            await pipe.execute()

    return go()


def test_rerun_restarts_without_repeating_text(redis_server):
    async def body(r, client, job_id):
        await _write(
            r,
            job_id,
            [
                StreamEvent(attempt=1, seq=0, text="he"),
                StreamEvent(attempt=1, seq=1, text="ll"),  # worker dies here
                StreamEvent(attempt=2, seq=0, text="h"),
                StreamEvent(attempt=1, seq=2, text="XX"),  # a late write of the dead run
                StreamEvent(attempt=2, seq=1, text="ello"),
                StreamEvent(attempt=2, seq=1, text="ello"),  # a retried XADD
                StreamEvent(attempt=2, seq=2, text="!", result=_result(job_id, "hello!")),
            ],
        )
        return await _collect(client, job_id)

    deltas = asyncio.run(_with_job(redis_server.url, body))
    assert deltas == ["he", "ll", "o", "!"]


def test_rerun_with_other_text_raises(redis_server):
    async def body(r, client, job_id):
        await _write(
            r,
            job_id,
            [
                StreamEvent(attempt=1, seq=0, text="abc"),
                StreamEvent(attempt=2, seq=0, text="xyz", result=_result(job_id, "xyz")),
            ],
        )
        handle = await client.job(job_id)
        seen = []
        with pytest.raises(StreamRestartedError):
            async for d in handle.stream():
                seen.append(d)
        return seen, await handle.result()

    seen, out = asyncio.run(_with_job(redis_server.url, body))
    assert seen == ["abc"] and out.outputs[0].text == "xyz"


def test_trimmed_entries_are_filled_from_the_final_text(redis_server):
    async def body(r, client, job_id):
        await _write(
            r,
            job_id,
            [
                StreamEvent(attempt=1, seq=0, text="ab"),
                # seq 1 ("cd") was trimmed before the reader got to it
                StreamEvent(attempt=1, seq=2, text="ef"),
                StreamEvent(attempt=1, seq=3, text="", result=_result(job_id, "abcdef")),
            ],
        )
        return await _collect(client, job_id)

    assert asyncio.run(_with_job(redis_server.url, body)) == ["ab", "cdef"]


def test_error_result_raises_typed_error_after_text(redis_server):
    err = JobResult(request_id="x", error=ErrorInfo("adapter_not_found", "no adapter 'nope'"))

    async def body(r, client, job_id):
        await _write(r, job_id, [StreamEvent(attempt=1, seq=0, result=err)])
        handle = await client.job(job_id)
        with pytest.raises(AdapterNotFoundError, match="nope"):
            await handle.result(timeout=5)
        with pytest.raises(AdapterNotFoundError):
            [d async for d in handle.stream()]

    asyncio.run(_with_job(redis_server.url, body))


def test_unknown_job_is_reported(redis_server):
    async def body():
        async with Client(redis_server.url) as client:
            handle = await client.job("no-such-job")
            with pytest.raises(JobNotFoundError):
                await handle.result(timeout=5)

    asyncio.run(body())


def test_one_reader_serves_many_jobs(redis_server):
    """Many jobs waited on at once share the client's single blocking read."""

    async def body(r, client, _):
        ids = [uuid.uuid4().hex for _ in range(50)]
        for job_id in ids:
            await r.set(arq_job_key(job_id), b"placeholder", ex=60)
        await client.connect()
        before = (await r.info("clients"))["connected_clients"]
        handles = [await client.job(j) for j in ids]
        waits = [asyncio.create_task(h.result(timeout=10)) for h in handles]
        await asyncio.sleep(0.1)
        during = (await r.info("clients"))["connected_clients"]
        pub = StreamPublisher(r)
        await pub.start()
        await asyncio.gather(*(pub.finish(j, 1, _result(j, j[:3])) for j in ids))
        outs = await asyncio.gather(*waits)
        await pub.close()
        return ids, outs, during - before

    ids, outs, new_connections = asyncio.run(_with_job(redis_server.url, body))
    assert [o.outputs[0].text for o in outs] == [j[:3] for j in ids]
    assert new_connections <= 2  # the blocking reader (and one pool connection)


def test_results_of_own_jobs_arrive_through_the_inbox(redis_server):
    """A job submitted by this client replies to its inbox: no read of the job's stream."""

    async def body(r, client, job_id):
        watcher = client._watcher
        watch = await watcher.watch(job_id, via_inbox=True)
        async with r.pipeline(transaction=False) as pipe:  # only the inbox copy exists
            add_reply(pipe, watcher.inbox, job_id, _final(job_id, "via inbox"), ttl_s=60)
            await pipe.execute()
        await asyncio.wait_for(watch.wait_done(), 5)
        return watch.result.output.outputs[0].text, await r.exists(stream_key(job_id))

    text, has_stream = asyncio.run(_with_job(redis_server.url, body))
    assert text == "via inbox" and not has_stream


def test_replies_only_go_to_inboxes(redis_server):
    async def body(r, client, job_id):
        pub = StreamPublisher(r)
        await pub.start()
        await pub.finish(job_id, 1, _result(job_id, "x"), reply_to="victim:key")
        await pub.close()
        return await r.exists("victim:key"), await r.exists(stream_key(job_id))

    assert asyncio.run(_with_job(redis_server.url, body)) == (0, 1)


def _final(job_id: str, text: str) -> StreamEvent:
    return StreamEvent(attempt=1, seq=0, result=_result(job_id, text))
