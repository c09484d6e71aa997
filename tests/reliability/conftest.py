"""Reliability fixtures: tiny model, adapters, real redis-server and worker subprocesses.

Workers here use a 3 s heartbeat TTL, so a dead worker's jobs come back within seconds.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from reliability_support import HEARTBEAT_TTL, MAX_MODEL_LEN

from lorafleet.producer import LoRARequest
from lorafleet.producer.redis_server import EmbeddedRedis
from lorafleet.worker.local.launcher import WorkerProcess
from lorafleet.worker.serve.settings import WorkerConfig


@pytest.fixture(scope="session")
def rel_adapter_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("reliability-adapters")


@pytest.fixture(scope="session")
def rel_adapters(llama_dir, rel_adapter_root) -> list[LoRARequest]:
    """Three small adapters, ids 1..3, under ``rel_adapter_root``."""
    from lorafleet.worker.demo.synthetic import build_random_adapter

    made = []
    for i, rank in enumerate((4, 8, 16)):
        path = build_random_adapter(
            llama_dir, rel_adapter_root / f"good{i}", rank=rank, seed=700 + i
        )
        made.append(LoRARequest(f"good{i}", i + 1, str(path)))
    return made


@pytest.fixture(scope="session")
def make_config(tiny_worker_config, rel_adapter_root, rel_adapters) -> Callable[..., WorkerConfig]:
    """(redis_url, **overrides) -> a worker configuration on the tiny llama, its own queue."""

    def make(redis_url: str, **overrides: Any) -> WorkerConfig:
        small = {"max_loras": 2, "max_num_seqs": 16, "max_model_len": MAX_MODEL_LEN}
        timing = {"kv_cache_mb": 16, "heartbeat_ttl": HEARTBEAT_TTL, "drain_timeout": 10.0}
        return tiny_worker_config(
            redis_url, rel_adapter_root, "rel", **{**small, **timing, **overrides}
        )

    return make


@pytest.fixture(scope="session")
def start_worker(tmp_path_factory) -> Iterator[Callable[..., WorkerProcess]]:
    """(config, ready=True) -> a started worker process (ready unless told not to wait);
    every worker started through it is stopped (SIGKILL if need be) at the end."""
    started: list[WorkerProcess] = []

    def start(config: WorkerConfig, *, ready: bool = True) -> WorkerProcess:
        log = tmp_path_factory.mktemp("worker") / "worker.log"
        process = WorkerProcess(config, log_path=log).start()
        started.append(process)
        if ready:
            process.wait_ready(timeout=180)
        return process

    yield start
    for process in started:  # all drain at once, then each is waited for
        process.signal(signal.SIGTERM)
    for process in started:
        process.stop(timeout=5)


@pytest.fixture(scope="session")
def rel_redis() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture(scope="session")
def shared_worker(rel_redis, make_config, start_worker) -> WorkerProcess:
    """One worker for the bad-input, negative-cache and deadline tests."""
    return start_worker(
        make_config(rel_redis.url, max_adapter_mb=1, max_num_seqs=64, kv_cache_mb=32)
    )
