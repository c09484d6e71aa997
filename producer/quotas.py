"""Per-tenant quotas, kept in Redis: jobs in flight and tokens per minute.

A tenant's quota is the hash ``lorafleet:quota:{tenant}`` (fields ``max_in_flight`` and
``tokens_per_minute``; a field not set is no limit), listed in the set
``lorafleet:quota:tenants``; ``lorafleet quota`` sets and shows them.

- **In flight**: a job of a tenant with a quota is in the sorted set
  ``lorafleet:inflight:{tenant}`` (member: job id, score: when the entry lapses) from its
  admission until its worker publishes its final event. The client admits a job at submit
  (``admit``) only while fewer than ``max_in_flight`` of the tenant's jobs are in flight; a
  worker taking a job admits it again if it is not there (a producer that did not check,
  or a job submitted before the quota was set), and refreshes its entry. Entries
  lapse (``IN_FLIGHT_TTL_S`` from submit; the job timeout plus a minute from take), so a job
  lost with its worker or expired in the queue does not hold a place for ever.
- **Tokens per minute**: the prompt and completion tokens of the tenant's jobs, added when
  each job publishes its result, in fixed one-minute windows
  (``lorafleet:tpm:{tenant}:{minute}``). A job is admitted (at submit, and again at take)
  only while the current minute's count is under ``tokens_per_minute``; one job may take the
  count past it, the next waits for the next minute.

A refused job gets ``QuotaExceededError`` (code ``quota_exceeded``) naming the limit, its
value and ``retry_after`` seconds; it is not enqueued (at submit), or answered without
running (at take): it costs nothing and is not metered. Checks and admission are one Lua
script, so concurrent submits cannot overshoot ``max_in_flight``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lorafleet.producer.errors import QuotaExceededError
from lorafleet.producer.keys import NAMESPACE, arq_result_key
from lorafleet.producer.usage import check_tenant

QUOTA_TENANTS_KEY = f"{NAMESPACE}:quota:tenants"
#: How long a job admitted at submit holds its place if no worker takes it.
IN_FLIGHT_TTL_S = 3600
#: ``retry_after`` of a refusal for jobs in flight: places free up as jobs end, unforeseeably.
IN_FLIGHT_RETRY_S = 1.0
#: How stale a producer's or worker's list of tenants with a quota may be.
REFRESH_S = 1.0
LIMITS = ("max_in_flight", "tokens_per_minute")


def quota_key(tenant: str) -> str:
    return f"{NAMESPACE}:quota:{tenant}"


def in_flight_key(tenant: str) -> str:
    return f"{NAMESPACE}:inflight:{tenant}"


def tpm_key(tenant: str, minute: int) -> str:
    return f"{NAMESPACE}:tpm:{tenant}:{minute}"


@dataclass(frozen=True)
class Quota:
    """A tenant's limits (None: no limit). ``max_in_flight`` 0 refuses every job."""

    tenant: str
    max_in_flight: int | None = None
    tokens_per_minute: int | None = None


# KEYS: quota hash, in-flight zset, this minute's token count.
# ARGV: 1 job id, 2 now, 3 entry lapses at, 4 seconds left in the minute, 5 retry after a
# refusal for jobs in flight. Returns {} when admitted, else {limit, its value, retry after,
# the amount used}. A job already in flight (admitted at submit) is checked against the
# tokens per minute only, and loses its place if refused.
ADMIT_SCRIPT = """
local now = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local present = redis.call('ZSCORE', KEYS[2], ARGV[1])
local tpm = redis.call('HGET', KEYS[1], 'tokens_per_minute')
if tpm then
  local used = tonumber(redis.call('GET', KEYS[3]) or '0')
  if used >= tonumber(tpm) then
    if present then redis.call('ZREM', KEYS[2], ARGV[1]) end
    return {'tokens_per_minute', tpm, ARGV[4], tostring(used)}
  end
end
if not present then
  local max = redis.call('HGET', KEYS[1], 'max_in_flight')
  if max then
    local n = redis.call('ZCARD', KEYS[2])
    if n >= tonumber(max) then
      return {'max_in_flight', max, ARGV[5], tostring(n)}
    end
  end
end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('EXPIREAT', KEYS[2], math.ceil(tonumber(ARGV[3])) + 60)
return {}
"""


class QuotaTenants:
    """The tenants that have a quota, re-read from Redis when older than ``refresh_s``:
    producers and workers check only those tenants' jobs, so a job of a tenant without a
    quota costs no round trip. A quota set elsewhere applies within ``refresh_s``."""

    def __init__(self, redis: Any, refresh_s: float = REFRESH_S) -> None:
        self._redis = redis
        self._refresh_s = refresh_s
        self._tenants: frozenset[str] = frozenset()
        self._read_at = -float("inf")
        self._lock = asyncio.Lock()

    async def has_quota(self, tenant: str) -> bool:
        if time.monotonic() - self._read_at > self._refresh_s:
            async with self._lock:  # one read for all the jobs that arrive meanwhile
                if time.monotonic() - self._read_at > self._refresh_s:
                    members = await self._redis.smembers(QUOTA_TENANTS_KEY)
                    self._tenants = frozenset(
                        m.decode() if isinstance(m, bytes) else m for m in members
                    )
                    self._read_at = time.monotonic()
        return tenant in self._tenants

    def invalidate(self) -> None:
        """Re-read on the next check (after this process changed a quota)."""
        self._read_at = -float("inf")


