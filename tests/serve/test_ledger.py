"""The usage ledger on a real Redis: written with the final event through the real
publisher, once per job id under re-runs, cut runs charged as waste to their worker, bucket
edges, retention, and reading it back."""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest
import redis.asyncio as aioredis

from lorafleet.producer import LoRARequest
from lorafleet.producer.codec import GenerateJob, JobResult
from lorafleet.producer.keys import stream_key
from lorafleet.producer.ledger import (
    BASE_ADAPTER,
    DEDUPE_TTL_S,
    INDEX_KEY,
    NO_TENANT,
    PENDING_KEY,
    REJECTED_KEY,
    Folded,
    fold_pending,
    metered_key,
    parse_time,
    pending_record,
    read_usage,
    usage_key,
    wasted_runs_key,
)
from lorafleet.producer.redis_server import EmbeddedRedis
from lorafleet.producer.stream import FIELD, StreamEvent, decode_event, encode_event
from lorafleet.producer.types import CompletionOutput, RequestOutput
from lorafleet.producer.usage import Usage
from lorafleet.worker.serve.ledger import UNKNOWN_WORKER, Ledger, LedgerEntry
from lorafleet.worker.serve.publisher import StreamPublisher

SQL = LoRARequest("sql", 1, "/adapters/sql")
HOUR = 3600


@pytest.fixture(scope="module")
def redis_url():
    with EmbeddedRedis() as server:
        yield server.url


def _job(job_id: str, tenant: str | None = "acme", lora: LoRARequest | None = SQL) -> GenerateJob:
    return GenerateJob(request_id=job_id, prompt="p", lora_request=lora, tenant=tenant)


def _result(job_id: str, usage: Usage | None, attempt: int = 1) -> JobResult:
    output = RequestOutput(
        request_id=job_id,
        prompt="p",
        prompt_token_ids=[1] * (usage.prompt_tokens if usage else 1),
        outputs=[CompletionOutput(index=0, text="x", token_ids=[2], finish_reason="stop")],
        finished=True,
        usage=usage,
    )
    return JobResult(request_id=job_id, output=output, attempt=attempt)


def _usage(prompt: int, completion: int, engine: float = 0.5, load: float = 0.0) -> Usage:
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        engine_s=engine,
        adapter_load_s=load,
        queue_wait_s=0.1,
    )


class Worker:
    """One worker's publisher and ledger on a fresh database (flushed)."""

    def __init__(self, redis, name: str, bucket_s: int = HOUR, retention_s: int = 86_400):
        self.redis = redis
        self.name = name
        self.publisher = StreamPublisher(redis, worker=name)
        self.ledger = Ledger(redis, worker=name, bucket_s=bucket_s, retention_s=retention_s)

    async def finish(
        self,
        job: GenerateJob,
        attempt: int,
        usage: Usage | None,
        *,
        now: float | None = None,
    ) -> JobResult:
        """What ``jobs.generate`` does at the end of a run: prepare, stamp, publish."""
        prior = await self.ledger.prepare(job.request_id, attempt)
        result = _result(job.request_id, usage, attempt)
        if prior.recorded is not None:
            result.output.usage = prior.recorded
        entry = self.ledger.entry(job.request_id, attempt, job, usage, prior, now=now)
        await self.publisher.finish(job.request_id, attempt, result, writes=[entry])
        return result


class Fleet:
    """Workers on one flushed database; ``run`` gives a test body ``(redis, make_worker)``."""

    def __init__(self, url: str) -> None:
        self.url = url

    def run(self, body) -> None:
        async def main() -> None:
            redis = aioredis.Redis.from_url(self.url)
            await redis.flushdb()
            made: list[Worker] = []

            async def make(name: str, **kw) -> Worker:
                w = Worker(redis, name, **kw)
                await w.publisher.start()
                made.append(w)
                return w

            try:
                await body(redis, make)
            finally:
                for w in made:
                    await w.publisher.close()
                await redis.aclose()

        asyncio.run(main())


