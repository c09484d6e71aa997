"""A client's lifecycle against a real worker: leaving a stream early and closing the client
(async and sync) ends promptly, quietly, frees everything and aborts the job; timeouts say
what timed out."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lorafleet.producer import SamplingParams, SyncClient
from lorafleet.producer.errors import AbortedError

pytestmark = pytest.mark.slow

LONG = SamplingParams(max_tokens=240, temperature=0.0, ignore_eos=True)

# Each shape stops reading the stream at its first delta, while the job is generating, and
# closes the client. `started` learns the id of the job that stream() submits.
_SCRIPT = """
import asyncio, gc, sys
from lorafleet.producer import Client, SamplingParams, SyncClient

url, queue, shape = sys.argv[1:4]
params = SamplingParams(max_tokens=240, temperature=0.0, ignore_eos=True)
started = []
submit = Client.submit

async def recording_submit(self, *args, **kwargs):
    handle = await submit(self, *args, **kwargs)
    started.append(handle.job_id)
    return handle

Client.submit = recording_submit

async def main():
    async with Client(url, queue_name=queue) as client:
        async for _ in client.stream("stop early", params):
            break

async def main_holding_the_generator():
    # The generator outlives the client: the loop finalizes it only at shutdown.
    async with Client(url, queue_name=queue) as client:
        deltas = client.stream("stop early", params)
        async for _ in deltas:
            break
    return deltas

if shape == "async":
    asyncio.run(main())
elif shape == "async-held":
    asyncio.run(main_holding_the_generator())
else:
    with SyncClient(url, queue_name=queue) as client:
        for _ in client.stream("stop early", params):
            break
gc.collect()  # an unclosed socket or connection warns when collected
print(started[0])
"""


@pytest.mark.parametrize("shape", ["async", "async-held", "sync"])
def test_closing_the_client_after_leaving_a_stream_early(worker, client, shape):
    """The user's shape exactly: `asyncio.run(main())`, `async with Client(...)`, break out
    of `client.stream(...)` at the first delta. Leaving the `async with` used to hang for
    ever: redis-py swallowed the cancellation of the client's reading task (see
    `StreamWatcher.close`). The sync client did not hang but warned "giving up on 1 jobs",
    and a job whose stream was left could keep running."""
    command = [sys.executable, "-W", "always::ResourceWarning", "-c", _SCRIPT]
    command += [worker.config.redis_url, worker.config.queue, shape]
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("closing the client hung")
    assert run.returncode == 0, run.stderr
    # Quiet: no warning logged, no unclosed socket or connection, no task destroyed.
    assert run.stderr == ""
    job_id = run.stdout.split()[-1]
    with pytest.raises(AbortedError):
        client.job(job_id).result(timeout=30)


def test_result_timeout_says_which_job_and_that_it_keeps_running(client):
    handle = client.submit("slow", LONG)
    try:
        with pytest.raises(TimeoutError) as info:
            handle.result(timeout=0.05)
        message = str(info.value)
        assert handle.job_id in message and "0.05s" in message and "keeps running" in message
        assert not handle.done
    finally:
        handle.abort()  # only to spare the worker


def test_generate_timeout_has_a_message(client):
    with pytest.raises(TimeoutError, match=r"2 job\(s\) were done after 0.05s"):
        client.generate(["slow", "slower"], LONG, timeout=0.05)


def test_a_closed_sync_client_says_so():
    client = SyncClient("redis://127.0.0.1:1/0")  # never connects
    client.close()
    with pytest.raises(RuntimeError, match="SyncClient is closed"):
        client.generate("after close", LONG)
