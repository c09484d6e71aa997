"""The usage ledger in Redis: its layout, folding its pending counts, and reading it.

Workers add every completed job's ``Usage`` to counters per tenant, adapter and time bucket,
exactly once per job id however many times arq runs the job (the write side is
``lorafleet.worker.serve.ledger``). Layout, all under ``lorafleet:``:

- ``lorafleet:usage:{bucket_s}:{start}``: a hash per bucket (``start`` a multiple of
  ``bucket_s``, Unix seconds, the worker's clock when it published the result); field
  ``{tenant}\\t{adapter}\\t{metric}``, value an integer (times in microseconds, so sums are
  exact). ``tenant`` is ``""`` for jobs without one, ``adapter`` the adapter's ``lora_name``
  or ``""`` for the base model;
- ``lorafleet:waste:{bucket_s}:{start}``: per bucket, the work of runs whose result was not
  the one delivered (a run cut short by a crash or a drain, found by the next run; a re-run
  of a job already metered), field ``{worker}\\t{metric}``;
- ``lorafleet:usage:buckets``: a sorted set of the buckets written (member
  ``{bucket_s}:{start}``, score ``start``), to find them by time;
- ``lorafleet:metered:{job_id}``: the run of a job that was counted, ``{attempt}:{usage}``
  (msgpack ``Usage``), and ``lorafleet:metered:{job_id}:runs``: the runs charged as waste,
  fields ``a{attempt}`` (dedupe, ``DEDUPE_TTL_S``). Before 2026-12-06 the first was a hash
  holding both (field ``m`` and the ``a{n}`` fields); workers still read that form;
- ``lorafleet:usage:pending``: a list of counts recorded but not yet added to the buckets,
  each a msgpack array ``[kind, bucket_s, start, retention_s, field prefix, counts...]``
  (``pending_record``). A worker pushes a job's record in the same transaction as its
  dedupe marker and final event; ``fold_pending`` moves records into the buckets, each
  exactly once (one script takes them off the list and adds them up). Workers fold about
  once a second and every ``FOLD_BATCH`` records; ``read_usage`` folds before it reads, so
  a reader never sees a count missing. ``lorafleet:usage:rejected``: records a fold could
  not read (none that any build writes; a newer build's kind), kept as they were.

Buckets expire ``retention`` seconds after they end.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

import msgspec

from lorafleet.producer.keys import NAMESPACE

DEFAULT_BUCKET_S = 3600
DEFAULT_RETENTION_S = 30 * 86_400
#: How long a job's dedupe record lives: arq runs a job again only while it still holds the
#: job (a day by default), so two days covers every re-run.
DEDUPE_TTL_S = 2 * 86_400

INDEX_KEY = f"{NAMESPACE}:usage:buckets"
PENDING_KEY = f"{NAMESPACE}:usage:pending"
#: Pending records a fold could not read: kept for an operator, never counted or dropped.
REJECTED_KEY = f"{NAMESPACE}:usage:rejected"
#: Records one fold call adds up at most: a call holds Redis for a few us a record.
FOLD_BATCH = 512
#: The most one call may take (its rejects go out in one RPUSH: Lua's stack bounds that).
MAX_FOLD_BATCH = 4096
SEP = "\t"
#: The ledger's counters per tenant and adapter, and the waste's per worker.
USAGE_METRICS = ("requests", "prompt_tokens", "completion_tokens", "engine_us", "adapter_load_us")
WASTE_METRICS = ("attempts", "prompt_tokens", "completion_tokens", "engine_us")
#: How reports show the empty tenant and adapter.
NO_TENANT = "(none)"
BASE_ADAPTER = "(base)"
GROUPINGS = {
    "tenant": ("tenant",),
    "adapter": ("adapter",),
    "tenant,adapter": ("tenant", "adapter"),
}


def bucket_start(t: float, bucket_s: int) -> int:
    """Start (Unix seconds) of the bucket holding time ``t``."""
    return int(t // bucket_s) * bucket_s


def usage_key(bucket_s: int, start: int) -> str:
    return f"{NAMESPACE}:usage:{bucket_s}:{start}"


def waste_key(bucket_s: int, start: int) -> str:
    return f"{NAMESPACE}:waste:{bucket_s}:{start}"


def metered_key(job_id: str) -> str:
    return f"{NAMESPACE}:metered:{job_id}"


def wasted_runs_key(job_id: str) -> str:
    return f"{NAMESPACE}:metered:{job_id}:runs"


def to_us(seconds: float) -> int:
    """Seconds as whole microseconds: what the ledger adds (sum these to compare)."""
    return round(seconds * 1_000_000)


#: The kinds of pending record, each with the counters its counts are, in order.
RECORD_KINDS = {"usage": USAGE_METRICS, "waste": WASTE_METRICS}

_encoder = msgspec.msgpack.Encoder()


def pending_record(
    kind: str, bucket_s: int, start: int, retention_s: int, prefix: str, counts: Sequence[int]
) -> bytes:
    """A record for the pending list: ``counts`` of the counters ``RECORD_KINDS[kind]``,
    in that order, to add to fields ``{prefix}{counter}`` of that kind's bucket hash for
    the bucket of ``bucket_s`` seconds starting at ``start`` (Unix seconds), kept
    ``retention_s`` after it ends. ``ValueError`` for an unknown kind or a count missing."""
    if kind not in RECORD_KINDS or len(counts) != len(RECORD_KINDS[kind]):
        raise ValueError(f"a {kind!r} record needs counts of {RECORD_KINDS.get(kind)}")
    return _encoder.encode((kind, bucket_s, start, retention_s, prefix, *counts))


def _lua_table(kinds: Mapping[str, Sequence[str]]) -> str:
    """``RECORD_KINDS`` as a Lua table literal: kind -> its counters' names."""
    entries = (f"{k}={{{','.join(repr(n) for n in names)}}}" for k, names in kinds.items())
    return "{" + ",".join(entries) + "}"