@pytest.fixture
def fleet(redis_url) -> Fleet:
    return Fleet(redis_url)


async def _final_events(redis, job_id: str) -> list[StreamEvent]:
    events = [decode_event(f[FIELD]) for _, f in await redis.xrange(stream_key(job_id))]
    return [e for e in events if e.final]


def test_a_job_is_counted_once_with_its_final_event(fleet):
    fleet.run(_test_a_job_is_counted_once_with_its_final_event)


async def _test_a_job_is_counted_once_with_its_final_event(redis, workers):
    w = await workers("w1")
    await w.finish(_job("j1"), 1, _usage(7, 3, engine=0.25, load=0.125))
    report = await read_usage(redis)
    (row,) = report.rows
    assert (row.tenant, row.adapter, row.requests) == ("acme", "sql", 1)
    assert (row.prompt_tokens, row.completion_tokens) == (7, 3)
    assert (row.engine_us, row.adapter_load_us) == (250_000, 125_000)
    assert report.waste == []
    (final,) = await _final_events(redis, "j1")
    assert final.result.output.usage == _usage(7, 3, engine=0.25, load=0.125)
    assert final.worker == "w1"  # the attempt's first event names its worker
    # The same write again (redis-py retrying a transaction whose reply was lost): no change.
    await w.finish(_job("j1"), 1, _usage(7, 3, engine=0.25, load=0.125))
    again = await read_usage(redis)
    assert again.rows == report.rows and again.waste == []


def test_a_rerun_is_not_counted_twice_and_its_work_is_waste(fleet):
    fleet.run(_test_a_rerun_is_not_counted_twice_and_its_work_is_waste)


async def _test_a_rerun_is_not_counted_twice_and_its_work_is_waste(redis, workers):
    first, second = await workers("w1"), await workers("w2")
    job = _job("j2")
    await first.finish(job, 1, _usage(7, 3))
    # The first run's worker died after publishing, before arq recorded the job: it runs
    # again. Its result carries the usage the ledger holds, not the re-run's own.
    again = await second.finish(job, 2, _usage(7, 5, engine=0.75))
    assert again.output.usage == _usage(7, 3)
    # A third delivery of the same attempt (a retried write) changes nothing either.
    await second.finish(job, 2, _usage(7, 5, engine=0.75))
    report = await read_usage(redis)
    (row,) = report.rows
    assert (row.requests, row.prompt_tokens, row.completion_tokens) == (1, 7, 3)
    (waste,) = report.waste
    assert (waste.worker, waste.attempts, waste.prompt_tokens, waste.completion_tokens) == (
        "w2",
        1,
        7,
        5,
    )
    assert waste.engine_us == 750_000


def test_runs_cut_short_are_charged_to_their_workers_once(fleet):
    fleet.run(_test_runs_cut_short_are_charged_to_their_workers_once)


async def _test_runs_cut_short_are_charged_to_their_workers_once(redis, workers):
    job = _job("j3", tenant=None, lora=None)
    key = stream_key("j3")
    # Run 1 on w1 streamed 4 tokens and was killed; run 2 streamed nothing and was killed.
    for seq, tokens in enumerate(([1, 2], [3, 4])):
        event = StreamEvent(attempt=1, seq=seq, token_ids=tokens, worker="w1" if seq == 0 else None)
        await redis.xadd(key, {FIELD: encode_event(event)})
    third = await workers("w3")
    await third.finish(job, 3, _usage(5, 6))
    report = await read_usage(redis)
    (row,) = report.rows
    assert (row.tenant, row.adapter, row.requests) == (NO_TENANT, BASE_ADAPTER, 1)
    waste = {w.worker: w for w in report.waste}
    assert set(waste) == {"w1", UNKNOWN_WORKER}
    assert (waste["w1"].attempts, waste["w1"].prompt_tokens, waste["w1"].completion_tokens) == (
        1,
        5,
        4,
    )
    assert (waste[UNKNOWN_WORKER].attempts, waste[UNKNOWN_WORKER].completion_tokens) == (1, 0)
    # Run 4 (run 3's publish was repeated) finds the same cut runs: not counted again.
    await third.finish(job, 4, _usage(5, 6))
    report = await read_usage(redis)
    assert sum(w.attempts for w in report.waste) == 3  # runs 1, 2 and the duplicate run 4
    assert report.rows[0].requests == 1