def _minute(now: float) -> int:
    return int(now // 60)


async def admit(
    redis: Any,
    tenant: str,
    job_id: str,
    *,
    lapse_after: float = IN_FLIGHT_TTL_S,
    now: float | None = None,
) -> QuotaExceededError | None:
    """Admit job ``job_id`` of ``tenant`` under its quota (or refresh its place, holding it
    for ``lapse_after`` more seconds); the refusal if the quota does not allow it."""
    now = time.time() if now is None else now
    minute = _minute(now)
    left = (minute + 1) * 60 - now
    keys = (quota_key(tenant), in_flight_key(tenant), tpm_key(tenant, minute))
    args = (job_id, now, now + lapse_after, f"{left:.3f}", f"{IN_FLIGHT_RETRY_S}")
    reply = await redis.eval(ADMIT_SCRIPT, len(keys), *keys, *args)
    if not reply:
        return None
    limit, value, retry, used = (x.decode() if isinstance(x, bytes) else x for x in reply)
    retry_after = float(retry)
    if limit == "tokens_per_minute":
        message = (
            f"tenant {tenant!r} used {used} tokens this minute, its limit "
            f"(tokens_per_minute {value}); retry in {retry_after:.1f}s"
        )
    else:
        message = (
            f"tenant {tenant!r} has {used} jobs in flight, its limit (max_in_flight "
            f"{value}); retry when one ends (in about {retry_after:g}s)"
        )
    return QuotaExceededError(
        message, details={"limit": limit, "value": int(value), "retry_after": retry_after}
    )


async def forget_if_finished(redis: Any, tenant: str, job_id: str) -> None:
    """Give back the place of a job whose result arq already holds (a resubmission of a
    finished job id is admitted, but nothing will run to release it)."""
    if await redis.exists(arq_result_key(job_id)):
        await redis.zrem(in_flight_key(tenant), job_id)


def queue_release(
    pipe: Any, tenant: str, job_ids: Sequence[str], tokens: int, now: float | None = None
) -> None:
    """Queue, on ``pipe`` (the final events' transaction), the end of jobs of ``tenant``:
    they leave its jobs in flight and their ``tokens`` (all of them together) count toward
    this minute's."""
    if isinstance(job_ids, str):  # would remove one character at a time
        raise TypeError("job_ids must be a sequence of job ids, not one string")
    now = time.time() if now is None else now
    pipe.zrem(in_flight_key(tenant), *job_ids)
    if tokens:
        key = tpm_key(tenant, _minute(now))
        pipe.incrby(key, tokens)
        pipe.expire(key, 120)


async def set_quota(
    redis: Any,
    tenant: str,
    *,
    max_in_flight: int | None = None,
    tokens_per_minute: int | None = None,
    clear: tuple[str, ...] = (),
) -> Quota:
    """Set the given limits of ``tenant`` (others unchanged), remove those named in
    ``clear``; return the quota now. ``ValueError`` naming a bad value."""
    check_tenant(tenant)
    if tenant is None:
        raise ValueError("a quota needs a tenant")
    values = {"max_in_flight": max_in_flight, "tokens_per_minute": tokens_per_minute}
    for name, value in values.items():
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < 0
        ):
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    for name in clear:
        if name not in LIMITS:
            raise ValueError(f"cannot clear {name!r}: limits are {', '.join(LIMITS)}")
    async with redis.pipeline(transaction=True) as pipe:
        given = {k: v for k, v in values.items() if v is not None}
        if given:
            pipe.hset(quota_key(tenant), mapping=given)
        if clear:
            pipe.hdel(quota_key(tenant), *clear)
        pipe.sadd(QUOTA_TENANTS_KEY, tenant)
        await pipe.execute()
    (quota,) = await get_quotas(redis, [tenant])
    if quota.max_in_flight is None and quota.tokens_per_minute is None:
        await redis.srem(QUOTA_TENANTS_KEY, tenant)
    return quota


async def get_quotas(redis: Any, tenants: list[str] | None = None) -> list[Quota]:
    """The quotas of ``tenants`` (default: every tenant with one), sorted by tenant."""
    if tenants is None:
        tenants = sorted(
            t.decode() if isinstance(t, bytes) else t
            for t in await redis.smembers(QUOTA_TENANTS_KEY)
        )
    async with redis.pipeline(transaction=False) as pipe:
        for tenant in tenants:
            pipe.hgetall(quota_key(tenant))
        replies = await pipe.execute() if tenants else []
    quotas = []
    for tenant, fields in zip(tenants, replies, strict=True):
        got = {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in fields.items()}
        quotas.append(Quota(tenant, got.get("max_in_flight"), got.get("tokens_per_minute")))
    return quotas


async def in_flight(redis: Any, tenant: str, now: float | None = None) -> int:
    """How many of ``tenant``'s jobs hold a place now."""
    now = time.time() if now is None else now
    return await redis.zcount(in_flight_key(tenant), f"({now}", "+inf")
