"""Pipeline fixtures: a real redis-server and a real worker subprocess on a tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafleet.producer import LoRARequest, SyncClient
from lorafleet.producer.redis_server import EmbeddedRedis
from lorafleet.worker.local.launcher import WorkerProcess
from lorafleet.worker.serve.settings import WorkerConfig

NUM_ADAPTERS = 10


@pytest.fixture(scope="session")
def redis_server():
    """A private redis-server on a free loopback port for the whole session."""
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture(scope="session")
def adapter_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pipeline-adapters")


@pytest.fixture(scope="session")
def adapters(llama_dir, adapter_root) -> list[LoRARequest]:
    """Ten small adapters of mixed ranks and targets, ids 1..10, under ``adapter_root``."""
    from lorafleet.worker.demo.synthetic import build_random_adapter

    ranks = (4, 8, 16)
    targets = (("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"))
    made = []
    for i in range(NUM_ADAPTERS):
        name = f"ad{i}"
        path = build_random_adapter(
            llama_dir,
            adapter_root / name,
            rank=ranks[i % len(ranks)],
            alpha=16.0,
            target_modules=targets[i % len(targets)],
            seed=500 + i,
        )
        made.append(LoRARequest(name, i + 1, str(path)))
    return made


@pytest.fixture(scope="session")
def make_worker_config(tiny_worker_config, adapter_root, adapters):
    """redis_url -> the test worker's configuration (tiny llama, the ten adapters' root)."""

    def make(redis_url: str) -> WorkerConfig:
        return tiny_worker_config(
            redis_url, adapter_root, "test", max_loras=4, max_num_seqs=64, max_model_len=256
        )

    return make


@pytest.fixture(scope="session")
def worker(redis_server, make_worker_config, tmp_path_factory) -> WorkerProcess:
    """One worker process (``python -m lorafleet.worker.cli worker``), ready to take jobs;
    stopped with SIGTERM at the end. A start-up failure shows the end of its log."""
    config = make_worker_config(redis_server.url)
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    with WorkerProcess(config, log_path=log, ready_timeout=180) as process:
        yield process


@pytest.fixture
def client(worker):
    with SyncClient(worker.config.redis_url, queue_name=worker.config.queue) as c:
        yield c
