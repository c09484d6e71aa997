"""Graceful drain on SIGTERM (and SIGINT): finish what runs, hand back what has not started.

arq's own handler cancels every job at once and re-queues it as its next attempt, so a
rolling restart throws away all work in flight and a streaming client sees its text start
over. A ``Drain`` replaces it once the worker is up:

1. stop taking jobs from the queue;
2. hand back at once the jobs that have produced no output yet (waiting for room in the
   engine): their task is cancelled, arq deletes the claim and the job, still in the queue
   with its original payload and place, is free for another worker. The try arq counted
   for it is given back, so the next run is the same attempt and nothing anyone could see
   happened ("untouched");
3. let the jobs that are generating finish, for up to ``grace`` seconds;
4. then stop: jobs still running are cancelled and re-queued as their next attempt
   (clients following their stream restart at that attempt), and the worker closes once
   arq has recorded every job's outcome.

Step 4 is not arq's ``handle_sig``: that cancels arq's per-job tasks even while they write
a finished job's result (``asyncio.shield`` protects the write, not the task), which fails
arq's close, skips ``on_shutdown`` and can leave a finished job to run again. Cancelling the
job coroutines alone lets arq record each outcome before the worker closes.

A second signal during the grace period skips the rest of it; signals after that are
ignored (arq is already stopping, and cancelling its clean-up would leave claims behind). A
signal that arrives while the engine is still loading gets arq's default (there is nothing
to drain yet).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from arq.constants import retry_key_prefix
from arq.worker import Worker

logger = logging.getLogger(__name__)


@dataclass
class TrackedJob:
    """One running job. ``started``: it produced output, so handing it back would show."""

    job_id: str
    task: asyncio.Task[Any]
    started: bool = False
    released: bool = False


class JobTracker:
    """The jobs this worker's ``generate`` is running, for the drain. Counters are for the
    registry entry (see ``lorafleet.worker.serve.heartbeat``)."""

    def __init__(self, redis: Any) -> None:
        self._redis = redis
        self._jobs: dict[asyncio.Task[Any], TrackedJob] = {}
        self.released = 0
        self.sent_to_engine = 0

    @contextlib.asynccontextmanager
    async def track(self, job_id: str) -> AsyncIterator[TrackedJob]:
        """Track the current task as job ``job_id`` inside the block. If a drain releases
        it, the block ends with ``CancelledError`` after the job's try was given back."""
        task = asyncio.current_task()
        assert task is not None
        job = self._jobs[task] = TrackedJob(job_id, task)
        try:
            yield job
        except asyncio.CancelledError:
            if job.released:
                # arq counted this run when it started it; the claim is still ours (arq
                # deletes it after this task ends), so no other worker has run it since.
                await self._redis.decr(retry_key_prefix + job_id)
            raise
        finally:
            del self._jobs[task]

    def release_unstarted(self) -> None:
        """Cancel every tracked job that has produced no output (once each)."""
        for job in self._jobs.values():
            if not job.started and not job.released:
                job.released = True
                job.task.cancel()
                self.released += 1


class Drain:
    """SIGTERM/SIGINT handling for one arq worker. ``install()`` from ``on_startup``;
    ``on_start`` is called when a drain begins (e.g. to mark the worker as draining)."""

    def __init__(
        self, worker: Worker, jobs: JobTracker, *, grace: float, on_start: Callable[[], None]
    ) -> None:
        self._worker = worker
        self._jobs = jobs
        self._grace = grace
        self._on_start = on_start
        self._task: asyncio.Task[None] | None = None
        self._stopper: asyncio.Task[None] | None = None

    def install(self) -> None:
        """Take SIGTERM and SIGINT over from arq (``add_signal_handler`` replaces its
        handlers)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    @property
    def _stopping(self) -> bool:
        return self._stopper is not None

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._stopping:
            logger.info("%s: already stopping", sig.name)
        elif self._task is not None:
            logger.warning("%s again: stopping now; running jobs go back to the queue", sig.name)
            self._stopper = asyncio.get_running_loop().create_task(self._stop())
        else:
            self._task = asyncio.get_running_loop().create_task(self._drain(sig))

    async def _stop(self) -> None:
        """Cancel the job coroutines still running (arq re-queues each), wait until arq has
        recorded every outcome, then end arq's main loop (arq then closes the worker)."""
        worker = self._worker
        worker.allow_pick_jobs = False
        while self._busy():
            # Jobs arq is still starting reach job_tasks on a later round. A job cancelled
            # once (e.g. released by the drain) is left to finish its clean-up.
            for task in list(worker.job_tasks.values()):
                if not task.cancelling():
                    task.cancel()
            await asyncio.sleep(0.05)
        if worker.main_task is not None:
            worker.main_task.cancel()

    def _busy(self) -> bool:
        return any(not task.done() for task in self._worker.tasks.values())

    async def _drain(self, sig: signal.Signals) -> None:
        worker = self._worker
        worker.allow_pick_jobs = False
        self._on_start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._grace
        logger.info("%s: draining for up to %gs", sig.name, self._grace)
        # Jobs arq was still starting when the signal came are released on a later round.
        while self._busy() and loop.time() < deadline and not self._stopping:
            self._jobs.release_unstarted()
            await asyncio.sleep(0.05)
        if self._stopping:  # a second signal cut the grace period short
            return
        left = sum(not task.done() for task in worker.tasks.values())
        logger.info(
            "drain over: %d jobs handed back unstarted, %d still running go back to the queue",
            self._jobs.released,
            left,
        )
        self._stopper = asyncio.current_task()
        await self._stop()