def test_an_error_after_cut_runs_records_only_the_waste(fleet):
    fleet.run(_test_an_error_after_cut_runs_records_only_the_waste)


async def _test_an_error_after_cut_runs_records_only_the_waste(redis, workers):
    w = await workers("w2")
    job = _job("j4")
    await redis.xadd(
        stream_key("j4"),
        {FIELD: encode_event(StreamEvent(attempt=1, seq=0, token_ids=[9], worker="w1"))},
    )
    prior = await w.ledger.prepare("j4", 2)
    entry = w.ledger.entry("j4", 2, job, None, prior)
    error = JobResult(request_id="j4", attempt=2)
    await w.publisher.finish("j4", 2, error, writes=[entry])
    report = await read_usage(redis)
    assert report.rows == []
    assert [(x.worker, x.attempts, x.completion_tokens) for x in report.waste] == [("w1", 1, 1)]


def test_bucket_boundaries(fleet):
    fleet.run(_test_bucket_boundaries)


async def _test_bucket_boundaries(redis, workers):
    w = await workers("w1", bucket_s=HOUR)
    t0 = 1_800_000_000  # a multiple of 3600
    await w.finish(_job("early"), 1, _usage(1, 1), now=t0 - 0.001)  # last instant of a bucket
    await w.finish(_job("edge"), 1, _usage(2, 2), now=t0)  # first instant of the next
    await w.finish(_job("late"), 1, _usage(4, 4), now=t0 + HOUR - 0.001)
    await fold_pending(redis)
    assert await redis.exists(usage_key(HOUR, t0 - HOUR), usage_key(HOUR, t0)) == 2
    now = t0 + 2 * HOUR

    async def tokens(since, until) -> int:
        report = await read_usage(redis, since=since, until=until, now=now)
        return report.total.prompt_tokens

    assert await tokens(None, None) == 7
    assert await tokens(t0, None) == 6  # the bucket starting at t0 holds "edge" and "late"
    assert await tokens(None, t0) == 1  # until is exclusive: only the bucket before t0
    assert await tokens(t0 - HOUR, t0 + 1) == 7
    assert await tokens(t0 + 1, None) == 0  # a bucket counts if it starts in the period


def test_retention_expires_buckets_and_prunes_the_index(fleet):
    fleet.run(_test_retention_expires_buckets_and_prunes_the_index)


