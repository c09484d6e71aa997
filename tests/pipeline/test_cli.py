"""The `lorafleet` command: generate through a running worker, redis, and the demo."""

from __future__ import annotations

import json
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


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "--redis-url", "http://127.0.0.1:38361", "hi"], "must start with redis://"),
        (["generate", "--redis-url", "redis://127.0.0.1:1/0", "hi"], "connection refused"),
        (["generate", "--lora", "a=/x", "--lora", "a=/y", "--redis-url", "redis://h/0", "hi"],
         "--lora names 'a' twice"),
        (["generate", "--system", "be brief", "hi"], "--system needs --chat"),
        (["worker", "--model", "/nowhere", "--max-model-len", "abc"], "--max-model-len must be an integer"),
        (["loadtest", "--model", "/nowhere", "--adapters-dir", "/nowhere"], "no PEFT adapter folders"),
        (["prepare-model", "gpt-9"], "unknown model 'gpt-9'"),
    ],
)  # fmt: skip
def test_an_ordinary_mistake_is_one_line_and_status_2(args, message):
    proc = _run(args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"lorafleet {args[0]}: "), proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_a_missing_database_is_one_line(redis_server):
    url = redis_server.url.rsplit("/", 1)[0] + "/99"
    proc = _run(["generate", "--redis-url", url, "hi"])
    assert proc.returncode == 2 and "database 99 does not exist" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_generate_json_lines_and_worker_side_refusals(worker, adapters, adapter_root, tmp_path):
    url, queue = worker.config.redis_url, worker.config.queue
    a = adapters[0]
    relative = "relative/adapter"
    proc = _run(
        ["generate", "--redis-url", url, "--queue", queue, "--max-tokens", "3", "--json", "--base",
         "--lora", f"{a.lora_name}={a.lora_path}", "one\ntwo"],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(e["adapter"], e["prompt"]) for e in lines] == [
        (a.lora_name, "one\ntwo"),
        (None, "one\ntwo"),
    ]
    assert all(e["output_tokens"] == 3 and "text" in e and e["job_id"] for e in lines)
    # The worker resolves adapter paths itself: a relative one is named as such.
    from lorafleet.producer import LoRARequest, SamplingParams, SyncClient
    from lorafleet.producer.errors import AdapterNotFoundError

    with (
        SyncClient(url, queue_name=queue) as client,
        pytest.raises(AdapterNotFoundError, match=r"is relative .* use an absolute path"),
    ):
        client.generate("x", SamplingParams(max_tokens=2), LoRARequest("rel", 4242, relative))
