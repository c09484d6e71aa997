"""A worker's retries of Redis commands, said out loud.

A worker retries every Redis command until Redis answers (``WorkerConfig.redis_settings``),
so it waits out a Redis that is not up yet or restarts. Silently, that looks like a hung
worker. ``OutageRetry`` is redis-py's ``Retry`` that logs when an outage starts (with the
URL, password masked), every ``REMIND_S`` while it lasts, and when Redis is back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from redis.asyncio.retry import Retry
from redis.backoff import AbstractBackoff

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds between the lines of one outage.
REMIND_S = 10.0


class OutageRetry(Retry):
    """``Retry`` forever (``retries=-1``) with lines about the outage; one instance is
    shared by every connection of a pool, so an outage is one story, not one per command."""

    def __init__(self, backoff: AbstractBackoff, url: str, **kwargs: Any) -> None:
        super().__init__(backoff, retries=-1, **kwargs)
        self.url = url
        self.down_since: float | None = None
        self._last_line = 0.0

    def __deepcopy__(self, memo: dict) -> OutageRetry:
        # redis-py deep-copies the retry into every connection; the outage is the pool's,
        # and the backoff it holds is stateless, so every connection shares this one.
        return self

    async def call_with_retry(
        self, do: Callable[[], Awaitable[T]], fail: Callable[[Exception], Any]
    ) -> T:
        async def failed(error: Exception) -> Any:
            self._note_failure(error)
            return await fail(error)

        result = await super().call_with_retry(do, failed)
        if self.down_since is not None:
            logger.info(
                "Redis at %s is back after %.1fs", self.url, time.monotonic() - self.down_since
            )
            self.down_since = None
        return result

    def _note_failure(self, error: Exception) -> None:
        now = time.monotonic()
        reason = f"{type(error).__name__}: {error}".rstrip(": ")
        if self.down_since is None:
            self.down_since = self._last_line = now
            logger.warning(
                "waiting for Redis at %s (%s); retrying until it answers", self.url, reason
            )
        elif now - self._last_line >= REMIND_S:
            self._last_line = now
            logger.warning(
                "still waiting for Redis at %s after %.0fs (%s)",
                self.url,
                now - self.down_since,
                reason,
            )
