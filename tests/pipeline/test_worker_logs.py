"""What a worker tells its operator: that it waits for Redis, that it is ready and with
what, each failed request at the default level, one readable line per job with -v, and
JSON lines when asked."""

from __future__ import annotations

import json
import re
import time
import uuid

import pytest

from lorafleet.producer import LoRARequest, SamplingParams, SyncClient
from lorafleet.producer.errors import AdapterPathForbiddenError
from lorafleet.producer.redis_server import EmbeddedRedis, free_port
from lorafleet.worker.local.launcher import WorkerProcess
from lorafleet.worker.serve.settings import WorkerConfig

pytestmark = pytest.mark.slow

SHORT = SamplingParams(max_tokens=4, temperature=0.0)


def _config(llama_dir, adapter_root, url: str, **extra) -> WorkerConfig:
    return WorkerConfig.create(
        model=str(llama_dir),
        device="cpu",
        redis_url=url,
        adapter_roots=(str(adapter_root),),
        queue=f"lorafleet:logs:{uuid.uuid4().hex[:8]}",
        max_model_len=256,
        kv_cache_mb=16,
        **extra,
    )


def _serve_two_jobs(worker: WorkerProcess, adapters, tmp_path) -> tuple[str, str]:
    """One good job on an adapter and one for a forbidden path; their job ids."""
    with SyncClient(worker.config.redis_url, queue_name=worker.config.queue) as client:
        good = client.submit("hello", SHORT, adapters[0])
        bad = client.submit("hello", SHORT, LoRARequest("evil", 999, "/etc/passwd"))
        good.result(timeout=60)
        with pytest.raises(AdapterPathForbiddenError):
            bad.result(timeout=60)
    time.sleep(0.3)  # the log line follows the result by a moment
    return good.job_id, bad.job_id


def test_waiting_for_redis_then_ready_with_the_engine_figures(llama_dir, adapter_root, tmp_path):
    port = free_port()
    url = f"redis://:s3cret@127.0.0.1:{port}/0"
    worker = WorkerProcess(_config(llama_dir, adapter_root, url), log_path=tmp_path / "w.log")
    try:
        worker.start()
        time.sleep(3)
        log = worker.log_tail()
        assert f"waiting for Redis at redis://:***@127.0.0.1:{port}/0" in log, log
        assert "s3cret" not in log
        with EmbeddedRedis(port=port, password="s3cret"):
            worker.wait_ready(timeout=120)
            log = worker.log_tail()
    finally:
        worker.stop()
    assert re.search(r"Redis at redis://:\*\*\*@127\.0\.0\.1:\d+/0 is back after", log), log
    ready = next(line for line in log.splitlines() if " ready in " in line)
    for fragment in (
        "on cpu (float32)",
        "max_model_len 256",
        "KV cache ",
        " tokens (16 MiB)",
        "4 adapter slots of rank <= 64",
        f"adapters from {adapter_root}",
        worker.config.queue,
    ):
        assert fragment in ready, (fragment, ready)


def test_default_level_logs_failures_and_verbose_one_line_per_job(
    redis_server, llama_dir, adapter_root, adapters, tmp_path
):
    quiet = WorkerProcess(
        _config(llama_dir, adapter_root, redis_server.url), log_path=tmp_path / "q.log"
    )
    with quiet:
        good, bad = _serve_two_jobs(quiet, adapters, tmp_path)
        log = quiet.log_tail(20_000)
    assert good not in log  # successes are quiet at the default level
    (line,) = [line for line in log.splitlines() if bad in line]
    assert "WARNING" in line and "adapter evil" in line and "adapter_path_forbidden" in line

    verbose = WorkerProcess(
        _config(llama_dir, adapter_root, redis_server.url),
        log_path=tmp_path / "v.log",
        verbose=True,
    )
    with verbose:
        good, bad = _serve_two_jobs(verbose, adapters, tmp_path)
        log = verbose.log_tail(20_000)
    (done,) = [line for line in log.splitlines() if good in line]
    assert f"adapter {adapters[0].lora_name}" in done and "4 output tokens" in done
    assert re.search(r"in \d+\.\d\ds", done) and "length" in done
    assert len([line for line in log.splitlines() if bad in line]) == 1
    assert "already running elsewhere" not in log and "\\x" not in log  # no arq job lines


def test_plain_arq_shows_the_ready_line_too(redis_server, llama_dir, adapter_root, tmp_path):
    worker = WorkerProcess(
        _config(llama_dir, adapter_root, redis_server.url),
        log_path=tmp_path / "a.log",
        arq_cli=True,
    )
    with worker:
        log = worker.log_tail()
    assert "lorafleet worker" in log and " ready in " in log and "max_model_len 256" in log, log


def test_json_log_lines(redis_server, llama_dir, adapter_root, adapters, tmp_path):
    config = _config(llama_dir, adapter_root, redis_server.url, log_format="json")
    worker = WorkerProcess(config, log_path=tmp_path / "j.log")
    with worker:
        _, bad = _serve_two_jobs(worker, adapters, tmp_path)
        lines = worker.log_tail(20_000).strip().splitlines()
    entries = [json.loads(line) for line in lines if line.startswith("{")]
    assert entries and len(entries) >= len(lines) - 2, lines  # every lorafleet line is JSON
    (failure,) = [e for e in entries if e.get("job_id") == bad]
    assert failure["level"] == "WARNING" and failure["code"] == "adapter_path_forbidden"
    assert failure["adapter"] == "evil" and failure["logger"] == "lorafleet.worker.serve.jobs"
    assert any("ready in" in e["message"] for e in entries)
