"""End to end: two workers on one host under a short load, scraped by a real Prometheus.

Every PromQL expression of the Grafana dashboard and of the alert rules is evaluated through
Prometheus's HTTP API; each panel's main series (its first target) must return data. A live
scrape of each worker passes ``promtool check metrics``.
"""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from lorafleet.producer import Client, LoRARequest, SamplingParams
from lorafleet.producer.errors import AdapterNotFoundError
from lorafleet.producer.redis_server import EmbeddedRedis
from lorafleet.worker.local.launcher import WorkerProcess
from lorafleet.worker.serve.settings import WorkerConfig

pytestmark = pytest.mark.slow

NUM_WORKERS = 2
NUM_ADAPTERS = 6  # more than max_loras and max_cpu_loras: slot and CPU-cache evictions
MAX_NAMED_ADAPTERS = 3  # fewer than the adapters in use: `other` shows up
NUM_REQUESTS = 64
PARAMS = SamplingParams(max_tokens=6, temperature=0.0)


@dataclass
class Fleet:
    prometheus: str  # base URL
    workers: list[WorkerProcess]
    scraping_since: float  # monotonic time Prometheus became ready
    num_errors: int

    def query(self, promql: str) -> dict[str, Any]:
        """``/api/v1/query`` at the current time; returns ``data`` (fails on an error)."""
        body = _get_json(
            f"{self.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        )
        assert body["status"] == "success", (promql, body)
        return body["data"]

    def values(self, promql: str) -> list[float]:
        data = self.query(promql)
        if data["resultType"] == "scalar":
            return [float(data["result"][1])]
        return [float(series["value"][1]) for series in data["result"]]

    def window(self) -> str:
        """A range for ``$__rate_interval`` that covers the whole load."""
        return f"{math.ceil(time.monotonic() - self.scraping_since) + 5}s"


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def _get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout:g}s waiting for {what}")


def _adapters(llama_dir: Path, root: Path) -> list[LoRARequest]:
    from lorafleet.worker.demo.synthetic import build_random_adapter

    made = []
    for i in range(NUM_ADAPTERS):
        path = build_random_adapter(
            llama_dir, root / f"ad{i}", rank=(4, 8)[i % 2], target_modules=("q_proj", "v_proj"),
            seed=700 + i,
        )  # fmt: skip
        made.append(LoRARequest(f"ad{i}", i + 1, str(path)))
    return made


