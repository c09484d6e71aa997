"""Workarounds for two gaps of arq 0.28 (in maintenance mode; lorafleet pins ``arq<0.29``).

- arq passes its hooks only ``ctx``, never the ``Worker``; the heartbeat and the drain need
  it. ``current_arq_worker`` finds it from inside ``on_startup``.
- arq claims a job with ``WATCH`` + ``MULTI``. redis-py rightly refuses to retry a command
  on a connection whose ``WATCH`` was lost, and raises ``WatchError`` from ``EXISTS``, where
  arq does not expect it: the error ends arq's main loop and the worker exits on a Redis
  restart (seen in the reliability tests). ``survive_lost_claims`` makes a failed claim a
  skipped one: the job stays in the queue and is claimed on a later poll.
"""

from __future__ import annotations

import asyncio
import logging

from arq.worker import Worker
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import WatchError

logger = logging.getLogger("lorafleet.worker")

#: What a claim can fail with when the connection to Redis goes away mid-way.
LOST_CONNECTION_ERRORS = (WatchError, RedisConnectionError, RedisTimeoutError, OSError)


def current_arq_worker() -> Worker:
    """The arq ``Worker`` running the current ``on_startup`` hook.

    The hook is awaited from the worker's main task, whose coroutine is ``Worker.main``;
    its frame holds ``self``. Raises ``RuntimeError`` when not called from a hook of an
    arq worker.
    """
    task = asyncio.current_task()
    frame = getattr(task.get_coro(), "cr_frame", None) if task is not None else None
    worker = frame.f_locals.get("self") if frame is not None else None
    if not isinstance(worker, Worker):
        raise RuntimeError("lorafleet's startup must run as the on_startup hook of an arq worker")
    return worker


def survive_lost_claims(worker: Worker) -> None:
    """Make ``worker.start_jobs`` skip, not crash on, a claim cut off by a lost connection.

    arq's ``start_jobs`` takes a job slot (its counter and semaphore) before the first Redis
    command of a claim and gives it back only on the outcomes it expects, so a connection
    error always leaves exactly one slot taken: it is given back here. If the claim reached
    Redis before the reply was lost, nobody runs the job until the claim lapses (one
    heartbeat TTL), then it runs as usual.
    """
    start_jobs = worker.start_jobs

    async def start_jobs_surviving(job_ids: list[bytes]) -> None:
        try:
            await start_jobs(job_ids)
        except LOST_CONNECTION_ERRORS as e:
            worker.job_counter -= 1
            worker.sem.release()
            logger.warning(
                "claiming a job failed (%s: %s); retrying on the next poll", type(e).__name__, e
            )

    worker.start_jobs = start_jobs_surviving  # type: ignore[method-assign]
