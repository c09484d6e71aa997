"""Prometheus counters per tenant, bounded as the ``adapter`` label is.

A label per tenant would explode with many customers just as one per adapter would, so the
``tenant`` label follows the same rule (``AdapterLabels``): the busiest
``metrics_max_tenants`` tenants by recent traffic are named, every other one counts as
``other``, and jobs without a tenant as ``none`` (a tenant literally named ``none``,
``base`` or ``other`` counts as ``other``). These counters are for dashboards and alerts; the
ledger (``lorafleet usage``) is the exact record for billing.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from lorafleet.producer.codec import GenerateJob, JobResult
from lorafleet.producer.errors import QuotaExceededError
from lorafleet.worker.serve.adapter_labels import AdapterLabels

#: Label value of jobs without a tenant.
NO_TENANT = "none"
#: The counters of completed requests by tenant (name, help), in ``TenantMetrics.usage``
#: order: requests, prompt tokens, completion tokens, engine seconds.
USAGE_COUNTERS = (
    (
        "lorafleet_tenant_requests",
        "Completed requests by tenant (busiest named, the rest `other`, none `none`).",
    ),
    ("lorafleet_tenant_prompt_tokens", "Prompt tokens of completed requests by tenant."),
    ("lorafleet_tenant_completion_tokens", "Completion tokens of completed requests by tenant."),
    ("lorafleet_tenant_engine_seconds", "Engine time of completed requests by tenant."),
)
#: The ``limit`` label values of quota refusals.
QUOTA_LIMITS = ("max_in_flight", "tokens_per_minute")


class TenantMetrics:
    """Per-tenant request, token, engine-time and refusal counters in ``registry``.

    Contract: ``observe`` once per answered job (on the event loop); the series count stays
    at most ``(max_tenants + 2) x`` the label combinations, with any number of tenants."""

    def __init__(self, registry: CollectorRegistry, worker: str, *, max_tenants: int) -> None:
        self.worker = worker
        self.labels = AdapterLabels(max_tenants, self._remove)
        labels = ["worker", "tenant"]
        self.usage = tuple(Counter(*spec, labels, registry=registry) for spec in USAGE_COUNTERS)
        self.refusals = Counter(
            "lorafleet_tenant_quota_refusals",
            "Jobs refused by their tenant's quota when this worker took them, by limit.",
            [*labels, "limit"],
            registry=registry,
        )

    def _label(self, tenant: str | None) -> str:
        if tenant is None:
            return NO_TENANT
        if tenant == NO_TENANT:
            return self.labels.hit("other")  # reserved: never a named tenant
        return self.labels.hit(tenant)

    def observe(self, job: GenerateJob | None, result: JobResult) -> None:
        """Count one answered job: its usage if it completed, its refusal if its quota
        refused it; other errors are counted by ``lorafleet_request_errors``."""
        if job is None:
            return
        if result.error is not None:
            if result.error.code == QuotaExceededError.code:
                limit = str((result.error.details or {}).get("limit", ""))
                self.refusals.labels(self.worker, self._label(job.tenant), limit).inc()
            return
        usage = result.output.usage if result.output is not None else None
        if usage is None:
            return
        label = self._label(job.tenant)
        amounts = (1, usage.prompt_tokens, usage.completion_tokens, usage.engine_s)
        for counter, amount in zip(self.usage, amounts, strict=True):
            counter.labels(self.worker, label).inc(amount)

    def _remove(self, tenant: str) -> None:
        # Counted under `other` from now on; dropping its series keeps the count bounded.
        for counter in self.usage:
            counter.remove(self.worker, tenant)
        for limit in QUOTA_LIMITS:
            self.refusals.remove(self.worker, tenant, limit)
