"""Client-side job watching: one blocking XREAD per client, whatever the number of jobs.

Each client has an inbox stream (``lorafleet:inbox:{client_id}``) and names it in every job
it submits; workers append each job's final event there. A ``StreamWatcher`` keeps one
``XREAD BLOCK`` open on a dedicated connection over the inbox plus the streams of the few
jobs whose tokens someone is following (``follow``) or that were submitted elsewhere (their
replies go to another inbox). Waiting on a thousand results therefore costs one key per
read, not a thousand. A key added while the read is blocked is picked up by appending to
the inbox, which ends the block.

The final event is the fast path to a result. arq's result key is the durable record:
about once a second the watcher reads the result keys of jobs it has waited on for a
while, which answers jobs whose reply was lost (trimmed, expired, Redis restarted) or that
arq failed by itself (those never write an event), and reports jobs that exist nowhere as
``job_not_found``.
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
    InternalError,
    JobNotFoundError,
    LoraFleetError,
    QueueUnavailableError,
)
from lorafleet.producer.keys import arq_job_key, arq_result_key, inbox_key, stream_key
from lorafleet.producer.stream import DEFAULT_TTL_S, FIELD, JOB_FIELD, StreamEvent, decode_event

logger = logging.getLogger(__name__)

REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)


class JobWatch:
    """What this client has seen of one job: the events of its latest attempt so far and,
    once known, its ``JobResult`` (or the transport error that ended the wait).

    Any number of readers may follow one watch; ``wait_beyond(n)`` wakes them all.
    ``via_inbox``: the job replies to this client's inbox, so its own stream needs reading
    only while ``followers`` want its tokens.
    """

    def __init__(self, job_id: str, *, via_inbox: bool) -> None:
        self.job_id = job_id
        self.via_inbox = via_inbox
        self.followers = 0
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

    @property
    def reads_stream(self) -> bool:
        return self.followers > 0 or not self.via_inbox

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


class Following:
    """``StreamWatcher.follow``'s context. A class rather than an ``asynccontextmanager``:
    that one runs on an async generator of its own, which asyncio's shutdown may close
    before the generator inside it (it closes every live one at once, in no order), and
    leaving the block then raises ``RuntimeError``."""

    def __init__(self, watcher: StreamWatcher, watch: JobWatch) -> None:
        self._watcher = watcher
        self._watch = watch

    async def __aenter__(self) -> None:
        watch = self._watch
        watch.followers += 1
        if watch.followers == 1 and watch.via_inbox and not watch.done:
            try:
                await self._watcher._wake()
            except BaseException:
                watch.followers -= 1
                raise

    async def __aexit__(self, *exc: object) -> None:
        self._watch.followers -= 1


class StreamWatcher:
    """Feeds ``JobWatch``es from Redis. Create one per client; ``close()`` when done.

    ``reader`` must be a dedicated connection (its XREAD blocks); ``pool`` serves the inbox
    writes and result sweeps. A lost connection is retried for ``reconnect_s`` before every
    outstanding watch fails with ``QueueUnavailableError``.
    """

    #: How often ``close()`` repeats a cancellation that did not end the reading task.
    CANCEL_RETRY_S = 0.05

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
        self.inbox = inbox_key(client_id)
        self._inbox_last = b"0-0"
        self._block_ms = block_ms
        self._sweep_s = sweep_s
        self._reconnect_s = reconnect_s
        self._watches: dict[str, JobWatch] = {}
        self._has_work = asyncio.Event()
        self._blocked = False
        self._wake_sent = False
        self._next_sweep = 0.0
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def watch(self, job_id: str, *, via_inbox: bool, sweep_now: bool = False) -> JobWatch:
        """Start following ``job_id`` and return its watch (an already followed job returns
        the same watch). ``via_inbox``: the job replies to this client's inbox.
        ``sweep_now`` checks arq's result key at once instead of after a sweep period (for
        jobs that may have finished long ago). Raises ``QueueUnavailableError`` once
        ``close()`` has begun: a closed watcher starts no reads."""
        if self._closed:
            raise QueueUnavailableError(f"the client was closed before job {job_id} was watched")
        watch = self._watches.get(job_id)
        if watch is not None:
            return watch
        watch = self._watches[job_id] = JobWatch(job_id, via_inbox=via_inbox)
        if sweep_now:
            watch.since -= self._sweep_s
            self._next_sweep = 0.0
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="lorafleet-stream-watcher")
        self._has_work.set()
        if watch.reads_stream or sweep_now:
            await self._wake()
        return watch

    def follow(self, watch: JobWatch) -> Following:
        """An async context manager: read the job's own stream (its tokens) while inside."""
        return Following(self, watch)

    async def _wake(self) -> None:
        """End the XREAD in flight so that the next one names the current keys."""
        if self._blocked and not self._wake_sent and not self._closed:
            self._wake_sent = True
            async with self._pool.pipeline(transaction=False) as pipe:
                pipe.xadd(self.inbox, {b"w": b"1"}, maxlen=1000, approximate=True)
                pipe.expire(self.inbox, DEFAULT_TTL_S)
                await pipe.execute()

    def forget(self, job_id: str) -> None:
        """Stop following a job (its watch keeps what it has seen)."""
        self._watches.pop(job_id, None)

    async def close(self) -> None:
        """Stop reading, fail the watches still open with ``QueueUnavailableError`` and
        delete the inbox. Returns once the reading task has ended; idempotent.

        Closing is deliberate, so the watches it fails are not logged (a lost connection's
        are)."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            # One cancel() is not always enough: redis-py can swallow it. Its socket writes
            # run under asyncio.wait_for, and on Python 3.11 wait_for returns the write's
            # result instead of raising CancelledError when the write finished in the loop
            # turn that the cancellation arrived in (CPython gh-86296). That is the usual
            # case, not a rare race: right after handing a delta to its reader, the task
            # sends its next XREAD, so a reader that closes the client on that delta
            # cancels exactly then. The task would then read on forever (or sleep on
            # `_has_work`), and awaiting it hung. So cancel until it has ended.
            while not task.done():
                task.cancel()
                await asyncio.wait([task], timeout=self.CANCEL_RETRY_S)
        closed = QueueUnavailableError("the client was closed while waiting for the job")
        self._fail_all(closed, quietly=True)
        with contextlib.suppress(*REDIS_ERRORS):
            await self._pool.delete(self.inbox)

    async def _run(self) -> None:
        failing_since: float | None = None
        while not self._closed:
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
                    why = e or type(e).__name__
                    self._fail_all(QueueUnavailableError(f"lost the connection to Redis: {why}"))
                    failing_since = None
                else:
                    await asyncio.sleep(0.1)
            except Exception as e:  # a bug here must not leave every waiter hanging
                logger.exception("stream watcher failed")
                self._fail_all(InternalError(f"stream watcher failed: {e!r}"))

    async def _read_once(self) -> None:
        streams: dict[str | bytes, bytes] = {
            stream_key(w.job_id): w.last_id for w in self._watches.values() if w.reads_stream
        }
        streams[self.inbox] = self._inbox_last
        self._blocked, self._wake_sent = True, False
        try:
            response = await self._reader.xread(streams, block=self._block_ms)
        finally:
            self._blocked = False
        inbox = self.inbox.encode()
        # Job streams before the inbox: a final event read from the inbox first would end
        # the watch before its last deltas.
        for key, entries in sorted(response or (), key=lambda item: item[0] == inbox):
            if key == inbox:
                self._inbox_last = entries[-1][0]
                for _, fields in entries:
                    job_id = fields.get(JOB_FIELD)
                    if job_id is not None:
                        self._dispatch(self._watches.get(job_id.decode()), fields.get(FIELD))
                continue
            watch = self._watches.get(key.decode().split(":", 2)[2])
            if watch is not None:
                watch.last_id = entries[-1][0]
                for _, fields in entries:
                    self._dispatch(watch, fields.get(FIELD))

    def _dispatch(self, watch: JobWatch | None, data: bytes | None) -> None:
        if watch is None or data is None:
            return
        try:
            watch.add(decode_event(data))
        except LoraFleetError as e:  # a foreign or newer writer: skip the entry, keep reading
            logger.warning("job %s: skipping stream entry: %s", watch.job_id, e)
        if watch.done:
            self.forget(watch.job_id)

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

    def _fail_all(self, error: LoraFleetError, *, quietly: bool = False) -> None:
        """Fail and forget every watch, each with its own instance of ``error``; logged
        unless ``quietly`` (a deliberate close)."""
        if self._watches and not quietly:
            logger.warning("giving up on %d jobs: %s", len(self._watches), error)
        for watch in self._watches.values():
            watch.fail(type(error)(error.message))  # one instance per waiter: own traceback
        self._watches.clear()
