"""Worker side of aborts: turn a producer's abort into a call to the job's callback.

A producer sets ``lorafleet:abort:{job_id}`` and publishes the id on ``lorafleet:abort``.
A job registers a callback before it starts generating and then checks the key once, so an
abort is seen whether it came before the job started (the key) or while it runs (the
message). After every (re)subscription, e.g. when Redis comes back, the keys of all
registered jobs are read again, so an abort sent during an outage is not lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from lorafleet.producer.keys import ABORT_CHANNEL, abort_key
from lorafleet.worker.serve.background import stop_task

logger = logging.getLogger(__name__)


class AbortWatcher:
    """Dispatches aborts to the registered jobs of this worker. ``start()`` before use."""

    def __init__(self, redis) -> None:
        self._redis = redis
        self._callbacks: dict[str, Callable[[], None]] = {}
        self._task: asyncio.Task[None] | None = None
        # Start-up checks of jobs starting together share one MGET (group commit).
        self._pending: dict[str, asyncio.Future[bool]] = {}
        self._checker: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen_forever(), name="lorafleet-aborts")

    async def close(self) -> None:
        await stop_task(self._task)

    async def register(self, job_id: str, on_abort: Callable[[], None]) -> bool:
        """Call ``on_abort`` (once) when the job is aborted. Returns whether it already was,
        in which case ``on_abort`` is not called. Jobs registering together share one read
        of their abort keys."""
        self._callbacks[job_id] = on_abort
        checked = self._pending[job_id] = asyncio.get_running_loop().create_future()
        if self._checker is None or self._checker.done():
            self._checker = asyncio.create_task(self._check_pending())
        if await checked:
            self._callbacks.pop(job_id, None)
            return True
        return False

    async def _check_pending(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, {}
            try:
                flags = await self._redis.mget([abort_key(j) for j in batch])
            except Exception as e:
                for future in batch.values():
                    if not future.done():  # done: its job was cancelled meanwhile
                        future.set_exception(e)
                continue
            for future, flag in zip(batch.values(), flags, strict=True):
                if not future.done():
                    future.set_result(flag is not None)

    def unregister(self, job_id: str) -> None:
        self._callbacks.pop(job_id, None)

    def _fire(self, job_id: str) -> None:
        callback = self._callbacks.pop(job_id, None)
        if callback is not None:
            callback()

    async def _resync(self) -> None:
        job_ids = list(self._callbacks)
        if job_ids:
            flags = await self._redis.mget([abort_key(j) for j in job_ids])
            for job_id, flag in zip(job_ids, flags, strict=True):
                if flag is not None:
                    self._fire(job_id)

    async def _listen_forever(self) -> None:
        while True:
            try:
                await self._listen()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("abort listener failed; resubscribing in 1 s")
                await asyncio.sleep(1.0)

    async def _listen(self) -> None:
        pubsub = self._redis.pubsub()
        try:
            await pubsub.subscribe(ABORT_CHANNEL)
            async for message in pubsub.listen():
                if message["type"] == "subscribe":  # first subscription or a reconnect
                    await self._resync()
                elif message["type"] == "message":
                    self._fire(message["data"].decode())
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
