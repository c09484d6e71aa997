"""Saying so when requests wait for an adapter slot for long.

A step holds at most ``max_loras`` distinct adapters; a request whose adapter has no slot
waits until a running request frees one. Short waits are the price of adapter-grouped
batching; long ones mean ``max_loras`` is too small for the adapters in demand, which shows
as a fat tail of time to first token and nothing else. The metric
``lorafleet_requests_waiting_for_adapter_slot`` shows it on the dashboard; this watch
writes a warning when it has lasted ``PERSIST_S``, at most every ``REPEAT_S``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from lorafleet.worker.serve.background import BackgroundLoop

if TYPE_CHECKING:
    from lorafleet.worker.process.async_engine import AsyncEngine

logger = logging.getLogger(__name__)

#: Seconds of uninterrupted waiting before a warning.
PERSIST_S = 10.0
#: Seconds between two warnings of one long contention.
REPEAT_S = 60.0
#: Seconds between looks at the engine's snapshot.
CHECK_S = 1.0


class SlotContentionWatch(BackgroundLoop):
    """Reads the engine's snapshot every ``CHECK_S`` and warns about long slot waits."""

    task_name = "slot-contention"

    def __init__(self, engine: AsyncEngine, max_loras: int) -> None:
        self.engine = engine
        self.max_loras = max_loras
        self.since: float | None = None
        self.warned_at: float | None = None

    async def run(self) -> None:
        while True:
            await asyncio.sleep(CHECK_S)
            self.check(self.engine.snapshot.waiting_for_slot, time.monotonic())

    def check(self, waiting: int, now: float) -> bool:
        """Note ``waiting`` requests waiting for a slot at ``now``; True if it warned."""
        if waiting == 0:
            self.since = self.warned_at = None
            return False
        self.since = self.since or now
        lasted = now - self.since
        if lasted < PERSIST_S or (self.warned_at is not None and now - self.warned_at < REPEAT_S):
            return False
        self.warned_at = now
        logger.warning(
            "%d requests have waited %.0fs for an adapter slot: all %d slots are held by "
            "running requests on other adapters; raise --max-loras (LORAFLEET_MAX_LORAS) "
            "if the device has memory for more",
            waiting,
            lasted,
            self.max_loras,
            extra={"waiting_for_slot": waiting, "seconds": round(lasted, 1)},
        )
        return True
