"""Per-tenant Prometheus counters: exact for named tenants, bounded with thousands."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, generate_latest

from lorafleet.producer.codec import GenerateJob, JobResult
from lorafleet.producer.errors import QuotaExceededError
from lorafleet.producer.types import CompletionOutput, RequestOutput
from lorafleet.producer.usage import Usage
from lorafleet.worker.serve.tenant_metrics import NO_TENANT, TenantMetrics


def _job(tenant: str | None) -> GenerateJob:
    return GenerateJob(request_id="j", prompt="p", tenant=tenant)


def _done(prompt: int = 3, completion: int = 5, engine: float = 0.25) -> JobResult:
    output = RequestOutput(
        request_id="j",
        prompt="p",
        prompt_token_ids=[1] * prompt,
        outputs=[CompletionOutput(index=0, text="x", token_ids=[2] * completion)],
        finished=True,
        usage=Usage(prompt_tokens=prompt, completion_tokens=completion, engine_s=engine),
    )
    return JobResult(request_id="j", output=output)


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, {"worker": "w", **labels}) or 0.0


def test_named_tenants_are_counted_exactly():
    registry = CollectorRegistry()
    metrics = TenantMetrics(registry, "w", max_tenants=4)
    for _ in range(3):
        metrics.observe(_job("acme"), _done())
    metrics.observe(_job(None), _done(prompt=1, completion=1))
    refusal = QuotaExceededError("no", details={"limit": "max_in_flight"})
    metrics.observe(_job("acme"), JobResult(request_id="j", error=refusal.to_info()))
    assert _value(registry, "lorafleet_tenant_requests_total", tenant="acme") == 3
    assert _value(registry, "lorafleet_tenant_prompt_tokens_total", tenant="acme") == 9
    assert _value(registry, "lorafleet_tenant_completion_tokens_total", tenant="acme") == 15
    assert _value(registry, "lorafleet_tenant_engine_seconds_total", tenant="acme") == 0.75
    assert _value(registry, "lorafleet_tenant_requests_total", tenant=NO_TENANT) == 1
    assert (
        _value(
            registry, "lorafleet_tenant_quota_refusals_total", tenant="acme", limit="max_in_flight"
        )
        == 1
    )


def test_thousands_of_tenants_keep_the_series_count_bounded():
    registry = CollectorRegistry()
    metrics = TenantMetrics(registry, "w", max_tenants=5)
    rng = random.Random(0)
    busy = [f"big{i}" for i in range(3)]
    total = 0
    for i in range(20_000):
        tenant = rng.choice(busy) if i % 2 else f"t{rng.randrange(5000)}"
        metrics.observe(_job(tenant), _done(completion=1))
        total += 1
    text = generate_latest(registry).decode()
    series = [x for x in text.splitlines() if x.startswith("lorafleet_tenant_requests_total{")]
    assert len(series) <= 5 + 1  # named tenants and `other`
    assert set(busy) <= metrics.labels.named  # the busiest are named
    counted = sum(float(x.rsplit(" ", 1)[1]) for x in series)
    assert counted <= total  # demoted tenants' series are dropped, never double-counted
    assert _value(registry, "lorafleet_tenant_requests_total", tenant="other") > 0


def test_reserved_names_never_become_labels():
    registry = CollectorRegistry()
    metrics = TenantMetrics(registry, "w", max_tenants=10)
    for name in ("none", "other", "base"):
        metrics.observe(_job(name), _done())
    assert metrics.labels.named == frozenset()
    assert _value(registry, "lorafleet_tenant_requests_total", tenant="other") == 3