# Takes up to ARGV[1] records off the pending list (KEYS[1]) and adds them to their bucket
# hashes (named ARGV[2] .. kind .. ":{bucket_s}:{start}"), all in one script, so each
# record is counted exactly once however many folds run at the same time. Counts are summed
# per hash and field first (one HINCRBY each; none for 0: a missing field reads as 0). A
# bucket new to Redis gets its expiry and its entry in the index (KEYS[2]), which is then
# pruned of buckets past their retention. Every record is checked before anything is
# written (a Lua error does not undo a script's earlier writes): one that does not decode,
# has the wrong shape, or is of a kind this build does not know (a newer build's) moves to
# KEYS[3] instead, whole, so it can neither stop the fold nor vanish. Past the LTRIM no
# command can fail on checked records. Returns {records taken, of them rejected}.
FOLD_SCRIPT = f"""
local recs=redis.call('LRANGE',KEYS[1],0,tonumber(ARGV[1])-1)
if #recs==0 then return {{0,0}} end
local kinds={_lua_table(RECORD_KINDS)}
local function check(r)
if type(r)~='table' then return nil end
local names=kinds[r[1]]
if not names or type(r[5])~='string' then return nil end
for j=2,4 do
if type(r[j])~='number' then return nil end
end
for j=1,#names do
if type(r[5+j])~='number' then return nil end
end
return names
end
local keys,fields,sums,heads,bad={{}},{{}},{{}},{{}},{{}}
for _,raw in ipairs(recs) do
local ok,r=pcall(cmsgpack.unpack,raw)
local names=ok and check(r)
if names then
local bucket,start,retention,p=r[2],r[3],r[4],r[5]
local member=string.format('%d:%d',bucket,start)
local k=ARGV[2]..r[1]..':'..member
if not sums[k] then
sums[k]={{}} fields[k]={{}} keys[#keys+1]=k
heads[k]={{member,start,start+bucket+retention,start-retention-bucket}}
end
for j,name in ipairs(names) do
local v=r[5+j]
if v~=0 then
local f=p..name
if not sums[k][f] then
sums[k][f]=0 fields[k][#fields[k]+1]=f
end
sums[k][f]=sums[k][f]+v
end
end
else
bad[#bad+1]=raw
end
end
redis.call('LTRIM',KEYS[1],#recs,-1)
if #bad>0 then redis.call('RPUSH',KEYS[3],unpack(bad)) end
local cutoff=nil
for _,k in ipairs(keys) do
local fresh=redis.call('EXISTS',k)==0
for _,f in ipairs(fields[k]) do
redis.call('HINCRBY',k,f,string.format('%d',sums[k][f]))
end
if fresh then
local h=heads[k]
redis.call('EXPIREAT',k,string.format('%d',h[3]))
redis.call('ZADD',KEYS[2],string.format('%d',h[2]),h[1])
if not cutoff or h[4]>cutoff then cutoff=h[4] end
end
end
if cutoff then
redis.call('ZREMRANGEBYSCORE',KEYS[2],'-inf',string.format('%d',cutoff))
end
return {{#recs,#bad}}
"""


