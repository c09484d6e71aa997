"""Quotas through the queue: refusals at submit and at take cost nothing, and a noisy
tenant is held to its quota while another tenant's requests complete."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid

import pytest
import redis
import redis.asyncio as aioredis

from lorafleet.producer import Client, SamplingParams
from lorafleet.producer.codec import GenerateJob, encode
from lorafleet.producer.errors import QuotaExceededError
from lorafleet.producer.keys import GENERATE_FUNCTION, arq_job_key
from lorafleet.producer.quotas import REFRESH_S, in_flight

pytestmark = pytest.mark.slow

PARAMS = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def _tenant(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:8]}"


def _in_flight(client, tenant: str) -> int:
    """The tenant's jobs in flight as the quota counts them."""

    async def count() -> int:
        r = aioredis.Redis.from_url(client._client.url)
        try:
            return await in_flight(r, tenant)
        finally:
            await r.aclose()

    return asyncio.run(count())


def _rows(client, tenant: str):
    return [r for r in client.usage(by="tenant").rows if r.tenant == tenant]


def test_refused_at_submit_is_not_enqueued_and_costs_nothing(client, worker):
    tenant = _tenant("paused")
    client.set_quota(tenant, max_in_flight=0)
    with pytest.raises(QuotaExceededError) as info:
        client.submit("hello", PARAMS, tenant=tenant, job_id=f"{tenant}-job")
    assert (info.value.limit, info.value.value) == ("max_in_flight", 0)
    assert info.value.retry_after > 0
    r = redis.Redis.from_url(worker.config.redis_url)
    assert not r.exists(arq_job_key(f"{tenant}-job"))
    assert _rows(client, tenant) == []


def test_refused_at_take_costs_nothing(client, worker):
    """A job that skipped the submit check (an older producer, or a quota lowered while it
    waited) is refused by the worker, without running."""
    tenant = _tenant("late")
    client.set_quota(tenant, max_in_flight=0)
    time.sleep(REFRESH_S + 0.5)  # workers learn of a new quota within REFRESH_S
    job = GenerateJob(
        request_id=f"{tenant}-raw", prompt="hello", sampling_params=PARAMS, tenant=tenant
    )

    async def enqueue_around_the_check() -> None:
        async with Client(worker.config.redis_url, queue_name=worker.config.queue) as c:
            arq, _ = await c._connected()
            await arq.enqueue_job(
                GENERATE_FUNCTION, encode(job), _job_id=job.request_id, _queue_name=c.queue_name
            )

    asyncio.run(enqueue_around_the_check())
    with pytest.raises(QuotaExceededError, match="max_in_flight 0") as info:
        client.job(job.request_id).result(timeout=60)
    assert info.value.limit == "max_in_flight"
    assert _rows(client, tenant) == []


def test_a_noisy_tenant_is_held_to_its_quota_while_another_completes(client, adapters):
    noisy, quiet = _tenant("noisy"), _tenant("quiet")
    client.set_quota(noisy, max_in_flight=2)
    long = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    accepted, refused = [], []
    for i in range(12):
        try:
            accepted.append(client.submit(f"noisy {i}", long, adapters[1], tenant=noisy))
        except QuotaExceededError as e:
            refused.append(e)
    assert len(accepted) == 2 and len(refused) == 10
    assert {e.limit for e in refused} == {"max_in_flight"}
    started = time.monotonic()
    quiet_outs = client.generate([f"quiet {i}" for i in range(4)], PARAMS, tenant=quiet)
    assert [o.usage.completion_tokens for o in quiet_outs] == [6] * 4
    assert time.monotonic() - started < 60
    for handle in accepted:
        handle.result(timeout=120)

    assert _in_flight(client, noisy) == 0  # the finished jobs gave their places back
    (row,) = _rows(client, noisy)
    assert row.requests == 2  # refused jobs cost nothing
    # Tokens per minute: the noisy jobs' tokens spent this minute's budget; the next job is
    # refused until the minute ends (if the minute just turned, one job spends it again).
    client.set_quota(noisy, tokens_per_minute=1)
    for _ in range(2):
        try:
            client.submit("one more", PARAMS, tenant=noisy).result(timeout=60)
        except QuotaExceededError as e:
            assert (e.limit, e.value) == ("tokens_per_minute", 1)
            assert 0 < e.retry_after <= 60
            break
    else:
        pytest.fail("tokens_per_minute refused nothing")


def test_quota_command_sets_and_shows(worker):
    url = worker.config.redis_url
    tenant = _tenant("cli")
    cli = [sys.executable, "-m", "lorafleet.worker.cli", "quota"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cli, *args, "--redis-url", url], capture_output=True, text=True)

    proc = run("set", tenant, "--max-in-flight", "3", "--tokens-per-minute", "500")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [tenant, "max_in_flight=3", "tokens_per_minute=500"]
    proc = run("show", tenant)
    assert proc.stdout.split() == [tenant, "max_in_flight=3", "tokens_per_minute=500"]
    proc = run("set", tenant, "--clear", "tokens_per_minute")
    assert proc.stdout.split() == [tenant, "max_in_flight=3", "tokens_per_minute=none"]
    bad = run("set", tenant, "--max-in-flight", "-2")
    assert bad.returncode == 2 and "--max-in-flight must be >= 0, got -2" in bad.stderr
    bad = run("set", "two words", "--max-in-flight", "1")
    assert bad.returncode == 2 and "tenant 'two words' is not valid" in bad.stderr


def test_resubmitting_a_finished_job_holds_no_place(client):
    tenant = _tenant("again")
    client.set_quota(tenant, max_in_flight=1)
    job_id = f"{tenant}-once"
    first = client.submit("hello", PARAMS, tenant=tenant, job_id=job_id).result(timeout=60)
    # The same id again (a producer's retry): the same result, and no place kept.
    again = client.submit("hello", PARAMS, tenant=tenant, job_id=job_id).result(timeout=60)
    assert again.outputs[0].token_ids == first.outputs[0].token_ids

    assert _in_flight(client, tenant) == 0
    client.submit("next", PARAMS, tenant=tenant).result(timeout=60)  # the place is free
    (row,) = _rows(client, tenant)
    assert row.requests == 2
