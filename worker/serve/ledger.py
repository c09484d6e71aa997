"""The worker's side of the usage ledger (layout: ``lorafleet.producer.ledger``).

Exactly once, and never missing for a result a client received:

- the ledger write of a job is queued by the ``StreamPublisher`` in the same MULTI/EXEC
  transaction as the job's final stream event and inbox reply, so the result a client reads
  from either exists if and only if the ledger holds it; arq's own result key is written
  only after that transaction, so a client reading that one finds the ledger written too;
- the write is a Lua script that counts the job only if ``lorafleet:metered:{job_id}`` has
  no record of it yet (``HSETNX``), so a re-run (at-least-once delivery) never counts it
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
from dataclasses import dataclass, field
from typing import Any

import msgspec

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
)
from lorafleet.producer.stream import FIELD, decode_event
from lorafleet.producer.usage import Usage

# KEYS: marker, usage hash, waste hash, bucket index.
# ARGV: 1 attempt, 2 encoded usage ("" for a run without usage: an error), 3 usage field
# prefix ("tenant\tadapter\t"), 4 waste field prefix ("worker\t"), 5 bucket EXPIREAT,
# 6 marker TTL, 7 index member, 8 index score, 9 index cut-off, 10-13 prompt tokens,
# completion tokens, engine us, adapter-load us, 14 count of cut runs, then per cut run:
# attempt, waste field prefix, prompt tokens, completion tokens.
# The marker's field "m" holds "{attempt}:{usage}" of the counted run; "a{n}" marks run n
# charged as waste. A bucket's expiry and index entry are written when the bucket is new
# only: the common path is 8 calls. Returns 1 if this run's usage was counted, else 0.
RECORD_SCRIPT = """
local m,a=KEYS[1],ARGV[1]
local function new(k)
if redis.call('EXISTS',k)==0 then return true end
return false
end
local function dated(k)
redis.call('EXPIREAT',k,ARGV[5])
redis.call('ZADD',KEYS[4],ARGV[8],ARGV[7])
redis.call('ZREMRANGEBYSCORE',KEYS[4],'-inf',ARGV[9])
end
local function waste(p,prompt,completion,engine)
local fresh=new(KEYS[3])
redis.call('HINCRBY',KEYS[3],p..'attempts',1)
redis.call('HINCRBY',KEYS[3],p..'prompt_tokens',prompt)
redis.call('HINCRBY',KEYS[3],p..'completion_tokens',completion)
redis.call('HINCRBY',KEYS[3],p..'engine_us',engine)
if fresh then dated(KEYS[3]) end
end
local counted=0
if ARGV[2]~='' then
if redis.call('HSETNX',m,'m',a..':'..ARGV[2])==1 then
local k,p=KEYS[2],ARGV[3]
local fresh=new(k)
redis.call('HINCRBY',k,p..'requests',1)
redis.call('HINCRBY',k,p..'prompt_tokens',ARGV[10])
redis.call('HINCRBY',k,p..'completion_tokens',ARGV[11])
redis.call('HINCRBY',k,p..'engine_us',ARGV[12])
redis.call('HINCRBY',k,p..'adapter_load_us',ARGV[13])
if fresh then dated(k) end
counted=1
else
local rec=redis.call('HGET',m,'m')
if string.sub(rec,1,string.len(a)+1)~=a..':' and redis.call('HSETNX',m,'a'..a,1)==1 then
waste(ARGV[4],ARGV[10],ARGV[11],ARGV[12])
end
end
end
local i=15
for _=1,tonumber(ARGV[14]) do
if redis.call('HSETNX',m,'a'..ARGV[i],1)==1 then
waste(ARGV[i+1],ARGV[i+2],ARGV[i+3],0)
end
i=i+4
end
redis.call('EXPIRE',m,ARGV[6])
return counted
"""

#: Worker name of a cut run whose first event is gone (or that streamed nothing).
UNKNOWN_WORKER = "(unknown)"

_usage_encoder = msgspec.msgpack.Encoder()
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
    """One job's ledger write, queued on the publisher's transaction by ``queue``."""

    ledger: Ledger
    job_id: str
    attempt: int
    tenant: str | None
    adapter: str | None
    usage: Usage | None  # this run's own usage (None: the run ended in an error)
    prior: Prior
    now: float

    def queue(self, pipe: Any) -> None:
        """Queue the script on ``pipe`` (a transaction, with the job's final event)."""
        self.ledger.queue(pipe, self)


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
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hget(metered_key(job_id), "m")
            pipe.xrange(stream_key(job_id))
            recorded, entries = await pipe.execute()
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

    def queue(self, pipe: Any, e: LedgerEntry) -> None:
        start = bucket_start(e.now, self.bucket_s)
        end = start + self.bucket_s
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
        cut: list[Any] = []
        for run in e.prior.cut:
            cut += [run.attempt, run.worker + SEP, prompt, run.completion_tokens]
        args = [
            e.attempt,
            _usage_encoder.encode(usage) if usage is not None else b"",
            f"{e.tenant or ''}{SEP}{e.adapter or ''}{SEP}",
            self.worker + SEP,
            end + self.retention_s,
            DEDUPE_TTL_S,
            f"{self.bucket_s}:{start}",
            start,
            int(e.now) - self.retention_s - self.bucket_s,
            *counts,
            len(e.prior.cut),
            *cut,
        ]
        keys = [
            metered_key(e.job_id),
            usage_key(self.bucket_s, start),
            waste_key(self.bucket_s, start),
            INDEX_KEY,
        ]
        pipe.eval(RECORD_SCRIPT, len(keys), *keys, *args)


def recorded_usage(marker: bytes) -> Usage:
    """The usage a job was counted with, from its marker's ``m`` field
    (``{attempt}:{msgpack Usage}``)."""
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
