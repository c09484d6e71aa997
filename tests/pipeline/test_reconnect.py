"""Redis going away: producers fail clearly and fast; the worker waits and carries on."""

from __future__ import annotations

import time

import pytest

from lorafleet.producer import SamplingParams, SyncClient
from lorafleet.producer.errors import QueueUnavailableError
from lorafleet.producer.redis_server import EmbeddedRedis, free_port
from lorafleet.worker.local.launcher import WorkerProcess

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(max_tokens=4, temperature=0.0)


@pytest.fixture(scope="module")
def outage(make_worker_config, tmp_path_factory):
    """A worker started *before* its Redis exists (it must wait for it), and that Redis.
    This one runs through plain `arq lorafleet.worker.WorkerSettings`."""
    server = EmbeddedRedis(port=free_port())
    config = make_worker_config(server.url)
    log = tmp_path_factory.mktemp("outage") / "worker.log"
    worker = WorkerProcess(config, log_path=log, arq_cli=True).start()
    try:
        time.sleep(1.0)
        assert worker.running, worker.log_tail()
        server.start()
        worker.wait_ready(timeout=180)
        yield server, worker
    finally:
        worker.stop()
        server.stop()


def test_worker_resumes_after_redis_restart(outage):
    server, worker = outage
    url, queue = worker.config.redis_url, worker.config.queue
    with SyncClient(url, queue_name=queue) as client:
        before = client.generate("before", GREEDY)[0].outputs[0].token_ids

    with SyncClient(url, queue_name=queue, connect_timeout=1) as client:
        long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
        waiting = client.submit("waiting when Redis dies", long)
        server.stop(keep_data=True)
        start = time.monotonic()
        with pytest.raises(QueueUnavailableError, match="lost the connection"):
            waiting.result(timeout=30)
        assert time.monotonic() - start < 3  # about connect_timeout, not the job's time

    start = time.monotonic()
    with pytest.raises(QueueUnavailableError, match="unavailable"):
        SyncClient(url, queue_name=queue, connect_timeout=1).generate("during")
    assert time.monotonic() - start < 1.5
    time.sleep(1.5)  # the worker's commands fail and retry meanwhile
    assert worker.running

    server.start()  # same port, empty (persistence off)
    pid = worker.pid
    with SyncClient(url, queue_name=queue) as client:
        after = client.generate("before", GREEDY, timeout=60)[0].outputs[0].token_ids
    assert after == before
    assert worker.running and worker.pid == pid
