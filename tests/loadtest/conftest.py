"""Load-test fixtures: adapters from `lorafleet make-adapters`, a real redis-server and a
real worker subprocess serving them on the tiny llama (same pattern as tests/pipeline)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from lorafleet.producer.redis_server import EmbeddedRedis
from lorafleet.worker.cli import main
from lorafleet.worker.local.launcher import WorkerProcess


@dataclass(frozen=True)
class MadeAdapters:
    path: Path
    count: int
    rank: int


@pytest.fixture(scope="session")
def made_adapters(llama_dir, tmp_path_factory) -> MadeAdapters:
    """Six rank-4 adapters written by `lorafleet make-adapters`."""
    made = MadeAdapters(tmp_path_factory.mktemp("made") / "adapters", count=6, rank=4)
    code = main(
        ["make-adapters", "--model", str(llama_dir), "--count", str(made.count),
         "--rank", str(made.rank), "--out", str(made.path), "--seed", "40"]
    )  # fmt: skip
    assert code == 0
    return made


# Module scope: the worker and its Redis stop when the e2e module ends instead of polling
# through the rest of the session.
@pytest.fixture(scope="module")
def loadtest_redis():
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture(scope="module")
def loadtest_worker(
    loadtest_redis, tiny_worker_config, made_adapters, tmp_path_factory
) -> WorkerProcess:
    config = tiny_worker_config(
        loadtest_redis.url,
        made_adapters.path,
        "loadtest-test",
        max_loras=4,
        max_num_seqs=64,
        max_model_len=256,
    )
    log = tmp_path_factory.mktemp("loadtest-worker") / "worker.log"
    with WorkerProcess(config, log_path=log, ready_timeout=180) as process:
        yield process
