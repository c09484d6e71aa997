"""Worker metrics in process: the bounded adapter label, request timings, the HTTP port."""

from __future__ import annotations

import asyncio
import random
import socket
import time
import urllib.request

import pytest
from prometheus_client import generate_latest

from lorafleet.producer.codec import GenerateJob, JobResult
from lorafleet.producer.errors import WORKER_ERROR_CODES, AdapterNotFoundError
from lorafleet.producer.types import CompletionOutput, LoRARequest, RequestOutput, SamplingParams
from lorafleet.worker.engine.config import EngineConfig
from lorafleet.worker.serve.adapter_labels import BASE, OTHER, AdapterLabels
from lorafleet.worker.serve.metrics import MetricsPortInUseError, WorkerMetrics
from lorafleet.worker.serve.settings import ConfigError, WorkerConfig

ADAPTER_LABELLED = (
    "lorafleet_requests_total",
    "lorafleet_prompt_tokens_total",
    "lorafleet_generation_tokens_total",
)


def _job(job_id: str, adapter: str | None, enqueued_at: float = 0.0) -> GenerateJob:
    lora = LoRARequest(adapter, 1 + hash(adapter) % 10**6, f"/a/{adapter}") if adapter else None
    return GenerateJob(
        request_id=job_id,
        prompt="p",
        sampling_params=SamplingParams(),
        lora_request=lora,
        enqueued_at=enqueued_at,
    )


def _done(job_id: str, finish_reason: str = "length", tokens: int = 3) -> JobResult:
    completion = CompletionOutput(
        index=0, text="x", token_ids=list(range(tokens)), finish_reason=finish_reason
    )
    output = RequestOutput(
        request_id=job_id, prompt="p", prompt_token_ids=[1, 2], outputs=[completion], finished=True
    )
    return JobResult(request_id=job_id, output=output)


def _run(metrics: WorkerMetrics, job_id: str, adapter: str | None) -> None:
    metrics.job_started(job_id, _job(job_id, adapter))
    metrics.job_finished(job_id, _done(job_id))


