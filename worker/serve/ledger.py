"""The worker's side of the usage ledger (layout: ``lorafleet.producer.ledger``).

Exactly once, and never missing for a result a client received:

- the ledger write of a job is queued by the ``StreamPublisher`` in the same MULTI/EXEC
  transaction as the job's final stream event and inbox reply (a script call for all the
  first runs of a flush, another for its re-runs), so the result a client reads from
  either exists if and only if the ledger holds it; arq's own result key is written only
  after that transaction, so a client reading that one finds the ledger written too;
- the write is a Lua script that counts the job only if ``lorafleet:metered:{job_id}`` has
  no record of it yet (``SET NX``), so a re-run (at-least-once delivery) never counts it
  twice. The re-run's own work is added to the waste of its worker instead; before it
  publishes, a re-run reads the usage recorded for the job (``Ledger.prepare``) and returns
  that, so every result of one job id carries the usage the ledger holds;
- counting is pushing the job's counts onto the pending list, in that script; a fold
  (``PendingFold`` in each worker, and every reader) adds them to the buckets later, off
  the job's path, each exactly once;
- runs cut short (a SIGKILL, a drain past its grace, arq's job timeout) cannot write
  anything themselves: the next run of the job finds them in the job's token stream (each
  run's first event names its worker) and adds, once per run, the tokens they streamed to
  their worker's waste. Their engine time is unknown and not counted.

The record scripts run with EVAL (not EVALSHA): a Redis restarted since a script was loaded
would answer NOSCRIPT inside the transaction after the event was written, losing the entry.
(The fold runs outside any transaction, so it uses EVALSHA, loading the script on NOSCRIPT.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
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
    FOLD_BATCH,
    PENDING_KEY,
    REJECTED_KEY,
    SEP,
    bucket_start,
    fold_pending,
    metered_key,
    pending_record,
    to_us,
    wasted_runs_key,
)
from lorafleet.producer.stream import FIELD, decode_event
from lorafleet.producer.usage import Usage
from lorafleet.worker.serve.background import BackgroundLoop

logger = logging.getLogger(__name__)

# The ledger's record scripts decide what counts and push the counts onto the pending
# list, KEYS[1]; a fold adds them to the buckets later, off the job's path
# (``fold_pending``). A job's record is encoded by the worker and pushed as is. A publisher
# flush (the jobs of one engine step finish together) makes one call of each script its
# jobs need: nearly always only the first, for jobs in their first run.

# First runs: KEYS[2..] the jobs' markers; ARGV[1] their TTL, then per job (KEYS[1+i]) its
# marker's value ("1:{usage}", the form below) and its record. A first run is counted
# unless its marker exists (the same publish repeated: a transaction redis-py retried after
# a lost reply; a marker of either form, since SET NX fails on a hash too).
# Returns, per job, 1 if it was counted, else 0.
FIRST_RUN_SCRIPT = """
local out,counted={},{}
for i=2,#KEYS do
if redis.call('SET',KEYS[i],ARGV[2*i-2],'NX','EX',ARGV[1]) then
out[#out+1]=ARGV[2*i-1]
counted[#counted+1]=1
else
counted[#counted+1]=0
end
end
for s=1,#out,1000 do
redis.call('RPUSH',KEYS[1],unpack(out,s,math.min(s+999,#out)))
end
return counted
"""

# Re-runs (attempt >= 2): of a job maybe counted already, maybe after runs cut short, and
# maybe ended in an error (then only the cut runs are charged). Its arguments are few on
# purpose: each is packed by the worker and parsed by Redis (BENCHMARKS.md: with ~15 of
# them a job the script cost the pipeline 5-6% of its jobs/s).
# ARGV[1]: one msgpack array: the marker key prefix (``metered_key("")``), the suffix that
# makes a marker's key its wasted-runs hash's (``wasted_runs_key``), the markers' TTL, the
# bucket seconds, the retention seconds, this worker's waste field prefix ("worker\t"),
# then per job an array of: job id, attempt, its bucket's start, prompt tokens, completion
# tokens, engine us, and its cut runs, each an array of: attempt, waste field prefix,
# prompt tokens, completion tokens. ARGV[2i] and ARGV[2i+1]: job i's encoded usage and its
# pending record ("" both for a run without usage: an error), apart because Redis's
# cmsgpack reads no msgpack binary. Waste records are built here, as ``pending_record``
# lays them out.
# The marker holds "{attempt}:{usage}" of the counted run; field "a{n}" of the wasted-runs
# hash marks run n charged as waste (a marker of the older form, a hash, holds both: field
# "m", which may be missing when only waste was charged, and the "a{n}" fields; such a job
# is counted into that hash). Every run after the counted one restarts the markers' TTL.
# Returns, per job, 1 if this run's usage was counted, else 0.
RERUN_SCRIPT = """
local args=cmsgpack.unpack(ARGV[1])
local prefix,suffix,ttl,bucket,retention,me,jobs=unpack(args)
local out={}
local function waste(start,p,prompt,completion,engine)
out[#out+1]=cmsgpack.pack({'waste',bucket,start,retention,p,1,prompt,completion,engine})
end
local function hashed(m)
return redis.call('TYPE',m).ok=='hash'
end
local function first_waste(h,n)
if redis.call('HSETNX',h,'a'..n,1)==1 then
redis.call('EXPIRE',h,ttl)
return true
end
return false
end
local counted={}
for i,job in ipairs(jobs) do
local m=prefix..job[1]
local runs,start=m..suffix,job[3]
local a,usage=string.format('%d',job[2]),ARGV[2*i]
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
out[#out+1]=ARGV[2*i+1]
else
local got
if old then got=redis.call('HGET',m,'m') else got=redis.call('GET',m) end
if got and string.sub(got,1,string.len(a)+1)~=a..':' and first_waste(runs,a) then
waste(start,me,job[4],job[5],job[6])
end
end
end
local cut=job[7]
if #cut>0 and old==nil and hashed(m) then
runs=m
end
for _,run in ipairs(cut) do
if first_waste(runs,string.format('%d',run[1])) then
waste(start,run[2],run[3],run[4],0)
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
for s=1,#out,1000 do
redis.call('RPUSH',KEYS[1],unpack(out,s,math.min(s+999,#out)))
end
return counted
"""

#: A worker folds the jobs it recorded at most about this long after (or sooner, every
#: ``FOLD_BATCH`` of them); a reader folds before it reads, so it never waits for this.
FOLD_INTERVAL_S = 1.0

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

    @property
    def first_run(self) -> bool:
        """A job's first run, with usage (no run before it: nothing to look up)."""
        return self.attempt == 1 and self.usage is not None

    @staticmethod
    def queue_all(pipe: Any, entries: Sequence[LedgerEntry]) -> None:
        """Queue the script calls recording ``entries`` on ``pipe`` (a transaction, with
        their jobs' final events); entries of one ``Ledger`` (one worker's)."""
        entries[0].ledger.queue(pipe, entries)


class PendingFold(BackgroundLoop):
    """Folds the ledger's pending records into its buckets (``fold_pending``, all of them,
    whoever recorded them) once this worker has recorded ``FOLD_BATCH`` jobs since its last
    fold, else on the next tick (every ``FOLD_INTERVAL_S``) after it recorded any. A fold
    that fails is logged and tried again on the next tick: the records wait in Redis, and
    any fold or read takes them. Nothing is folded at shutdown (Redis may be down then)."""

    task_name = "ledger-fold"

    def __init__(self, redis: Any) -> None:
        self._redis = redis
        self._since = 0  # jobs recorded since the last fold
        self._due = asyncio.Event()

    def queued(self, jobs: int) -> None:
        """``jobs`` more jobs' records are on their way to the pending list."""
        self._since += jobs
        if self._since >= FOLD_BATCH:
            self._due.set()

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._due.wait(), FOLD_INTERVAL_S)
            if not self._since:
                continue
            self._due.clear()
            self._since = 0
            try:
                folded = await fold_pending(self._redis)
            except Exception:  # never end the loop: the next tick folds what this left
                logger.exception("folding the usage ledger's pending counts failed")
                self._since = max(self._since, 1)
                continue
            if folded.rejected:
                logger.warning(
                    "%d usage ledger records could not be read (malformed, or written by a "
                    "newer lorafleet): kept, not counted, in Redis list %s",
                    folded.rejected,
                    REJECTED_KEY,
                )


class Ledger:
    """Writes this worker's jobs into the ledger; ``bucket_s`` and ``retention_s`` as
    ``LORAFLEET_USAGE_BUCKET`` / ``LORAFLEET_USAGE_RETENTION``. ``folder`` adds what it
    records to the buckets: ``folder.start()`` in a worker (a reader folds too)."""

    def __init__(self, redis: Any, *, worker: str, bucket_s: int, retention_s: int) -> None:
        self._redis = redis
        self.worker = worker
        self.bucket_s = bucket_s
        self.retention_s = retention_s
        self.folder = PendingFold(redis)

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
        """Queue the scripts recording ``entries`` on ``pipe``: one call for the first
        runs, one for the re-runs (each only if it has jobs)."""
        first = [e for e in entries if e.first_run]
        if first:
            markers = [metered_key(e.job_id) for e in first]
            args: list[bytes] = []
            for e in first:
                usage, record = self._records(e, bucket_start(e.now, self.bucket_s))
                args += (b"1:" + usage, record)
            pipe.eval(
                FIRST_RUN_SCRIPT, 1 + len(markers), PENDING_KEY, *markers, DEDUPE_TTL_S, *args
            )
        if reruns := [e for e in entries if not e.first_run]:
            self._queue_reruns(pipe, reruns)
        self.folder.queued(len(entries))

    def _queue_reruns(self, pipe: Any, entries: Sequence[LedgerEntry]) -> None:
        jobs: list[tuple[Any, ...]] = []
        records: list[bytes] = []
        for e in entries:
            start = bucket_start(e.now, self.bucket_s)
            jobs.append(self._job(e, start))
            records += self._records(e, start)
        head = (metered_key(""), _RUNS_SUFFIX, DEDUPE_TTL_S, self.bucket_s, self.retention_s)
        blob = _encoder.encode((*head, self.worker + SEP, jobs))
        pipe.eval(RERUN_SCRIPT, 1, PENDING_KEY, blob, *records)

    def _job(self, e: LedgerEntry, start: int) -> tuple[Any, ...]:
        """One job's entry of ``RERUN_SCRIPT``'s ARGV[1], in the bucket starting at
        ``start``."""
        usage = e.usage
        prompt = usage.prompt_tokens if usage is not None else 0
        completion = usage.completion_tokens if usage is not None else 0
        engine = to_us(usage.engine_s) if usage is not None else 0
        cut = [
            (run.attempt, run.worker + SEP, prompt, run.completion_tokens) for run in e.prior.cut
        ]
        return (e.job_id, e.attempt, start, prompt, completion, engine, cut)

    def _records(self, e: LedgerEntry, start: int) -> tuple[bytes, bytes]:
        """The job's encoded usage and its pending record of usage (``b""`` both: none)."""
        usage = e.usage
        if usage is None:
            return b"", b""
        counts = (
            1,
            usage.prompt_tokens,
            usage.completion_tokens,
            to_us(usage.engine_s),
            to_us(usage.adapter_load_s),
        )
        prefix = f"{e.tenant or ''}{SEP}{e.adapter or ''}{SEP}"
        record = pending_record("usage", self.bucket_s, start, self.retention_s, prefix, counts)
        return _encoder.encode(usage), record


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
