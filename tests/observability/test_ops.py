"""The ops/ files: promtool checks, and the dashboard's conventions and coverage."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import yaml

RATE_FUNCTIONS = re.compile(r"\b(?:rate|irate|increase|deriv)\(([^()]*)\)")


def _promtool(promtool: str, *args: str, cwd: Path) -> str:
    done = subprocess.run(
        [promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_prometheus_config_and_rules_pass_promtool(promtool, ops_dir):
    prometheus = ops_dir / "prometheus"
    _promtool(promtool, "check", "config", "prometheus.yml", cwd=prometheus)
    _promtool(promtool, "check", "rules", "alerts.yml", cwd=prometheus)


def test_alerts_fire_when_they_should(promtool, ops_dir):
    """alerts_test.yml feeds synthetic series to each alert (and a healthy fleet to all)."""
    out = _promtool(promtool, "test", "rules", "alerts_test.yml", cwd=ops_dir / "prometheus")
    assert "SUCCESS" in out
    rules = yaml.safe_load((ops_dir / "prometheus" / "alerts.yml").read_text())
    names = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    tested = (ops_dir / "prometheus" / "alerts_test.yml").read_text()
    assert all(f"alertname: {name}\n" in tested for name in names)


def _dashboard(ops_dir: Path) -> dict:
    return json.loads((ops_dir / "grafana" / "dashboards" / "lorafleet.json").read_text())


def _data_panels(dashboard: dict) -> list[dict]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def test_dashboard_conventions(ops_dir):
    dashboard = _dashboard(ops_dir)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    source = {"type": "prometheus", "uid": "${datasource}"}
    assert variables["worker"]["datasource"] == source
    rates = 0
    for panel in _data_panels(dashboard):
        title = panel["title"]
        assert panel["datasource"] == source, title
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{title}: no unit"
        assert panel["targets"], title
        for target in panel["targets"]:
            assert target["datasource"] == source, title
            windows = [m.split("[")[-1] for m in RATE_FUNCTIONS.findall(target["expr"])]
            assert all(w == "$__rate_interval]" for w in windows), (title, target["expr"])
            rates += len(windows)
    assert rates > 20
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_has_the_panels_operators_need(ops_dir):
    titles = " | ".join(p["title"].lower() for p in _data_panels(_dashboard(ops_dir)))
    for needed in (
        "requests per second",
        "tokens per second",
        "queue wait",
        "time to first token",
        "inter-token latency",
        "end-to-end latency",
        "running, waiting and queued",
        "adapter slots",
        "hit ratio",
        "loads and evictions",
        "batch size",
        "adapters per step",
        "errors by code",
        "top adapters",
        "by worker",
        "workers up",
        "affinity hit ratio",
        "steals and re-homes",
    ):
        assert needed in titles, needed


def test_compose_file_matches_provisioning_and_scrape_config(ops_dir):
    compose = yaml.safe_load((ops_dir / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis", "worker", "prometheus", "grafana"} <= set(services)
    mounts = dict(v.removesuffix(":ro").split(":") for v in services["grafana"]["volumes"])
    assert all((ops_dir / host).is_dir() for host in mounts)
    providers = yaml.safe_load(
        (ops_dir / "grafana/provisioning/dashboards/lorafleet.yml").read_text()
    )["providers"]
    assert providers[0]["options"]["path"] == mounts["./grafana/dashboards"]
    (source,) = yaml.safe_load(
        (ops_dir / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert services["prometheus"]["volumes"] == ["./prometheus:/etc/prometheus:ro"]
    scrape = yaml.safe_load((ops_dir / "prometheus/prometheus.yml").read_text())
    (job,) = scrape["scrape_configs"]
    port = services["worker"]["environment"]["LORAFLEET_METRICS_PORT"]
    assert job["static_configs"][0]["targets"] == [f"worker:{port}"]