async def _test_retention_expires_buckets_and_prunes_the_index(redis, workers):
    retention = 600
    w = await workers("w1", bucket_s=60, retention_s=retention)
    now = time.time()
    old, recent = now - 3 * retention, now - 30
    await w.finish(_job("old"), 1, _usage(1, 1), now=old)
    await w.finish(_job("recent"), 1, _usage(2, 2), now=recent)
    await fold_pending(redis)
    # The old bucket ended long before its retention: its EXPIREAT is in the past.
    assert not await redis.exists(usage_key(60, int(old // 60) * 60))
    ttl = await redis.ttl(usage_key(60, int(recent // 60) * 60))
    assert retention - 60 < ttl <= retention + 60
    members = [m.decode() for m in await redis.zrange(INDEX_KEY, 0, -1)]
    assert members == [f"60:{int(recent // 60) * 60}"]  # the old one pruned by the last write
    assert (await read_usage(redis)).total.prompt_tokens == 2
    # The dedupe record of a job outlives no re-run and no more than its TTL.
    assert 0 < await redis.ttl(metered_key("recent")) <= 2 * 86_400


def test_group_by_and_totals(fleet):
    fleet.run(_test_group_by_and_totals)


async def _test_group_by_and_totals(redis, workers):
    w = await workers("w1")
    other = LoRARequest("tab\there", 2, "/adapters/t")  # the separator inside a name
    await w.finish(_job("a", tenant="acme"), 1, _usage(1, 10))
    await w.finish(_job("b", tenant="acme", lora=other), 1, _usage(2, 20))
    await w.finish(_job("c", tenant="zeta"), 1, _usage(4, 40))
    by_tenant = await read_usage(redis, by="tenant")
    assert [(r.tenant, r.adapter, r.requests, r.completion_tokens) for r in by_tenant.rows] == [
        ("acme", None, 2, 30),
        ("zeta", None, 1, 40),
    ]
    by_adapter = await read_usage(redis, by="adapter")
    assert [(r.adapter, r.prompt_tokens) for r in by_adapter.rows] == [("sql", 5), ("tab\there", 2)]
    both = await read_usage(redis, by=("adapter", "tenant"))
    assert both.by == ("tenant", "adapter") and len(both.rows) == 3
    assert both.total.total_tokens == 77
    with pytest.raises(ValueError, match="by must be one of"):
        await read_usage(redis, by="worker")
    with pytest.raises(ValueError, match=r"until .* must be after since"):
        await read_usage(redis, since=10, until=5)


def test_concurrent_jobs_share_one_transaction(fleet):
    fleet.run(_test_concurrent_jobs_share_one_transaction)


async def _test_concurrent_jobs_share_one_transaction(redis, workers):
    w = await workers("w1")
    jobs = [_job(f"c{i}", tenant=f"t{i % 3}") for i in range(30)]
    await asyncio.gather(*(w.finish(j, 1, _usage(1, 2)) for j in jobs))
    report = await read_usage(redis, by="tenant")
    assert [r.requests for r in report.rows] == [10, 10, 10]
    assert report.total.completion_tokens == 60


def test_a_flush_records_its_first_runs_in_one_call_and_its_reruns_in_another(fleet):
    fleet.run(_test_a_flush_records_its_first_runs_in_one_call_and_its_reruns_in_another)


async def _test_a_flush_records_its_first_runs_in_one_call_and_its_reruns_in_another(
    redis, workers
):
    """The jobs of one publisher flush (``LedgerEntry.queue_all``) go in one script call
    for the first runs and one for the re-runs: new jobs in two buckets, a job already
    counted in that same call (a repeated publish), a re-run of a counted job (waste) and
    a re-run after a cut run; each as if alone."""
    w = await workers("w1")
    t0 = 1_800_000_000
    await w.finish(_job("seen"), 1, _usage(7, 3), now=t0)
    event = StreamEvent(attempt=1, seq=0, token_ids=[1, 2], worker="w0")
    await redis.xadd(stream_key("cut"), {FIELD: encode_event(event)})
    runs = [
        ("a", 1, _usage(1, 1), t0 - 1),  # the bucket before t0
        ("b", 1, _usage(2, 2), t0),
        ("seen", 2, _usage(7, 9), t0),  # a re-run: its work is waste
        ("cut", 2, _usage(5, 6), t0),  # run 1 cut short on w0: waste of w0
        ("b", 1, _usage(2, 2), t0),  # the same publish again: nothing more
    ]
    entries = []
    for job_id, attempt, usage, now in runs:
        prior = await w.ledger.prepare(job_id, attempt)
        entries.append(w.ledger.entry(job_id, attempt, _job(job_id), usage, prior, now=now))
    before = (await redis.info("commandstats"))["cmdstat_eval"]["calls"]
    async with redis.pipeline(transaction=True) as pipe:
        LedgerEntry.queue_all(pipe, entries)
        first, reruns = await pipe.execute()
    assert (await redis.info("commandstats"))["cmdstat_eval"]["calls"] - before == 2
    assert first == [1, 1, 0]  # a, b, b again
    assert reruns == [0, 1]  # seen (a re-run: waste), cut (counted)
    report = await read_usage(redis, now=t0 + HOUR)
    (row,) = report.rows
    assert (row.requests, row.prompt_tokens, row.completion_tokens) == (4, 15, 12)
    waste = {x.worker: x for x in report.waste}
    assert (waste["w1"].attempts, waste["w1"].completion_tokens) == (1, 9)
    assert (waste["w0"].attempts, waste["w0"].prompt_tokens, waste["w0"].completion_tokens) == (
        1,
        5,
        2,
    )
    assert await redis.exists(usage_key(HOUR, t0 - HOUR), usage_key(HOUR, t0)) == 2


def test_a_marker_of_the_older_form_still_dedupes(fleet):
    fleet.run(_test_a_marker_of_the_older_form_still_dedupes)


async def _test_a_marker_of_the_older_form_still_dedupes(redis, workers):
    """A job counted by a worker before the marker became a string (a hash: ``m`` and the
    ``a{n}`` marks of runs charged as waste) and run again after: its recorded usage is
    read back, it is not counted twice, and a run already charged is not charged again."""
    w = await workers("w2")
    usage = _usage(7, 3)
    recorded = b"1:" + msgspec.msgpack.encode(usage)
    await redis.hset(metered_key("old"), mapping={"m": recorded, "a2": 1})
    for event in (
        StreamEvent(attempt=1, seq=0, worker="w1", result=_result("old", usage)),  # counted
        StreamEvent(attempt=2, seq=0, token_ids=[1], worker="w9"),  # cut short, charged
    ):
        await redis.xadd(stream_key("old"), {FIELD: encode_event(event)})
    again = await w.finish(_job("old"), 3, _usage(7, 5))
    assert again.output.usage == usage
    report = await read_usage(redis)
    assert report.rows == []  # counted before, in a bucket this test did not write
    assert [(x.worker, x.attempts, x.completion_tokens) for x in report.waste] == [("w2", 1, 5)]


def test_a_marker_of_the_older_form_with_only_waste_counts_the_job(fleet):
    fleet.run(_test_a_marker_of_the_older_form_with_only_waste_counts_the_job)


async def _test_a_marker_of_the_older_form_with_only_waste_counts_the_job(redis, workers):
    """An older hash marker may hold only the mark of a run charged as waste (run 1 cut
    short, run 2 an error): run 3 is counted, into that hash, and run 1 is not charged
    again; a job beside it in the same flush is counted as usual."""
    w = await workers("w3")
    await redis.hset(metered_key("half"), mapping={"a1": 1})
    for event in (
        StreamEvent(attempt=1, seq=0, token_ids=[1, 2], worker="w1"),  # cut short, charged
        StreamEvent(attempt=2, seq=0, worker="w2", result=JobResult(request_id="half")),
    ):
        await redis.xadd(stream_key("half"), {FIELD: encode_event(event)})
    entries = []
    for job_id, attempt in (("half", 3), ("fresh", 1)):
        prior = await w.ledger.prepare(job_id, attempt)
        entries.append(w.ledger.entry(job_id, attempt, _job(job_id), _usage(4, 2), prior))
    async with redis.pipeline(transaction=True) as pipe:
        LedgerEntry.queue_all(pipe, entries)
        first, reruns = await pipe.execute()
    assert first == [1] and reruns == [1]  # fresh, half
    assert (await redis.hget(metered_key("half"), "m")).startswith(b"3:")
    report = await read_usage(redis)
    assert report.rows[0].requests == 2 and report.waste == []


def test_every_run_after_the_counted_one_restarts_the_dedupe_window(fleet):
    fleet.run(_test_every_run_after_the_counted_one_restarts_the_dedupe_window)


async def _test_every_run_after_the_counted_one_restarts_the_dedupe_window(redis, workers):
    w = await workers("w1")
    await w.finish(_job("long"), 1, _usage(1, 1))
    await redis.expire(metered_key("long"), 5)  # most of the window gone
    await w.finish(_job("long"), 2, _usage(1, 1))  # a re-run: waste, and a fresh window
    for key in (metered_key("long"), wasted_runs_key("long")):
        assert await redis.ttl(key) > DEDUPE_TTL_S - 60, key
    assert (await read_usage(redis)).rows[0].requests == 1


def test_counts_wait_in_the_pending_list_and_fold_exactly_once(fleet):
    fleet.run(_test_counts_wait_in_the_pending_list_and_fold_exactly_once)


async def _test_counts_wait_in_the_pending_list_and_fold_exactly_once(redis, workers):
    """A result delivered has its counts recorded (pending) in the same transaction; folds
    running at the same time, in small batches, add each record once; a record that does
    not decode, has the wrong shape or an unknown kind is set aside whole, neither counted
    nor lost, and does not stop the fold."""
    w = await workers("w1")
    t0 = 1_800_000_000
    bad = [
        b"\xc1 not msgpack",
        msgspec.msgpack.encode(["other", HOUR, t0, 60, "x\t", 1]),  # a kind unknown here
        msgspec.msgpack.encode(["usage", "3600", t0, 60, "x\t", 1, 2, 3, 4, 5]),
        msgspec.msgpack.encode(["usage", HOUR, t0, 60, "x\t", 1, 2]),  # counts missing
    ]
    await redis.rpush(PENDING_KEY, *bad)
    await asyncio.gather(*(w.finish(_job(f"p{i}"), 1, _usage(i, 1), now=t0) for i in range(10)))
    assert not await redis.exists(usage_key(HOUR, t0))
    assert await redis.llen(PENDING_KEY) == 14
    folds = await asyncio.gather(*(fold_pending(redis, batch=3) for _ in range(4)))
    assert sum(f.records for f in folds) == 14 and sum(f.rejected for f in folds) == 4
    assert await redis.llen(PENDING_KEY) == 0
    assert sorted(await redis.lrange(REJECTED_KEY, 0, -1)) == sorted(bad)
    (row,) = (await read_usage(redis, now=t0 + HOUR)).rows
    assert (row.requests, row.prompt_tokens, row.completion_tokens) == (10, 45, 10)
    assert await fold_pending(redis) == Folded(0, 0)
    with pytest.raises(ValueError, match="batch must be 1 to"):
        await fold_pending(redis, batch=0)


def test_pending_records_are_checked_when_made():
    assert msgspec.msgpack.decode(pending_record("waste", 60, 120, 600, "w\t", (1, 2, 3, 4))) == [
        "waste",
        60,
        120,
        600,
        "w\t",
        1,
        2,
        3,
        4,
    ]
    with pytest.raises(ValueError, match="needs counts of"):
        pending_record("usage", 60, 120, 600, "t\ta\t", (1, 2))
    with pytest.raises(ValueError, match="'bill' record"):
        pending_record("bill", 60, 120, 600, "t\ta\t", (1,))


def test_a_worker_folds_what_it_records_without_a_reader(fleet):
    fleet.run(_test_a_worker_folds_what_it_records_without_a_reader)


async def _test_a_worker_folds_what_it_records_without_a_reader(redis, workers):
    w = await workers("w1")
    w.ledger.folder.start()
    try:
        t0 = time.time()
        await w.finish(_job("f1"), 1, _usage(3, 4), now=t0)
        key = usage_key(HOUR, int(t0 // HOUR) * HOUR)
        deadline = time.monotonic() + 10
        while not await redis.exists(key) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert await redis.hget(key, "acme\tsql\tprompt_tokens") == b"3"
        assert await redis.llen(PENDING_KEY) == 0
    finally:
        await w.ledger.folder.close()


def test_parse_time():
    assert parse_time("2026-12-06T09:00") == parse_time("2026-12-06T09:00+00:00")
    assert parse_time("1800000000") == 1_800_000_000.0
    assert parse_time("2h", now=10_000) == 10_000 - 7200
    assert parse_time("1.5d", now=200_000) == 200_000 - 129_600
    with pytest.raises(ValueError, match="--since 'yesterday' is not a time"):
        parse_time("yesterday", name="--since")
