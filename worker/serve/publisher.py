"""Worker side of the token streams: group-commit of every job's events.

Jobs hand their deltas to one ``StreamPublisher`` without waiting. A single flusher task
writes everything pending in one pipeline (XADD + EXPIRE per job) and, while that round
trip is in flight, new deltas of a job merge into one pending event. A lone request gets
each delta out immediately (one round trip of latency); a full batch of N requests costs one
pipeline per engine step instead of N round trips.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from lorafleet.producer.codec import WIRE_VERSION, JobResult
from lorafleet.producer.stream import (
    DEFAULT_MAXLEN,
    DEFAULT_TTL_S,
    StreamEvent,
    add_event,
    add_reply,
)
from lorafleet.worker.serve.background import stop_task

logger = logging.getLogger(__name__)


@dataclass
class _Pending:
    """The next event of one job, still accepting deltas."""

    attempt: int
    v: int  # the wire version the job came in, which its events are written in
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    result: JobResult | None = None
    reply_to: str | None = None  # the producer's inbox, for the final event
    written: asyncio.Future[None] | None = None  # set for the final event
    # Writes that land in the final event's transaction (the usage ledger's, the quota's).
    writes: Sequence[Atomic] = ()


class Atomic(Protocol):
    """A write that must land atomically with a job's final event. A flush hands every
    write of one kind to that kind's ``queue_all`` at once (one script call for all, say)."""

    @staticmethod
    def queue_all(pipe: Any, writes: Sequence[Any]) -> None: ...


class StreamPublisher:
    """Writes ``StreamEvent``s of all jobs of this worker. ``start()`` before use.

    ``redis`` should retry on connection errors (the worker's does, forever): a flush then
    waits out a Redis outage instead of dropping events.
    """

    def __init__(
        self,
        redis,
        *,
        maxlen: int = DEFAULT_MAXLEN,
        ttl_s: int = DEFAULT_TTL_S,
        worker: str | None = None,
    ) -> None:
        self._redis = redis
        self._worker = worker  # named on each attempt's first event
        self._maxlen = maxlen
        self._ttl_s = ttl_s
        self._pending: dict[str, _Pending] = {}
        self._seq: dict[str, tuple[int, int]] = {}  # job id -> (attempt, next seq)
        self._work = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._flush_forever(), name="lorafleet-publisher")

    async def close(self) -> None:
        await stop_task(self._task)
        for pending in self._pending.values():
            if pending.written is not None and not pending.written.done():
                pending.written.set_exception(RuntimeError("stream publisher closed"))

    def _slot(self, job_id: str, attempt: int, v: int) -> _Pending:
        pending = self._pending.get(job_id)
        if pending is None or pending.attempt != attempt:
            pending = self._pending[job_id] = _Pending(attempt, v)
        return pending

    def delta(
        self, job_id: str, attempt: int, text: str, token_ids: list[int], v: int = WIRE_VERSION
    ) -> None:
        """Queue new text of a running job (never blocks), as an event of wire version
        ``v`` (the job's: an older producer reads its own version)."""
        pending = self._slot(job_id, attempt, v)
        pending.text.append(text)
        pending.token_ids.extend(token_ids)
        self._work.set()

    async def finish(
        self,
        job_id: str,
        attempt: int,
        result: JobResult,
        *,
        reply_to: str | None = None,
        writes: Sequence[Atomic] = (),
    ) -> None:
        """Queue the final event (with any delta still pending), also for the producer's
        inbox ``reply_to``, and wait until written; it has the wire version of ``result``.
        ``writes`` are queued in the same MULTI/EXEC transaction as the event and the reply:
        all of them land or none."""
        pending = self._slot(job_id, attempt, result.v)
        pending.result = result
        pending.reply_to = reply_to
        pending.writes = writes
        pending.written = asyncio.get_running_loop().create_future()
        self._work.set()
        await asyncio.shield(pending.written)

    def forget(self, job_id: str) -> None:
        """Drop a job that ends without a final event (cancelled): its unsent deltas and
        its sequence counter."""
        self._pending.pop(job_id, None)
        self._seq.pop(job_id, None)

    def _event(self, job_id: str, pending: _Pending) -> StreamEvent:
        attempt, seq = self._seq.get(job_id, (pending.attempt, 0))
        if attempt != pending.attempt:
            seq = 0
        if pending.result is None:
            self._seq[job_id] = (pending.attempt, seq + 1)
        else:
            self._seq.pop(job_id, None)
        return StreamEvent(
            attempt=pending.attempt,
            seq=seq,
            text="".join(pending.text),
            token_ids=pending.token_ids,
            result=pending.result,
            v=pending.v,
            worker=self._worker if seq == 0 else None,
        )

    async def _flush_forever(self) -> None:
        while True:
            await self._work.wait()
            self._work.clear()
            batch, self._pending = self._pending, {}
            try:
                await self._write(batch)
            except Exception as e:  # never kill the flusher: the jobs report the failure
                logger.exception("writing %d stream events failed", len(batch))
                for pending in batch.values():
                    if pending.written is not None and not pending.written.done():
                        pending.written.set_exception(e)
            else:
                for pending in batch.values():
                    if pending.written is not None and not pending.written.done():
                        pending.written.set_result(None)

    async def _write(self, batch: dict[str, _Pending]) -> None:
        writes: dict[type, list[Atomic]] = {}
        for pending in batch.values():
            for write in pending.writes:
                writes.setdefault(type(write), []).append(write)
        # A transaction only when writes ride along: deltas alone need none.
        async with self._redis.pipeline(transaction=bool(writes)) as pipe:
            for kind, group in writes.items():
                kind.queue_all(pipe, group)
            for job_id, pending in batch.items():
                event = self._event(job_id, pending)
                add_event(pipe, job_id, event, maxlen=self._maxlen, ttl_s=self._ttl_s)
                if pending.reply_to is not None:
                    add_reply(pipe, pending.reply_to, job_id, event, ttl_s=self._ttl_s)
            await pipe.execute()
