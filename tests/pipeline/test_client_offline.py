"""Client behaviour that needs no worker: argument rules, unreachable Redis, imports."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time

import pytest

from lorafleet.producer import Client, LoRARequest, SamplingParams, SyncClient
from lorafleet.producer.errors import QueueUnavailableError
from lorafleet.producer.redis_server import free_port

SQL = LoRARequest("sql", 1, "/adapters/sql")


def test_producer_never_imports_torch():
    code = (
        "import sys, lorafleet.producer, lorafleet.producer.redis_server, "
        "lorafleet.producer.watch; assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_worker_package_and_settings_stay_light(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    code = (
        "import sys, lorafleet.worker as w; s = w.WorkerSettings; "
        "assert s.max_jobs >= 8 and s.poll_delay <= 0.05, s; "
        "import lorafleet.worker.cli, lorafleet.worker.local.launcher; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    env = {"LORAFLEET_MODEL": str(tmp_path), "LORAFLEET_MAX_NUM_SEQS": "8", "PATH": ""}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


@pytest.mark.parametrize(
    "loras, message",
    [([SQL], "1 entries for 2 prompts"), ([SQL, None, SQL], "3 entries for 2 prompts")],
)
def test_generate_rejects_lora_list_of_wrong_length(loras, message):
    client = SyncClient("redis://127.0.0.1:1/0")  # checked before connecting
    try:
        with pytest.raises(ValueError, match=message):
            client.generate(["a", "b"], SamplingParams(), lora_request=loras)
    finally:
        client.close()


def test_submit_checks_arguments_before_touching_redis():
    async def go():
        client = Client("redis://127.0.0.1:1/0")
        with pytest.raises(TypeError):
            await client.submit(["a"])
        with pytest.raises(ValueError, match="empty"):
            await client.submit("")
        with pytest.raises(ValueError, match="not both"):
            await client.submit("a", deadline=time.time(), timeout=1)
        with pytest.raises(TypeError, match="lora_request"):
            await client.submit("a", lora_request="sql")

    asyncio.run(go())


def test_refused_connection_is_a_clear_error():
    url = f"redis://127.0.0.1:{free_port()}/0"
    start = time.monotonic()
    with pytest.raises(QueueUnavailableError, match="unavailable") as info:
        SyncClient(url, connect_timeout=2).generate("hi")
    assert time.monotonic() - start < 2
    assert info.value.code == "queue_unavailable" and url in str(info.value)


@pytest.mark.parametrize("timeout", [0.3, 1.0])
def test_silent_server_times_out_within_connect_timeout(timeout):
    """A socket that accepts but never answers (a hung or black-holed Redis)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"

        async def go():
            async with Client(url, connect_timeout=timeout) as client:
                await client.submit("hi")

        start = time.monotonic()
        with pytest.raises(QueueUnavailableError, match=f"within {timeout:g}s"):
            asyncio.run(go())
        assert timeout <= time.monotonic() - start < timeout + 0.5


def test_password_is_not_echoed():
    url = f"redis://user:s3cret@127.0.0.1:{free_port()}/0"
    with pytest.raises(QueueUnavailableError) as info:
        SyncClient(url, connect_timeout=1).connect()
    assert "s3cret" not in str(info.value) and "***" in str(info.value)
