"""Client-side job watching: one blocking XREAD for all of a client's jobs.

A ``StreamWatcher`` owns one dedicated Redis connection and keeps a single ``XREAD BLOCK``
open over the streams of every job the client is waiting on, so a thousand outstanding jobs
cost one connection, not a thousand. Registering a job while the read is blocked appends to
the client's private wake stream, which is part of the same XREAD and ends the block.

The stream's final event is the fast path to a result. arq's result key is the durable
record: about once a second the watcher also reads the result keys of jobs it has waited on
for a while, which answers jobs whose stream expired or that arq failed by itself (those
never write a stream event), and reports jobs that exist nowhere as ``job_not_found``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from lorafleet.producer.codec import JobResult, arq_deserialize, result_from_arq
from lorafleet.producer.errors import (
    JobNotFoundError,
    LoraFleetError,
    QueueUnavailableError,
)
from lorafleet.producer.keys import arq_job_key, arq_result_key, stream_key, wake_key
from lorafleet.producer.stream import FIELD, StreamEvent, decode_event

logger = logging.getLogger("lorafleet.producer")

REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)


class JobWatch:
    """What this client has seen of one job: the events of its latest attempt so far and,
    once known, its ``JobResult`` (or the transport error that ended the wait).

    Any number of readers may follow one watch; ``wait_beyond(n)`` wakes them all.
    """

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.events: list[StreamEvent] = []
        self.attempt = 0
        self.result: JobResult | None = None
        self.failure: LoraFleetError | None = None
        self.last_id = b"0-0"
        self.since = time.monotonic()
        self._waiter: asyncio.Future[None] | None = None

    @property
    def done(self) -> bool:
        return self.result is not None or self.failure is not None

    def add(self, event: StreamEvent) -> None:
        """Record an event; events of an attempt older than the newest seen are dropped."""
        if self.done or event.attempt < self.attempt:
            return
        self.attempt = event.attempt
        self.events.append(event)
        if event.result is not None:
            self.result = event.result
        self._notify()

    def resolve(self, result: JobResult) -> None:
        if not self.done:
            self.result = result
            self._notify()

    def fail(self, error: LoraFleetError) -> None:
        if not self.done:
            self.failure = error
            self._notify()

    def _notify(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        self._waiter = None

    async def wait_beyond(self, seen: int) -> None:
        """Return once there are more than ``seen`` events or the watch is done."""
        while len(self.events) <= seen and not self.done:
            if self._waiter is None:
                self._waiter = asyncio.get_running_loop().create_future()
            # shield: one reader being cancelled must not cancel the others' shared future
            await asyncio.shield(self._waiter)

    async def wait_done(self) -> JobResult:
        """The job's result; raises the transport error that ended the wait, if any."""
        while not self.done:
            await self.wait_beyond(len(self.events))
        if self.failure is not None:
            raise self.failure
        assert self.result is not None
        return self.result


