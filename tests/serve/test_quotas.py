"""Quota rules on a real Redis: admission under jobs in flight and tokens per minute, the
refusal's limit and retry time, release with the final event, setting and showing."""

from __future__ import annotations

import asyncio
import pickle
import time

import pytest
import redis.asyncio as aioredis

from lorafleet.producer.errors import QuotaExceededError, error_from_info
from lorafleet.producer.quotas import (
    admit,
    get_quotas,
    in_flight,
    in_flight_key,
    queue_release,
    set_quota,
)
from lorafleet.producer.redis_server import EmbeddedRedis


@pytest.fixture(scope="module")
def redis_url():
    with EmbeddedRedis() as server:
        yield server.url


def _run(url: str, body) -> None:
    async def main():
        r = aioredis.Redis.from_url(url)
        await r.flushdb()
        try:
            await body(r)
        finally:
            await r.aclose()

    asyncio.run(main())


def test_jobs_in_flight_are_capped_and_released(redis_url):
    async def body(r):
        await set_quota(r, "acme", max_in_flight=2)
        assert await admit(r, "acme", "j1") is None
        assert await admit(r, "acme", "j1") is None  # the same job again: same place
        assert await admit(r, "acme", "j2") is None
        refusal = await admit(r, "acme", "j3")
        assert isinstance(refusal, QuotaExceededError)
        assert (refusal.code, refusal.limit, refusal.value) == (
            "quota_exceeded",
            "max_in_flight",
            2,
        )
        assert refusal.retry_after > 0 and "2 jobs in flight" in refusal.message
        assert await admit(r, "other", "j3") is None  # another tenant: no quota
        async with r.pipeline(transaction=True) as pipe:
            queue_release(pipe, "acme", ["j1"], tokens=0)
            await pipe.execute()
        assert await in_flight(r, "acme") == 1
        assert await admit(r, "acme", "j3") is None
        # Concurrent submits cannot overshoot: the check and the admission are one script.
        await set_quota(r, "busy", max_in_flight=5)
        refusals = await asyncio.gather(*(admit(r, "busy", f"b{i}") for i in range(40)))
        assert sum(x is None for x in refusals) == 5

    _run(redis_url, body)


def test_the_releases_of_one_flush_are_queued_per_tenant(redis_url):
    """``Release.queue_all``: the jobs of several tenants finishing in one publisher flush
    leave their tenants' jobs in flight and add their tokens to each tenant's minute."""
    from lorafleet.producer.quotas import tpm_key
    from lorafleet.worker.serve.quotas import Release

    async def body(r):
        for tenant in ("acme", "zeta"):
            await set_quota(r, tenant, max_in_flight=5, tokens_per_minute=1000)
        for tenant, job in (("acme", "a1"), ("acme", "a2"), ("zeta", "z1")):
            assert await admit(r, tenant, job) is None
        releases = [Release("acme", "a1", 10), Release("zeta", "z1", 7), Release("acme", "a2", 5)]
        minute = int(time.time() // 60)
        async with r.pipeline(transaction=True) as pipe:
            Release.queue_all(pipe, releases)
            await pipe.execute()
        assert (await in_flight(r, "acme"), await in_flight(r, "zeta")) == (0, 0)

        async def used(tenant: str) -> int:  # the minute may have turned meanwhile
            found = [await r.get(tpm_key(tenant, m)) for m in (minute, minute + 1)]
            return sum(int(x or 0) for x in found)

        assert (await used("acme"), await used("zeta")) == (15, 7)
        with pytest.raises(TypeError, match="not one string"):
            queue_release(r.pipeline(), "acme", "a1", tokens=1)

    _run(redis_url, body)


def test_a_lapsed_place_frees_up(redis_url):
    async def body(r):
        await set_quota(r, "acme", max_in_flight=1)
        assert await admit(r, "acme", "gone", lapse_after=0.05) is None  # its worker died
        assert await admit(r, "acme", "next") is not None
        await asyncio.sleep(0.1)
        assert await admit(r, "acme", "next") is None

    _run(redis_url, body)


def test_tokens_per_minute_with_retry_time(redis_url):
    async def body(r):
        await set_quota(r, "acme", tokens_per_minute=100)
        now = 1_800_000_030.0  # 30 s into a minute
        assert await admit(r, "acme", "j1", now=now) is None
        async with r.pipeline(transaction=True) as pipe:
            queue_release(pipe, "acme", ["j1"], tokens=99, now=now)
            await pipe.execute()
        assert await admit(r, "acme", "j2", now=now) is None  # 99 < 100: one more may go
        async with r.pipeline(transaction=True) as pipe:
            queue_release(pipe, "acme", ["j2"], tokens=50, now=now)
            await pipe.execute()
        refusal = await admit(r, "acme", "j3", now=now + 10)
        assert (refusal.limit, refusal.value) == ("tokens_per_minute", 100)
        assert refusal.retry_after == pytest.approx(20.0)
        assert "used 149 tokens this minute" in refusal.message
        assert await admit(r, "acme", "j3", now=now + 30) is None  # the next minute
        # A job admitted before the budget ran out loses its place when refused at take.
        await set_quota(r, "late", tokens_per_minute=1)
        assert await admit(r, "late", "q", now=now) is None
        async with r.pipeline(transaction=True) as pipe:
            queue_release(pipe, "late", ["other"], tokens=5, now=now)
            await pipe.execute()
        assert (await admit(r, "late", "q", now=now)).limit == "tokens_per_minute"
        assert await r.zscore(in_flight_key("late"), "q") is None

    _run(redis_url, body)


def test_set_show_clear_and_bad_values(redis_url):
    async def body(r):
        q = await set_quota(r, "acme", max_in_flight=3)
        assert (q.max_in_flight, q.tokens_per_minute) == (3, None)
        q = await set_quota(r, "acme", tokens_per_minute=1000)
        assert (q.max_in_flight, q.tokens_per_minute) == (3, 1000)
        await set_quota(r, "beta", max_in_flight=0)
        assert [x.tenant for x in await get_quotas(r)] == ["acme", "beta"]
        q = await set_quota(r, "acme", clear=("max_in_flight", "tokens_per_minute"))
        assert (q.max_in_flight, q.tokens_per_minute) == (None, None)
        assert [x.tenant for x in await get_quotas(r)] == ["beta"]
        with pytest.raises(ValueError, match="max_in_flight must be an integer >= 0, got -1"):
            await set_quota(r, "acme", max_in_flight=-1)
        with pytest.raises(ValueError, match="tenant 'a b' is not valid"):
            await set_quota(r, "a b", max_in_flight=1)
        with pytest.raises(ValueError, match="cannot clear 'speed'"):
            await set_quota(r, "acme", clear=("speed",))

    _run(redis_url, body)


def test_a_refusal_travels_with_its_details():
    refusal = QuotaExceededError(
        "no", details={"limit": "tokens_per_minute", "value": 5, "retry_after": 12.5}
    )
    back = error_from_info(refusal.to_info())
    assert isinstance(back, QuotaExceededError)
    assert (back.limit, back.value, back.retry_after) == ("tokens_per_minute", 5, 12.5)
    again = pickle.loads(pickle.dumps(back))
    assert again.retry_after == 12.5
