"""The `lorafleet` command: generate through a running worker, redis, and the demo."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import redis

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "lorafleet.worker.cli"]


def _run(args, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300, **kw)


def test_generate_through_a_running_worker(worker, adapters):
    url, queue = worker.config.redis_url, worker.config.queue
    a, b = adapters[0], adapters[1]
    proc = _run(
        ["generate", "--redis-url", url, "--queue", queue, "--max-tokens", "4", "--base",
         "--lora", f"{a.lora_name}={a.lora_path}", "--lora", f"{b.lora_name}={b.lora_path}",
         "one", "two"],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    # A header per request, its text indented below it.
    headers = [line for line in proc.stdout.splitlines() if not line.startswith("  ")]
    labels = [line.split("]")[0] + "]" for line in headers]
    assert labels == ["[ad0]", "[ad1]", "[(base)]"] * 2
    assert headers[0] == "[ad0] one" and headers[3] == "[ad0] two"

    proc = _run(
        ["generate", "--redis-url", url, "--queue", queue, "--stream", "--max-tokens", "4"],
        input="from stdin\n",
    )
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr

    proc = _run(
        ["generate", "--redis-url", url, "--queue", queue, "--lora", f"gone={a.lora_path}-x", "x"]
    )
    assert proc.returncode == 1 and "error[adapter_not_found]" in proc.stdout


def test_redis_command_serves_until_terminated():
    proc = subprocess.Popen([*CLI, "redis"], stdout=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        assert redis.Redis.from_url(url).ping()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()


def test_demo_runs_end_to_end_and_cleans_up(tmp_path):
    env = {**os.environ, "LORAFLEET_CACHE": str(tmp_path)}
    proc = _run(["demo", "--device", "cpu", "--words", "2"], env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert any("(base)" in line for line in lines)
    summary = next(line for line in lines if "adapters + base model" in line)
    assert "requests/s" in summary and "tokens/s" in summary
    # The shipped trained assets: every adapter (and the base model) did its task.
    accuracy = lines[-1].removeprefix("accuracy: ").split(", ")
    assert len(accuracy) == 5, proc.stdout
    for entry in accuracy:
        matched, total = entry.rsplit(" ", 1)[1].split("/")
        assert matched == total, proc.stdout
