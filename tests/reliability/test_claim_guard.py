"""``guard_claims``: a job claimed after a drain turned picking off is handed back unrun.

arq reads the queue, then claims each job it read; a drain that turns ``allow_pick_jobs``
off in between used to leave that claim standing, and the job ran one throw-away attempt
on the draining worker. Here a real arq ``Worker`` on a real Redis claims a queued job
after picking stopped: the job function must not run, no try may be counted, the claim
must be gone and the job still queued, so the next worker runs it as attempt 1.
"""

from __future__ import annotations

import asyncio

from arq import create_pool
from arq.connections import RedisSettings
from arq.constants import in_progress_key_prefix, retry_key_prefix
from arq.jobs import Job
from arq.worker import Worker, func

from lorafleet.worker.serve.arq_fixes import guard_claims

QUEUE = "lorafleet:test:claim-guard"


def test_a_claim_made_after_picking_stopped_is_handed_back_unrun(rel_redis):
    runs: list[int] = []

    async def job(ctx, n: int) -> int:
        runs.append(n)
        return n

    async def scenario():
        settings = RedisSettings.from_dsn(rel_redis.url)
        pool = await create_pool(settings)
        worker = Worker(
            functions=[func(job, name="job")],
            redis_pool=pool,
            queue_name=QUEUE,
            handle_signals=False,
        )
        guard_claims(worker)
        try:
            queued = await pool.enqueue_job("job", 7, _queue_name=QUEUE)
            job_id = queued.job_id
            worker.allow_pick_jobs = False  # the drain began after this poll read the queue
            await worker.start_jobs([job_id.encode()])
            await asyncio.gather(*worker.tasks.values())
            left = (
                await pool.exists(in_progress_key_prefix + job_id),
                await pool.get(retry_key_prefix + job_id),
                await pool.zscore(QUEUE, job_id),
                worker.job_counter,
            )
            worker.allow_pick_jobs = True  # a worker that picks runs it as its first try
            await worker.start_jobs([job_id.encode()])
            await asyncio.gather(*worker.tasks.values())
            info = await Job(job_id, pool, _queue_name=QUEUE).result_info()
            return left, info.job_try
        finally:
            await worker.close()

    (claimed, tries, score, slots), job_try = asyncio.run(scenario())
    assert claimed == 0 and tries is None and score is not None and slots == 0
    assert runs == [7] and job_try == 1
