"""Prefetch from the queue: while a worker's job slots are full, the jobs homed on it wait
in the queue; their adapters are read into its CPU cache meanwhile.

arq stops reading the queue while a worker holds ``max_jobs`` jobs, so routing's own poll
never sees those waiting jobs. ``QueuePrefetch`` looks at the queue's head every
``LOOK_S`` while the worker is full, asks the router which waiting jobs are this worker's
(homed here, adapter not held here nor by another worker, nobody running them yet), and
sends their adapters to the engine (``AsyncEngine.prefetch``), whose background thread
reads them while it steps (``lorafleet.worker.adapters.prefetch``). When such a job is
claimed, its adapter is a CPU cache hit.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from arq.utils import timestamp_ms
from arq.worker import Worker
from redis.exceptions import RedisError

from lorafleet.producer.types import LoRARequest
from lorafleet.worker.serve.background import BackgroundLoop

if TYPE_CHECKING:
    from lorafleet.worker.serve.routing import Router

logger = logging.getLogger(__name__)

#: Seconds between looks at the queue while the worker is full.
LOOK_S = 0.05
#: Jobs at the queue's head looked at (the ones claimed next).
LOOKAHEAD = 64


class QueuePrefetch(BackgroundLoop):
    """Reads ahead for ``worker`` (an arq worker routed by ``router``) through ``send``."""

    task_name = "prefetch"

    def __init__(
        self, worker: Worker, router: Router, send: Callable[[list[LoRARequest]], None]
    ) -> None:
        self._worker = worker
        self._router = router
        self._send = send
        self._asked: set[int] = set()  # adapters asked for since the worker was last full

    async def look(self) -> list[LoRARequest]:
        """One look at the queue: the adapters sent to the engine now (each once while the
        worker stays full)."""
        worker = self._worker
        if worker.job_counter < worker.max_jobs:
            self._asked.clear()  # it claims its own jobs itself now
            return []
        job_ids = await worker.pool.zrangebyscore(
            worker.queue_name, min=float("-inf"), max=timestamp_ms(), start=0, num=LOOKAHEAD
        )
        wanted = [
            lora
            for lora in await self._router.waiting_for_me(job_ids)
            if lora.lora_int_id not in self._asked
        ]
        if wanted:
            self._asked.update(lora.lora_int_id for lora in wanted)
            self._router.counters.prefetches_requested += len(wanted)
            self._send(wanted)
        return wanted

    async def run(self) -> None:
        while True:
            await asyncio.sleep(LOOK_S)
            try:
                await self.look()
            except (RedisError, OSError) as e:  # Redis away: look again later
                logger.debug("looking at the queue for prefetch failed: %r", e)