def _samples(metrics: WorkerMetrics, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Samples of one series name: sorted label pairs -> value."""
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in metrics.registry.collect()
        for s in family.samples
        if s.name == name
    }


def _value(metrics: WorkerMetrics, name: str, **labels: str) -> float:
    return sum(
        v
        for key, v in _samples(metrics, name).items()
        if all((k, labels[k]) in key for k in labels)
    )


def test_thousands_of_adapters_keep_the_series_count_bounded():
    named = 20
    metrics = WorkerMetrics("w", max_adapters=named)
    rng = random.Random(0)
    adapters = [f"adapter-{i}" for i in range(5000)]
    # Zipf-like traffic: a few busy adapters and a long tail, most seen once or never.
    weights = [1 / (i + 1) for i in range(len(adapters))]
    for i, name in enumerate(rng.choices(adapters, weights, k=20000)):
        _run(metrics, f"j{i}", name)
    for name in ADAPTER_LABELLED:
        labels = {dict(key)["adapter"] for key in _samples(metrics, name)}
        assert {BASE, OTHER} <= labels
        assert len(labels) <= named + 2
    assert len(metrics.adapters.named) == named
    # The busiest adapters hold their own label.
    assert {f"adapter-{i}" for i in range(5)} <= metrics.adapters.named
    assert _value(metrics, "lorafleet_requests_total", adapter=OTHER) > 0
    # Memory is bounded too, not only the series.
    assert len(metrics.adapters._counts) <= metrics.adapters.capacity


def test_a_new_busy_adapter_takes_the_place_of_a_quiet_one():
    metrics = WorkerMetrics("w", max_adapters=2)
    for i in range(30):
        _run(metrics, f"a{i}", "a" if i % 2 else "b")
    assert metrics.adapters.named == {"a", "b"}
    for i in range(100):
        _run(metrics, f"c{i}", "c")
    assert "c" in metrics.adapters.named and len(metrics.adapters.named) == 2
    demoted = ({"a", "b"} - metrics.adapters.named).pop()
    # The demoted adapter's series are gone; its traffic counts under `other` from now on.
    for name in ADAPTER_LABELLED:
        assert all(dict(key)["adapter"] != demoted for key in _samples(metrics, name))
    before = _value(metrics, "lorafleet_requests_total", adapter=OTHER)
    _run(metrics, "late", demoted)
    assert _value(metrics, "lorafleet_requests_total", adapter=OTHER) == before + 1


def test_base_model_reserved_names_and_no_named_adapters():
    labels = AdapterLabels(0, on_demote=lambda name: None)
    assert labels.hit(None) == BASE and labels.hit("busy") == OTHER
    labels = AdapterLabels(5, on_demote=lambda name: None)
    # An adapter literally called `base` or `other` is never confused with those values.
    assert labels.hit("base") == OTHER and labels.hit("other") == OTHER
    assert labels.hit("sql") == "sql" and labels.named == {"sql"}
    with pytest.raises(ValueError, match="max_named"):
        AdapterLabels(-1, on_demote=lambda name: None)


def test_request_timings_outcomes_and_errors():
    metrics = WorkerMetrics("w", max_adapters=4)
    metrics.job_started("ok", _job("ok", "sql", enqueued_at=time.time() - 1.0))
    for _ in range(3):
        metrics.job_tokens("ok", 1)
    metrics.job_finished("ok", _done("ok", "stop", tokens=3))
    metrics.job_started("bad", _job("bad", "missing", enqueued_at=time.time()))
    error = AdapterNotFoundError("no adapter").to_info()
    metrics.job_finished("bad", JobResult(request_id="bad", error=error))
    metrics.job_started("cut", _job("cut", None, enqueued_at=time.time()))
    metrics.job_cancelled("cut")
    # A payload that could not be decoded never started.
    metrics.job_finished("garbage", JobResult(request_id="garbage", error=error))

    def value(name: str, **labels: str) -> float:
        return _value(metrics, name, worker="w", **labels)

    assert value("lorafleet_queue_wait_seconds_count") == 3
    assert value("lorafleet_queue_wait_seconds_bucket", le="0.5") == 2  # the 1 s wait is above
    assert value("lorafleet_time_to_first_token_seconds_count") == 1
    assert value("lorafleet_time_to_first_token_seconds_sum") >= 1.0
    assert value("lorafleet_inter_token_latency_seconds_count") == 2
    assert value("lorafleet_request_latency_seconds_count") == 1  # completed requests only
    assert value("lorafleet_requests_total", adapter="sql", outcome="stop") == 1
    assert value("lorafleet_requests_total", adapter="missing", outcome="error") == 1
    assert value("lorafleet_requests_total", adapter=BASE, outcome="cancelled") == 1
    assert value("lorafleet_requests_total", adapter=OTHER, outcome="error") == 1
    assert value("lorafleet_request_errors_total", code="adapter_not_found") == 2
    assert value("lorafleet_generation_tokens_total", adapter="sql") == 3
    assert value("lorafleet_prompt_tokens_total", adapter="sql") == 2
    assert value("lorafleet_jobs_in_progress") == 0


def test_a_taken_metrics_port_stops_the_worker_with_a_clear_error(free_port):
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", port))
        taken.listen()
        with pytest.raises(MetricsPortInUseError, match=f"METRICS_PORT {port} is already in use"):
            WorkerMetrics("w2", max_adapters=1).serve(port)


def test_two_workers_on_one_host_serve_their_own_metrics(free_port):
    workers = [WorkerMetrics(f"w{i}", max_adapters=1) for i in range(2)]
    ports = [free_port(), free_port()]
    for metrics, port in zip(workers, ports, strict=True):
        metrics.serve(port)
    try:
        for i, port in enumerate(ports):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                text = r.read().decode()
            assert "lorafleet_build_info{" in text
            assert f'worker="w{i}"' in text and f'worker="w{1 - i}"' not in text
            assert "process_cpu_seconds_total" in text
    finally:
        for metrics in workers:
            asyncio.run(metrics.close())


def test_exposition_names_follow_the_prefix():
    metrics = WorkerMetrics("w", max_adapters=1)
    _run(metrics, "j", "a")
    text = generate_latest(metrics.registry).decode()
    families = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    ours = {f for f in families if not f.startswith(("process_", "python_"))}
    assert ours and all(f.startswith("lorafleet_") for f in ours)


def test_max_adapters_setting(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    env = {"LORAFLEET_MODEL": str(tmp_path), "LORAFLEET_METRICS_MAX_ADAPTERS": "7"}
    assert WorkerConfig.from_env(env).metrics_max_adapters == 7
    assert WorkerConfig(engine=EngineConfig(model="m")).metrics_max_adapters == 20
    with pytest.raises(ConfigError, match="LORAFLEET_METRICS_MAX_ADAPTERS must be >= 0"):
        WorkerConfig.from_env({**env, "LORAFLEET_METRICS_MAX_ADAPTERS": "-1"})


def test_error_series_start_at_zero_for_the_codes_a_worker_answers_with_only():
    metrics = WorkerMetrics("w", max_adapters=4)
    codes = {
        sample.labels["code"]
        for family in metrics.registry.collect()
        if family.name == "lorafleet_request_errors"
        for sample in family.samples
        if sample.name.endswith("_total")
    }
    assert codes == set(WORKER_ERROR_CODES)
    assert {"adapter_not_found", "quota_exceeded", "internal_error"} <= codes
    # Raised by clients, never by a worker: no series that would stay at 0 forever.
    assert not codes & {"queue_unavailable", "job_not_found", "stream_restarted"}


def test_a_rerun_jobs_first_token_counts_from_its_own_run_not_the_dead_workers():
    metrics = WorkerMetrics("w", max_adapters=4)
    # Enqueued 30 s ago; its first worker died after holding it for most of that.
    metrics.job_started("again", _job("again", "sql", enqueued_at=time.time() - 30.0), attempt=2)
    metrics.job_tokens("again", 1)
    metrics.job_finished("again", _done("again"))

    def value(name: str, **labels: str) -> float:
        return _value(metrics, name, worker="w", **labels)

    assert value("lorafleet_time_to_first_token_seconds_count") == 1
    assert value("lorafleet_time_to_first_token_seconds_sum") < 5.0
    assert value("lorafleet_queue_wait_seconds_sum") >= 30.0  # what the client waited
    assert value("lorafleet_request_latency_seconds_sum") >= 30.0
