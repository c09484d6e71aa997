"""The worker's side of the usage ledger (layout: ``lorafleet.producer.ledger``).

Exactly once, and never missing for a result a client received:

- the ledger write of a job is queued by the ``StreamPublisher`` in the same MULTI/EXEC
  transaction as the job's final stream event and inbox reply (one script call for all the
  jobs of a flush), so the result a client reads
  from either exists if and only if the ledger holds it; arq's own result key is written
  only after that transaction, so a client reading that one finds the ledger written too;
- the write is a Lua script that counts the job only if ``lorafleet:metered:{job_id}`` has
  no record of it yet (``SET NX``), so a re-run (at-least-once delivery) never counts it
  twice. The re-run's own work is added to the waste of its worker instead; before it
  publishes, a re-run reads the usage recorded for the job (``Ledger.prepare``) and returns
  that, so every result of one job id carries the usage the ledger holds;
- runs cut short (a SIGKILL, a drain past its grace, arq's job timeout) cannot write
  anything themselves: the next run of the job finds them in the job's token stream (each
  run's first event names its worker) and adds, once per run, the tokens they streamed to
  their worker's waste. Their engine time is unknown and not counted.

The script runs with EVAL (not EVALSHA): a Redis restarted since the script was loaded would
answer NOSCRIPT inside the transaction after the event was written, losing the entry.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
from redis.exceptions import ResponseError

from lorafleet.producer.codec import GenerateJob
from lorafleet.producer.errors import LoraFleetError
from lorafleet.producer.keys import stream_key
from lorafleet.producer.ledger import (
    DEDUPE_TTL_S,
    INDEX_KEY,
    SEP,
    bucket_start,
    metered_key,
    to_us,
    usage_key,
    waste_key,
    wasted_runs_key,
)
from lorafleet.producer.stream import FIELD, decode_event
from lorafleet.producer.usage import Usage

# One call records every job of a publisher flush (the jobs of one engine step finish
# together). Counts are summed per hash and field first, so jobs of one tenant and adapter
# in a flush cost one HINCRBY per counter (none for a count of 0: a missing field reads as
# 0), and each bucket is checked for being new once; a first count is one SET NX EX of the
# job's marker. Arguments are few on purpose: each one is packed by the worker and parsed
# by Redis; with ~15 of them a job the script cost the pipeline 5-6% of its jobs/s, 2-4%
# with these (BENCHMARKS.md).
# KEYS: 1 the bucket index, then the usage and waste hashes of the flush's buckets (the
# jobs' marker keys are built by the script, not declared: lorafleet, like arq, runs on a
# standalone Redis, not a Cluster).
# ARGV[1]: one msgpack array: the marker key prefix (``metered_key("")``), the suffix
# that makes a marker's key its wasted-runs hash's (``wasted_runs_key``), then per job an
# array of: job id, attempt, index in KEYS of its usage hash, of its waste hash, usage
# field prefix ("tenant\tadapter\t"), waste field prefix ("worker\t"), bucket EXPIREAT,
# marker TTL, index member, index score, index cut-off, prompt tokens, completion tokens,
# engine us, adapter-load us, and its cut runs, each an array of: attempt, waste field
# prefix, prompt tokens, completion tokens. ARGV[1+i]: job i's encoded usage ("" for a run
# without usage: an error), apart because Redis's cmsgpack reads no msgpack binary.
# The marker holds "{attempt}:{usage}" of the counted run; field "a{n}" of the wasted-runs
# hash marks run n charged as waste (a marker of the older form, a hash, holds both: field
# "m", which may be missing when only waste was charged, and the "a{n}" fields; such a job
# is counted into that hash). Every run after the counted one restarts the markers' TTL. A
# bucket's expiry and index entry are written when the bucket is new only. Returns, per
# job, 1 if this run's usage was counted, else 0.
RECORD_SCRIPT = """
local args=cmsgpack.unpack(ARGV[1])
local prefix,suffix,jobs=args[1],args[2],args[3]
local keys,fields,sums,first={},{},{},{}
local function add(k,job,f,v)
if v==0 then return end
if not sums[k] then
sums[k]={} fields[k]={} first[k]=job keys[#keys+1]=k
end
if not sums[k][f] then
sums[k][f]=0 fields[k][#fields[k]+1]=f
end
sums[k][f]=sums[k][f]+v
end
local function waste(w,job,p,prompt,completion,engine)
add(w,job,p..'attempts',1)
add(w,job,p..'prompt_tokens',prompt)
add(w,job,p..'completion_tokens',completion)
add(w,job,p..'engine_us',engine)
end
local function hashed(m)
return redis.call('TYPE',m).ok=='hash'
end
local function first_waste(h,n,ttl)
if redis.call('HSETNX',h,'a'..n,1)==1 then
redis.call('EXPIRE',h,ttl)
return true
end
return false
end
local counted={}
for i,job in ipairs(jobs) do
local m=prefix..job[1]
local runs,u,w=m..suffix,KEYS[job[3]],KEYS[job[4]]
local a,usage,ttl=string.format('%d',job[2]),ARGV[1+i],job[8]
local c=0
local old=nil
if usage~='' then
local rec=a..':'..usage
if redis.call('SET',m,rec,'NX','EX',ttl) then
c=1
else
old=hashed(m)
if old then
runs=m
if redis.call('HSETNX',m,'m',rec)==1 then c=1 end
end
end
if c==1 then
local p=job[5]
add(u,job,p..'requests',1)
add(u,job,p..'prompt_tokens',job[12])
add(u,job,p..'completion_tokens',job[13])
add(u,job,p..'engine_us',job[14])
add(u,job,p..'adapter_load_us',job[15])
else
local got
if old then got=redis.call('HGET',m,'m') else got=redis.call('GET',m) end
if got and string.sub(got,1,string.len(a)+1)~=a..':' and first_waste(runs,a,ttl) then
waste(w,job,job[6],job[12],job[13],job[14])
end
end
end
local cut=job[16]
if #cut>0 and old==nil and hashed(m) then
runs=m
end
for _,run in ipairs(cut) do
if first_waste(runs,string.format('%d',run[1]),ttl) then
waste(w,job,run[2],run[3],run[4],0)
end
end
if c==0 or old then
-- A run after the counted one: the dedupe window starts again, as it did when every run
-- refreshed the marker.
redis.call('EXPIRE',m,ttl)
if runs~=m then redis.call('EXPIRE',runs,ttl) end
end
counted[#counted+1]=c
end
for _,k in ipairs(keys) do
local fresh=redis.call('EXISTS',k)==0
for _,f in ipairs(fields[k]) do
redis.call('HINCRBY',k,f,string.format('%d',sums[k][f]))
end
if fresh then
local job=first[k]
redis.call('EXPIREAT',k,string.format('%d',job[7]))
redis.call('ZADD',KEYS[1],string.format('%d',job[10]),job[9])
redis.call('ZREMRANGEBYSCORE',KEYS[1],'-inf',string.format('%d',job[11]))
end
end
return counted
"""

#: Worker name of a cut run whose first event is gone (or that streamed nothing).
UNKNOWN_WORKER = "(unknown)"

_encoder = msgspec.msgpack.Encoder()
#: What turns a job's marker key into its wasted-runs hash's key (the script builds both).
_RUNS_SUFFIX = wasted_runs_key("").removeprefix(metered_key(""))
_usage_decoder = msgspec.msgpack.Decoder(Usage)


@dataclass
class CutRun:
    """A run of a job before this one that ended without a final event."""

    attempt: int
    worker: str
    completion_tokens: int


@dataclass
class Prior:
    """What earlier runs of a job left: the usage the ledger recorded for it (None: not
    metered yet) and the runs cut short."""

    recorded: Usage | None = None
    cut: list[CutRun] = field(default_factory=list)


@dataclass
class LedgerEntry:
    """One job's ledger write, queued on the publisher's transaction by ``queue_all``."""

    ledger: Ledger
    job_id: str
    attempt: int
    tenant: str | None
    adapter: str | None
    usage: Usage | None  # this run's own usage (None: the run ended in an error)
    prior: Prior
    now: float

    @staticmethod
    def queue_all(pipe: Any, entries: Sequence[LedgerEntry]) -> None:
        """Queue one script call recording ``entries`` on ``pipe`` (a transaction, with
        their jobs' final events); entries of one ``Ledger`` (one worker's)."""
        entries[0].ledger.queue(pipe, entries)


class Ledger:
    """Writes this worker's jobs into the ledger; ``bucket_s`` and ``retention_s`` as
    ``LORAFLEET_USAGE_BUCKET`` / ``LORAFLEET_USAGE_RETENTION``."""

    def __init__(self, redis: Any, *, worker: str, bucket_s: int, retention_s: int) -> None:
        self._redis = redis
        self.worker = worker
        self.bucket_s = bucket_s
        self.retention_s = retention_s

    async def prepare(self, job_id: str, attempt: int) -> Prior:
        """For a re-run (``attempt`` > 1): the usage already recorded for the job and the
        runs cut short before this one. One round trip; nothing for a first run."""
        if attempt <= 1:
            return Prior()
        marker = metered_key(job_id)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.get(marker)
            pipe.xrange(stream_key(job_id))
            recorded, entries = await pipe.execute(raise_on_error=False)
        if isinstance(recorded, ResponseError):  # a marker of the older form: a hash
            recorded = await self._redis.hget(marker, "m")
        if isinstance(entries, Exception):
            raise entries
        return Prior(recorded_usage(recorded) if recorded else None, cut_runs(entries, attempt))

    def entry(
        self,
        job_id: str,
        attempt: int,
        job: GenerateJob,
        usage: Usage | None,
        prior: Prior,
        *,
        now: float | None = None,
    ) -> LedgerEntry:
        adapter = job.lora_request.lora_name if job.lora_request is not None else None
        return LedgerEntry(
            self,
            job_id,
            attempt,
            job.tenant,
            adapter,
            usage,
            prior,
            time.time() if now is None else now,
        )

    def queue(self, pipe: Any, entries: Sequence[LedgerEntry]) -> None:
        """Queue the script recording ``entries`` on ``pipe``."""
        keys: list[str] = [INDEX_KEY]
        jobs: list[tuple[Any, ...]] = []
        for e in entries:
            start = bucket_start(e.now, self.bucket_s)
            at = []
            for key in (usage_key(self.bucket_s, start), waste_key(self.bucket_s, start)):
                if key not in keys:
                    keys.append(key)
                at.append(keys.index(key) + 1)  # Lua counts from 1
            jobs.append(self._job(e, start, *at))
        usages = [_encoder.encode(e.usage) if e.usage is not None else b"" for e in entries]
        blob = _encoder.encode((metered_key(""), _RUNS_SUFFIX, jobs))
        pipe.eval(RECORD_SCRIPT, len(keys), *keys, blob, *usages)

    def _job(self, e: LedgerEntry, start: int, usage_at: int, waste_at: int) -> tuple[Any, ...]:
        """One job's entry of ``RECORD_SCRIPT``'s ARGV[1], in the bucket starting at
        ``start`` (its hashes at ``usage_at`` and ``waste_at`` in KEYS)."""
        usage = e.usage
        counts = (0, 0, 0, 0)
        if usage is not None:
            counts = (
                usage.prompt_tokens,
                usage.completion_tokens,
                to_us(usage.engine_s),
                to_us(usage.adapter_load_s),
            )
        prompt = usage.prompt_tokens if usage is not None else 0
        cut = [
            (run.attempt, run.worker + SEP, prompt, run.completion_tokens) for run in e.prior.cut
        ]
        return (
            e.job_id,
            e.attempt,
            usage_at,
            waste_at,
            f"{e.tenant or ''}{SEP}{e.adapter or ''}{SEP}",
            self.worker + SEP,
            start + self.bucket_s + self.retention_s,
            DEDUPE_TTL_S,
            f"{self.bucket_s}:{start}",
            start,
            int(e.now) - self.retention_s - self.bucket_s,
            *counts,
            cut,
        )


def recorded_usage(marker: bytes) -> Usage:
    """The usage a job was counted with, from its marker (``{attempt}:{msgpack Usage}``)."""
    return _usage_decoder.decode(marker.split(b":", 1)[1])


def cut_runs(entries: list[tuple[Any, dict]], attempt: int) -> list[CutRun]:
    """The runs before ``attempt`` that streamed no final event, from the job's stream
    entries (XRANGE); runs 1 .. ``attempt - 1`` that streamed nothing count too, with an
    unknown worker and no tokens (a drain hands back a run that made nothing without
    counting it, so a number below ``attempt`` is a run that happened)."""
    workers: dict[int, str] = {}
    tokens: dict[int, int] = {}
    final: set[int] = set()
    seen: dict[int, set[int]] = {}
    for _, fields in entries:
        try:
            event = decode_event(fields[FIELD])
        except (LoraFleetError, KeyError):
            continue
        a = event.attempt
        if a >= attempt or event.seq in seen.setdefault(a, set()):
            continue  # a later run, or a retried XADD
        seen[a].add(event.seq)
        if event.worker is not None:
            workers[a] = event.worker
        tokens[a] = tokens.get(a, 0) + len(event.token_ids)
        if event.final:
            final.add(a)
    return [
        CutRun(a, workers.get(a, UNKNOWN_WORKER), tokens.get(a, 0))
        for a in range(1, attempt)
        if a not in final
    ]


def stamp(usage: Usage | None, prior: Prior) -> Usage | None:
    """The usage a run's result carries: the one the ledger recorded for the job, if an
    earlier run was metered, else the run's own."""
    return prior.recorded if prior.recorded is not None else usage