class StreamWatcher:
    """Feeds ``JobWatch``es from Redis. Create one per client; ``close()`` when done.

    ``reader`` must be a dedicated connection (its XREAD blocks); ``pool`` serves the wake
    writes and result sweeps. A lost connection is retried for ``reconnect_s`` before every
    outstanding watch fails with ``QueueUnavailableError``.
    """

    def __init__(
        self,
        reader: aioredis.Redis,
        pool: aioredis.Redis,
        client_id: str,
        *,
        block_ms: int = 1000,
        sweep_s: float = 1.0,
        reconnect_s: float = 5.0,
    ) -> None:
        self._reader = reader
        self._pool = pool
        self._wake_key = wake_key(client_id)
        self._wake_last = b"0-0"
        self._block_ms = block_ms
        self._sweep_s = sweep_s
        self._reconnect_s = reconnect_s
        self._watches: dict[str, JobWatch] = {}
        self._has_work = asyncio.Event()
        self._blocked = False
        self._wake_sent = False
        self._next_sweep = 0.0
        self._task: asyncio.Task[None] | None = None

    async def watch(self, job_id: str, *, sweep_now: bool = False) -> JobWatch:
        """Start following ``job_id`` (from the beginning of its stream) and return its
        watch; an already followed job returns the same watch. ``sweep_now`` checks arq's
        result key at the next loop instead of waiting a sweep period (for jobs that may
        have finished long ago)."""
        existing = self._watches.get(job_id)
        if existing is not None:
            return existing
        watch = JobWatch(job_id)
        if sweep_now:
            watch.since -= self._sweep_s
            self._next_sweep = 0.0
        self._watches[job_id] = watch
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="lorafleet-stream-watcher")
        self._has_work.set()
        if self._blocked and not self._wake_sent:
            # The XREAD in flight does not name this job's stream yet: end its block.
            self._wake_sent = True
            async with self._pool.pipeline(transaction=False) as pipe:
                pipe.xadd(self._wake_key, {b"w": b"1"}, maxlen=16, approximate=True)
                pipe.expire(self._wake_key, 60)
                await pipe.execute()
        return watch

    def forget(self, job_id: str) -> None:
        """Stop following a job (its watch keeps what it has seen)."""
        self._watches.pop(job_id, None)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for watch in self._watches.values():
            watch.fail(QueueUnavailableError("the client was closed while waiting for the job"))
        self._watches.clear()

    async def _run(self) -> None:
        failing_since: float | None = None
        while True:
            if not self._watches:
                self._has_work.clear()
                await self._has_work.wait()
                continue
            try:
                await self._sweep_if_due()  # first: a `sweep_now` job may have no stream
                await self._read_once()
                failing_since = None
            except REDIS_ERRORS as e:
                now = time.monotonic()
                failing_since = failing_since or now
                if now - failing_since >= self._reconnect_s:
                    self._fail_all(e)
                    failing_since = None
                else:
                    await asyncio.sleep(0.1)

    async def _read_once(self) -> None:
        streams: dict[str | bytes, bytes] = {
            stream_key(job_id): w.last_id for job_id, w in self._watches.items()
        }
        streams[self._wake_key] = self._wake_last
        self._blocked, self._wake_sent = True, False
        try:
            response = await self._reader.xread(streams, block=self._block_ms)
        finally:
            self._blocked = False
        for key, entries in response or ():
            key = key.decode() if isinstance(key, bytes) else key
            if key == self._wake_key:
                self._wake_last = entries[-1][0]
                continue
            job_id = key.split(":", 2)[2]
            watch = self._watches.get(job_id)
            if watch is None:
                continue
            for entry_id, fields in entries:
                watch.last_id = entry_id
                self._dispatch(watch, fields.get(FIELD))
            if watch.done:
                self.forget(job_id)

    def _dispatch(self, watch: JobWatch, data: bytes | None) -> None:
        if data is None:
            return
        try:
            watch.add(decode_event(data))
        except LoraFleetError as e:  # a foreign or newer writer: skip the entry, keep reading
            logger.warning("job %s: skipping stream entry: %s", watch.job_id, e)

    async def _sweep_if_due(self) -> None:
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + self._sweep_s
        due = [w for w in self._watches.values() if now - w.since >= self._sweep_s]
        if not due:
            return
        # MULTI: arq swaps the job key for the result key atomically, so reading both in
        # one transaction can never see a finishing job as missing.
        async with self._pool.pipeline(transaction=True) as pipe:
            for w in due:
                pipe.get(arq_result_key(w.job_id))
                pipe.exists(arq_job_key(w.job_id))
            replies = await pipe.execute()
        for i, w in enumerate(due):
            envelope, queued = replies[2 * i], replies[2 * i + 1]
            if envelope is not None:
                w.resolve(result_from_arq(w.job_id, arq_deserialize(envelope)))
            elif not queued:
                w.fail(JobNotFoundError(f"job {w.job_id} is not in the queue and has no result"))
            if w.done:
                self.forget(w.job_id)

    def _fail_all(self, error: BaseException) -> None:
        logger.warning("lost Redis while waiting for %d jobs: %s", len(self._watches), error)
        for watch in self._watches.values():
            watch.fail(QueueUnavailableError(f"lost the connection to Redis: {error}"))
        self._watches.clear()
