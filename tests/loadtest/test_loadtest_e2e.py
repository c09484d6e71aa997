"""`lorafleet loadtest` against a real redis-server and a real worker subprocess."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid

import pytest
import redis

from lorafleet.producer import LoRARequest, SyncClient
from lorafleet.producer.loadreport import build_report, read_json
from lorafleet.producer.loadtest import (
    WARMUP_JOB_PREFIX,
    WARMUP_TENANT,
    LoadTestSpec,
    run_load_test,
)
from lorafleet.producer.workload import AdapterMix, Length, Prompts, Workload

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "lorafleet.worker.cli", "loadtest"]


def _env() -> dict[str, str]:
    """The test's environment without a Redis URL or queue that would redirect the CLI."""
    return {
        k: v for k, v in os.environ.items() if k not in ("LORAFLEET_REDIS_URL", "LORAFLEET_QUEUE")
    }


def _results(url: str) -> int:
    """arq result keys in Redis: one per job a worker answered."""
    with redis.Redis.from_url(url) as r:
        return sum(1 for _ in r.scan_iter("arq:result:*", count=1000))


def test_open_loop_report_agrees_with_the_jobs_sent(loadtest_worker, made_adapters, tmp_path):
    url, queue = loadtest_worker.config.redis_url, loadtest_worker.config.queue
    before = _results(url)
    report_path = tmp_path / "report.json"
    n, warmup = 40, 4
    tenant = f"lt-{uuid.uuid4().hex[:8]}"
    proc = subprocess.run(
        [*CLI, "--redis-url", url, "--queue", queue, "--adapters-dir", str(made_adapters.path),
         "--num-requests", str(n), "--rate", "40", "--warmup", str(warmup),
         "--adapter-mix", "zipf:1.0", "--base-share", "0.2", "--prompt-len", "uniform:4:20",
         "--output-len", "uniform:2:6", "--slo-ttft", "10000", "--json", str(report_path),
         "--tenant", tenant],
        capture_output=True, text=True, timeout=300, env=_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "40 sent, 40 ok, 0 failed" in proc.stdout
    assert "40/40" in proc.stderr  # the progress bar's last line

    report = read_json(report_path)
    assert (report.sent, report.ok, report.failed) == (n, n, 0)
    assert _results(url) - before == n + warmup  # every job sent was answered, no more
    assert sorted(r.index for r in report.records) == list(range(n))
    assert sum(row.requests for row in report.per_adapter) == n
    names = {p.name for p in made_adapters.path.iterdir()} | {"(base)"}
    assert {row.adapter for row in report.per_adapter} <= names
    assert sum(b.completed for b in report.timeline) == n
    assert report.goodput == pytest.approx(report.request_throughput)
    for r in report.records:
        assert r.ok and r.output_tokens == r.max_tokens  # ignore_eos: exact lengths
        assert 2 <= r.max_tokens <= 6 and 4 <= r.prompt_chars <= 20
        assert r.prompt_tokens >= r.prompt_chars
        assert r.queue_wait is not None and r.queue_wait >= -0.01  # one host, one clock
        assert r.ttft is not None and 0 < r.ttft <= r.e2e
    assert report.output_tokens == sum(r.max_tokens for r in report.records)
    assert report.ttft.count == report.e2e.count == n
    assert report.config["adapter_mix"] == "zipf:1.0" and report.config["redis"]
    assert report.config["tenant"] == tenant
    # The warm-up is told apart: its own tenant in the ledger, its own job ids.
    with SyncClient(url, queue_name=queue) as client:
        rows = {row.tenant: row.requests for row in client.usage(by="tenant").rows}
    assert rows[tenant] == n and rows[WARMUP_TENANT] >= warmup
    with redis.Redis.from_url(url) as r:
        warm = sum(1 for _ in r.scan_iter(f"arq:result:{WARMUP_JOB_PREFIX}*", count=1000))
    assert warm >= warmup


def test_closed_loop_counts_failures_and_respects_bounds(loadtest_worker, made_adapters):
    config = loadtest_worker.config
    good = sorted(p for p in made_adapters.path.iterdir() if p.is_dir())[:2]
    loras = [LoRARequest(p.name, 900 + i, str(p)) for i, p in enumerate(good)]
    loras.append(LoRARequest("outside", 990, str(made_adapters.path.parent / "nowhere")))
    workload = Workload(AdapterMix.parse("distinct", 3), Prompts(Length(4, 8)), Length(3, 3))
    concurrency, duration = 3, 1.5
    spec = LoadTestSpec(
        workload, loras, concurrency=concurrency, num_requests=None, duration=duration, warmup=2
    )
    records, elapsed = asyncio.run(run_load_test(config.redis_url, spec, queue_name=config.queue))
    report = build_report(records, elapsed, description="closed", config={})
    assert report.sent == report.ok + report.failed == len(records) > 3
    assert {r.adapter for r in records if not r.ok} == {"outside"}
    assert set(report.errors) == {"adapter_path_forbidden"}
    assert report.ok > 0 and all(r.output_tokens == 3 for r in records if r.ok)
    assert all(r.sent < duration for r in records)
    for r in records:  # closed loop: never more than `concurrency` requests in flight
        in_flight = sum(1 for o in records if o.sent <= r.sent < o.finished)
        assert in_flight <= concurrency


def test_default_run_starts_its_own_redis_and_worker(tmp_path):
    pytest.importorskip("matplotlib")
    report_path, figure = tmp_path / "r.json", tmp_path / "r.png"
    proc = subprocess.run(
        [*CLI, "--device", "cpu", "--num-requests", "12", "--rate", "inf", "--warmup", "2",
         "--base-share", "0.25", "--json", str(report_path), "--plot", str(figure), "--quiet"],
        capture_output=True, text=True, timeout=300, env=_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = read_json(report_path)
    assert report.ok == 12 and report.config["redis"] == "embedded"
    assert "all requests at once" in report.description
    assert figure.read_bytes()[:4] == b"\x89PNG"


def test_workers_flag_starts_a_local_fleet_and_reports_each_worker(llama_dir, made_adapters):
    proc = subprocess.run(
        [*CLI, "--model", str(llama_dir), "--adapters-dir", str(made_adapters.path),
         "--device", "cpu", "--workers", "2", "--num-requests", "24", "--rate", "20",
         "--warmup", "0", "--adapter-mix", "uniform", "--output-len", "2", "--quiet"],
        capture_output=True, text=True, timeout=300, env=_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 workers" in proc.stderr
    assert "24 sent, 24 ok, 0 failed" in proc.stdout
    table = proc.stdout.split("per worker:\n", 1)[1].splitlines()
    rows = [line.split() for line in table[1:]]
    assert len(rows) == 3 and rows[-1][0] == "fleet"
    assert int(rows[-1][1]) == 24  # every job claimed by one of the two, counted once
    assert int(rows[-1][2]) >= 1  # adapters were read from disk


def test_workers_flag_is_checked():
    bad = subprocess.run(
        [*CLI, "--workers", "0", "--num-requests", "1"],
        capture_output=True, text=True, timeout=60, env=_env(),
    )  # fmt: skip
    assert bad.returncode != 0 and "--workers must be >= 1, got 0" in bad.stderr
    remote = subprocess.run(
        [*CLI, "--workers", "2", "--redis-url", "redis://127.0.0.1:1/0", "--num-requests", "1"],
        capture_output=True, text=True, timeout=60, env=_env(),
    )  # fmt: skip
    assert remote.returncode != 0 and "--workers starts local workers" in remote.stderr
    tenant = subprocess.run(
        [*CLI, "--tenant", "no spaces please", "--redis-url", "redis://127.0.0.1:1/0"],
        capture_output=True, text=True, timeout=60, env=_env(),
    )  # fmt: skip
    assert tenant.returncode != 0 and "--tenant: tenant 'no spaces please' is not valid" in (
        tenant.stderr
    )