def _scrape_config(ops_dir: Path, targets: list[str]) -> dict[str, Any]:
    """ops/prometheus/prometheus.yml with these targets and a 1 s scrape and rule interval."""
    config = yaml.safe_load((ops_dir / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(ops_dir / "prometheus" / f) for f in config["rule_files"]]
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": targets}]
    return config


@contextmanager
def _prometheus(binary: str, config: dict[str, Any], root: Path, port: int) -> Iterator[str]:
    """A Prometheus server on loopback with ``config`` and its own data folder."""
    config_file = root / "prometheus.yml"
    config_file.write_text(json.dumps(config))  # JSON is YAML
    log_path = root / "prometheus.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config_file}",
                f"--storage.tsdb.path={root / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert process.poll() is None, log_path.read_text()
        try:
            return _get_text(f"{url}/-/ready").startswith("Prometheus")
        except OSError:
            return False

    try:
        _wait(ready, 30, "Prometheus to be ready")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def _load(url: str, queue: str, adapters: list[LoRARequest], missing: LoRARequest) -> int:
    """Submit the mixed load at once, wait for every answer; returns the number of errors."""
    choices = [None, *adapters, missing]
    async with Client(url, queue_name=queue) as client:
        handles = await asyncio.gather(
            *(
                client.submit(f"prompt {i}", PARAMS, choices[i % len(choices)])
                for i in range(NUM_REQUESTS)
            )
        )
        results = await asyncio.gather(
            *(h.result(timeout=120) for h in handles), return_exceptions=True
        )
    errors = [r for r in results if isinstance(r, BaseException)]
    assert all(isinstance(e, AdapterNotFoundError) for e in errors), errors
    return len(errors)


@pytest.fixture(scope="module")
def fleet(llama_dir, tmp_path_factory, prometheus_binary, free_port, ops_dir) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("observability")
    adapters = _adapters(llama_dir, root / "adapters")
    missing = LoRARequest("missing", 99, str(root / "adapters" / "missing"))
    queue = f"lorafleet:test:{uuid.uuid4().hex[:8]}"
    with EmbeddedRedis() as redis_server, ExitStack() as stack:
        workers = [
            WorkerProcess(
                WorkerConfig.create(
                    model=str(llama_dir),
                    device="cpu",
                    adapter_roots=(str(root / "adapters"),),
                    redis_url=redis_server.url,
                    queue=queue,
                    max_loras=2,
                    max_cpu_loras=3,
                    max_num_seqs=16,
                    max_model_len=256,
                    metrics_port=free_port(),
                    metrics_max_adapters=MAX_NAMED_ADAPTERS,
                    name=f"obs-worker-{i}",
                ),
                log_path=root / f"worker-{i}.log",
            )
            for i in range(NUM_WORKERS)
        ]
        for worker in workers:
            stack.callback(worker.stop)
            worker.start()  # both load their engines at once
        targets = [f"127.0.0.1:{w.config.metrics_port}" for w in workers]
        config = _scrape_config(ops_dir, targets)
        url = stack.enter_context(_prometheus(prometheus_binary, config, root, free_port()))
        fleet = Fleet(url, workers, time.monotonic(), 0)
        for worker in workers:
            worker.wait_ready(timeout=180)
        # Counters scraped at 0 before the load, so rates see the load's increments.
        _wait(
            lambda: fleet.values('count(up{job="lorafleet"} == 1)') == [NUM_WORKERS],
            30,
            "Prometheus to scrape both workers",
        )
        fleet.num_errors = asyncio.run(_load(redis_server.url, queue, adapters, missing))
        # Every result counted in a scrape of both workers, then one more scrape for rates.
        # (Not from lorafleet_requests_total: a demoted adapter's series is dropped.)
        answered = (
            "sum(lorafleet_request_latency_seconds_count) + sum(lorafleet_request_errors_total)"
        )
        _wait(
            lambda: fleet.values(answered) == [NUM_REQUESTS],
            30,
            "Prometheus to scrape the whole load",
        )
        time.sleep(2.5)
        yield fleet


def _dashboard_targets(ops_dir: Path) -> Iterator[tuple[str, str, str]]:
    dashboard = json.loads((ops_dir / "grafana" / "dashboards" / "lorafleet.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["refId"], target["expr"]


def _substitute(expr: str, window: str) -> str:
    """Grafana's variables as Grafana would expand them: all workers, a rate window."""
    promql = expr.replace("$__rate_interval", window).replace("$worker", ".*")
    assert "$" not in promql, f"unexpanded variable in {expr}"
    return promql


def test_live_scrape_passes_promtool_check_metrics(fleet, promtool):
    for worker in fleet.workers:
        text = _get_text(f"http://127.0.0.1:{worker.config.metrics_port}/metrics")
        assert f'worker="{worker.config.name}"' in text
        done = subprocess.run(
            [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), (
            done.stdout + done.stderr
        )


def test_every_dashboard_expression_evaluates_and_main_series_have_data(fleet, ops_dir):
    window = fleet.window()
    empty = []
    for title, ref, expr in _dashboard_targets(ops_dir):
        values = fleet.values(_substitute(expr, window))  # fails on an evaluation error
        if ref == "A" and not any(math.isfinite(v) for v in values):
            empty.append(f"{title}: {expr} -> {values}")
    assert not empty, "panels without data:\n" + "\n".join(empty)


def test_the_worker_variable_lists_both_workers(fleet):
    # label_values(lorafleet_build_info, worker), the dashboard's `worker` variable.
    workers = {s["metric"]["worker"] for s in fleet.query("lorafleet_build_info")["result"]}
    assert workers == {w.config.name for w in fleet.workers}


def test_every_alert_rule_loads_and_evaluates(fleet):
    def evaluated() -> bool:
        groups = _get_json(f"{fleet.prometheus}/api/v1/rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return bool(rules) and all(r["health"] == "ok" for r in rules)

    _wait(evaluated, 10, "every alert rule to be evaluated")
    groups = _get_json(f"{fleet.prometheus}/api/v1/rules")["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) == 6
    for rule in rules:
        fleet.query(rule["query"])  # fails on an evaluation error
    states = {r["name"]: r["state"] for r in rules}
    # One request in eight named a missing adapter: the error ratio alert is pending (its
    # `for` is not over yet); both workers are up.
    assert states["LorafleetErrorRatioHigh"] == "pending"
    assert states["LorafleetNoWorkerUp"] == states["LorafleetWorkerDown"] == "inactive"


def test_the_metrics_tell_what_happened(fleet):
    assert fleet.values("sum(lorafleet_request_errors_total)") == [fleet.num_errors]
    assert fleet.num_errors == NUM_REQUESTS // (NUM_ADAPTERS + 2)
    assert fleet.values('count(up{job="lorafleet"} == 1)') == [NUM_WORKERS]
    # Each worker names at most MAX_NAMED_ADAPTERS adapters, plus `base` and `other`.
    per_worker = fleet.values(
        "count by (worker) (count by (worker, adapter) (lorafleet_requests_total))"
    )
    assert per_worker and max(per_worker) <= MAX_NAMED_ADAPTERS + 2
    assert fleet.values('sum(lorafleet_requests_total{adapter="other"})')[0] > 0
    assert fleet.values('sum(lorafleet_requests_total{adapter="base"})') == [
        NUM_REQUESTS // (NUM_ADAPTERS + 2)
    ]
    assert fleet.values('sum(lorafleet_adapter_evictions_total{tier="slot"})')[0] > 0
    assert fleet.values("sum(lorafleet_step_sequences_count)")[0] > 0
    assert fleet.values("sum(lorafleet_queue_jobs)") == [0]  # every job answered
    window = fleet.window()
    assert fleet.values(f"sum(rate(lorafleet_requests_total[{window}]))")[0] > 0
    assert fleet.values(f"sum(rate(lorafleet_request_errors_total[{window}]))")[0] > 0