@dataclass
class Folded:
    """What a ``fold_pending`` did: records taken off the pending list, and of them those
    rejected (moved to ``REJECTED_KEY``, not counted)."""

    records: int = 0
    rejected: int = 0


async def fold_pending(redis: Any, *, batch: int = FOLD_BATCH) -> Folded:
    """Add every pending record to its bucket, in script calls of up to ``batch`` records
    (1 to ``MAX_FOLD_BATCH``) until the list is empty. Safe to run anywhere, any number at
    once. ``redis``: a ``redis.asyncio.Redis``."""
    if not 1 <= batch <= MAX_FOLD_BATCH:
        raise ValueError(f"batch must be 1 to {MAX_FOLD_BATCH} records, got {batch}")
    script = redis.register_script(FOLD_SCRIPT)
    keys = [PENDING_KEY, INDEX_KEY, REJECTED_KEY]
    done = Folded()
    while True:
        taken, rejected = await script(keys=keys, args=[batch, f"{NAMESPACE}:"])
        done.records += taken
        done.rejected += rejected
        if taken < batch:
            return done


def ledger_problems(settings: Mapping[str, Any]) -> dict[str, str]:
    """Problems with ``usage_bucket`` and ``usage_retention`` (seconds), by setting name."""
    problems = {}
    bucket, retention = settings["usage_bucket"], settings["usage_retention"]
    if not (isinstance(bucket, int) and 60 <= bucket <= 86_400 and 86_400 % bucket == 0):
        problems["usage_bucket"] = (
            "must be a whole number of seconds from 60 to 86400 that divides a day "
            f"(60, 300, 900, 3600, 86400...), got {bucket!r}"
        )
    if not (isinstance(retention, int) and retention >= 1):
        problems["usage_retention"] = f"must be >= 1 second, got {retention!r}"
    return problems


# -- reading ---------------------------------------------------------------------------------

_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}


def parse_time(
    value: str | float | datetime, *, now: float | None = None, name: str = "time"
) -> float:
    """A point in time as Unix seconds, from a ``datetime`` (naive: UTC), Unix seconds, an ISO
    8601 text (``2026-12-06`` or ``2026-12-06T09:00``, UTC unless it says), or a duration
    ago (``90s``, ``30m``, ``24h``, ``7d``, ``2w``). ``ValueError`` naming ``name`` else."""
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a time, got {type(value).__name__}")
    text = value.strip()
    relative = _RELATIVE.fullmatch(text)
    if relative:
        ago = float(relative.group(1)) * _UNITS[relative.group(2)]
        return (time.time() if now is None else now) - ago
    try:
        return float(text)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{name} {value!r} is not a time: give an ISO date or time (2026-12-06, "
            "2026-12-06T09:00, UTC unless an offset is given), Unix seconds, or a duration "
            "ago (30m, 24h, 7d)"
        ) from None
    return parse_time(parsed)


@dataclass
class UsageRow:
    """Counters of one group (``tenant`` and/or ``adapter``; ``None``: not grouped by it)."""

    tenant: str | None = None
    adapter: str | None = None
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    engine_us: int = 0
    adapter_load_us: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class WasteRow:
    """Work one worker burnt on runs whose result was not delivered."""

    worker: str
    attempts: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    engine_us: int = 0


