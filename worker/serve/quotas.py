"""The worker's side of tenant quotas (rules: ``lorafleet.producer.quotas``): the check when
it takes a job, and the job's release with its final event.

Which tenants have a quota is read from Redis at most once a second (``QuotaTenants``), so
a job of a tenant without one costs no round trip at take.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lorafleet.producer.codec import GenerateJob, JobResult
from lorafleet.producer.errors import QuotaExceededError
from lorafleet.producer.quotas import QuotaTenants, admit, queue_release

#: Beyond the job timeout, how long a taken job's place lasts if its worker vanishes.
TAKE_MARGIN_S = 60.0


async def take(
    redis: Any, quotas: QuotaTenants, job_id: str, job: GenerateJob, job_timeout: float
) -> QuotaExceededError | None:
    """Check a job this worker takes against its tenant's quota (None: no tenant, no quota,
    or admitted); its place in flight then lasts the job timeout plus a margin."""
    if job.tenant is None or not await quotas.has_quota(job.tenant):
        return None
    return await admit(redis, job.tenant, job_id, lapse_after=job_timeout + TAKE_MARGIN_S)


@dataclass
class Release:
    """A finished job leaves its tenant's jobs in flight; its tokens count toward the
    tenant's tokens this minute. Queued on the final event's transaction."""

    tenant: str
    job_id: str
    tokens: int

    @classmethod
    def of(cls, job: GenerateJob | None, job_id: str, result: JobResult) -> Release | None:
        if job is None or job.tenant is None:
            return None
        output = result.output
        if output is None and result.error is not None:
            output = result.error.output  # a request cut short used tokens too
        usage = output.usage if output is not None else None
        return cls(job.tenant, job_id, usage.total_tokens if usage is not None else 0)

    @staticmethod
    def queue_all(pipe: Any, releases: Sequence[Release]) -> None:
        """Queue the releases of a flush: one ZREM and one token count per tenant."""
        ids: dict[str, list[str]] = {}
        tokens: dict[str, int] = {}
        for r in releases:
            ids.setdefault(r.tenant, []).append(r.job_id)
            tokens[r.tenant] = tokens.get(r.tenant, 0) + r.tokens
        for tenant, job_ids in ids.items():
            queue_release(pipe, tenant, job_ids, tokens[tenant])
