"""Workarounds for gaps of arq 0.28 (in maintenance mode; lorafleet pins ``arq<0.29``).

- arq passes its hooks only ``ctx``, never the ``Worker``; the heartbeat and the drain need
  it. ``current_arq_worker`` finds it from inside ``on_startup``.
- arq claims a job with ``WATCH`` + ``MULTI``. redis-py rightly refuses to retry a command
  on a connection whose ``WATCH`` was lost, and raises ``WatchError`` from ``EXISTS``, where
  arq does not expect it: the error ends arq's main loop and the worker exits on a Redis
  restart (seen in the reliability tests). ``guard_claims`` makes a failed claim a skipped
  one: the job stays in the queue and is claimed on a later poll.
- arq checks ``allow_pick_jobs`` before it reads the queue, not before each claim: a poll
  under way when a drain turns picking off still claims what it read, including a job the
  drain has just cancelled and re-queued. That job then ran a throw-away attempt on the
  draining worker before the next worker ran it again (seen in CI: attempts 1, 2 and 3
  where 1 and 2 were expected). ``guard_claims`` hands such a late claim straight back.
"""

from __future__ import annotations

import asyncio
import logging

from arq.constants import in_progress_key_prefix
from arq.worker import Worker
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import WatchError

logger = logging.getLogger(__name__)

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


def guard_claims(worker: Worker) -> None:
    """Patch ``worker.start_jobs`` and ``worker.run_job`` as the module docstring says.

    A claim cut off by a lost connection: arq's ``start_jobs`` takes a job slot (its counter
    and semaphore) before the first Redis command of a claim and gives it back only on the
    outcomes it expects, so a connection error always leaves exactly one slot taken; it is
    given back here. If the claim reached Redis before the reply was lost, nobody runs the
    job until the claim lapses (one heartbeat TTL), then it runs as usual.

    A claim made after picking was turned off: the job's run is skipped before arq counts a
    try or reads the job, and the claim is deleted, so the job is at once free for another
    worker, at the attempt it would have had.
    """
    start_jobs, run_job = worker.start_jobs, worker.run_job

    async def start_jobs_surviving(job_ids: list[bytes]) -> None:
        try:
            await start_jobs(job_ids)
        except LOST_CONNECTION_ERRORS as e:
            worker.job_counter -= 1
            worker.sem.release()
            logger.warning(
                "claiming a job failed (%s: %s); retrying on the next poll", type(e).__name__, e
            )

    async def run_job_if_picking(job_id: str, score: int) -> None:
        if not worker.allow_pick_jobs:
            await worker.pool.delete(in_progress_key_prefix + job_id)
            logger.info("job %s claimed after picking stopped: handed back unrun", job_id)
            return
        await run_job(job_id, score)

    worker.start_jobs = start_jobs_surviving  # type: ignore[method-assign]
    worker.run_job = run_job_if_picking  # type: ignore[method-assign]