@dataclass
class UsageReport:
    """The ledger between ``since`` and ``until`` (Unix seconds): every bucket whose start is
    in ``[since, until)``, so the edges round to buckets. ``rows`` sorted by group."""

    since: float
    until: float
    by: tuple[str, ...]
    rows: list[UsageRow] = field(default_factory=list)
    waste: list[WasteRow] = field(default_factory=list)
    buckets: int = 0

    @property
    def total(self) -> UsageRow:
        """Every row added up (``tenant`` and ``adapter`` None)."""
        return _sum(self.rows, UsageRow())

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view: times in seconds next to the exact microseconds."""

        def row(r: UsageRow | WasteRow) -> dict[str, Any]:
            d = asdict(r)
            for key in [k for k in d if k.endswith("_us")]:
                d[key[:-3] + "_s"] = d[key] / 1_000_000
            return d

        return {
            "since": self.since,
            "until": self.until,
            "by": list(self.by),
            "buckets": self.buckets,
            "rows": [
                {k: v for k, v in row(r).items() if k not in _ungrouped(self.by)} for r in self.rows
            ],
            "total": {k: v for k, v in row(self.total).items() if k not in ("tenant", "adapter")},
            "waste": [row(w) for w in self.waste],
        }


def _ungrouped(by: tuple[str, ...]) -> set[str]:
    return {"tenant", "adapter"} - set(by)


def _sum(rows: Iterable[Any], into: Any) -> Any:
    for r in rows:
        for f in fields(into):
            if f.type == "int":
                setattr(into, f.name, getattr(into, f.name) + getattr(r, f.name))
    return into


def check_by(by: str | Iterable[str]) -> tuple[str, ...]:
    """``by`` as a grouping (``tenant``, ``adapter`` or ``tenant,adapter``)."""
    key = by if isinstance(by, str) else ",".join(by)
    key = key.replace(" ", "")
    if key == "adapter,tenant":
        key = "tenant,adapter"
    if key not in GROUPINGS:
        raise ValueError(f"by must be one of {', '.join(GROUPINGS)}, got {key!r}")
    return GROUPINGS[key]


async def read_usage(
    redis: Any,
    *,
    since: str | float | datetime | None = None,
    until: str | float | datetime | None = None,
    by: str | Iterable[str] = "tenant,adapter",
    now: float | None = None,
) -> UsageReport:
    """The ledger's counters between ``since`` (default: all kept) and ``until`` (default:
    now), grouped ``by`` tenant, adapter or both, with the waste per worker. ``redis`` is a
    ``redis.asyncio.Redis`` that may write (the pending counts are folded in first); times
    as ``parse_time`` reads them. ``ValueError`` for a bad argument, naming it."""
    group = check_by(by)
    now = time.time() if now is None else now
    lo = parse_time(since, now=now, name="since") if since is not None else 0.0
    hi = parse_time(until, now=now, name="until") if until is not None else now + 1
    if hi <= lo:
        raise ValueError(f"until ({hi:.0f}) must be after since ({lo:.0f})")
    await fold_pending(redis)
    members = await redis.zrangebyscore(INDEX_KEY, lo, f"({hi}")
    buckets = [m.decode() if isinstance(m, bytes) else m for m in members]
    async with redis.pipeline(transaction=False) as pipe:
        for member in buckets:
            size, start = (int(x) for x in member.split(":"))
            pipe.hgetall(usage_key(size, start))
            pipe.hgetall(waste_key(size, start))
        replies = await pipe.execute() if buckets else []
    rows: dict[tuple[str | None, ...], UsageRow] = {}
    waste: dict[str, WasteRow] = {}
    for usage, wasted in zip(replies[::2], replies[1::2], strict=True):
        for raw, value in usage.items():
            tenant, adapter, metric = _split(raw)
            if metric not in USAGE_METRICS:
                continue  # written by a newer build
            tenant = tenant or NO_TENANT
            adapter = adapter or BASE_ADAPTER
            key = (tenant if "tenant" in group else None, adapter if "adapter" in group else None)
            row = rows.setdefault(key, UsageRow(*key))
            setattr(row, metric, getattr(row, metric) + int(value))
        for raw, value in wasted.items():
            worker, _, metric = _split(raw)
            if metric not in WASTE_METRICS:
                continue
            w = waste.setdefault(worker, WasteRow(worker))
            setattr(w, metric, getattr(w, metric) + int(value))
    ordered = [rows[k] for k in sorted(rows, key=lambda k: tuple(x or "" for x in k))]
    return UsageReport(
        since=lo,
        until=hi,
        by=group,
        rows=ordered,
        waste=[waste[k] for k in sorted(waste)],
        buckets=len(buckets),
    )


def _split(raw: bytes | str) -> tuple[str, str, str]:
    """``(first, middle, metric)`` of a ledger field (an adapter name may hold the
    separator: the first and last parts never do)."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    first, _, rest = text.partition(SEP)
    middle, _, metric = rest.rpartition(SEP)
    return first, middle, metric
