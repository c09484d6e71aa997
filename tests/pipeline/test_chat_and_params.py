"""Chat and vLLM's sampling parameters through the queue: what a producer sends is what the
in-process engine would do, and jobs of the previous wire version are still served."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid

import msgspec
import pytest

from lorafleet.producer import SamplingParams
from lorafleet.producer.codec import arq_deserialize, arq_serialize, decode_result
from lorafleet.producer.errors import InvalidRequestError, UnsupportedVersionError
from lorafleet.producer.keys import GENERATE_FUNCTION

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(max_tokens=8, temperature=0.0)
CHATS = [
    [{"role": "user", "content": "hello"}],
    [{"role": "system", "content": "be terse"}, {"role": "user", "content": "queue"}],
    [{"role": "user", "content": "lora"}],
]


@pytest.fixture(scope="module")
def local_llm(llama_dir):
    from lorafleet.worker import LLM

    return LLM(model=str(llama_dir), max_loras=4, max_model_len=256, device="cpu")


def test_chat_through_the_queue_equals_llm_chat(client, adapters, local_llm):
    loras = [None, adapters[0], adapters[4]]
    through_queue = client.chat(CHATS, GREEDY, lora_request=loras)
    in_process = local_llm.chat(CHATS, GREEDY, lora_request=loras)
    for q, local in zip(through_queue, in_process, strict=True):
        assert q.prompt == local.prompt and q.prompt.startswith("<|bos|>")
        assert q.prompt_token_ids == local.prompt_token_ids
        assert q.outputs[0].token_ids == local.outputs[0].token_ids


def test_a_chat_job_streams_like_a_prompt_job(client):
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    handle = client.submit(messages=CHATS[1], sampling_params=params)
    deltas = list(handle.stream())
    assert "".join(deltas) == handle.result(timeout=30).outputs[0].text
    assert "".join(client.stream(messages=CHATS[0], sampling_params=params))


def test_n_logprobs_and_penalties_travel_with_the_job(client, adapters, local_llm):
    params = SamplingParams(
        n=3,
        max_tokens=6,
        temperature=1.0,
        seed=3,
        logprobs=2,
        prompt_logprobs=1,
        repetition_penalty=1.2,
        min_p=0.02,
    )
    (queued,) = client.generate("abc", params, lora_request=adapters[2])
    (local,) = local_llm.generate("abc", params, lora_request=adapters[2])
    assert [c.token_ids for c in queued.outputs] == [c.token_ids for c in local.outputs]
    assert len(queued.outputs) == 3
    for q, c in zip(queued.outputs, local.outputs, strict=True):
        assert q.cumulative_logprob == pytest.approx(c.cumulative_logprob, abs=1e-4)
        assert [set(e) for e in q.logprobs] == [set(e) for e in c.logprobs]
    assert queued.prompt_logprobs[0] is None and len(queued.prompt_logprobs) == 3
    handle = client.submit("abc", params)
    with pytest.raises(ValueError, match="n=3 completions: use result"):
        list(handle.stream())
    assert len(handle.result(timeout=30).outputs) == 3


def _raw_result(worker, payload: bytes, timeout: float = 60) -> bytes:
    """Enqueue a raw payload as a producer of another version would; the raw ``JobResult``."""
    from arq.connections import create_pool

    from lorafleet.worker.serve.redis_url import redis_settings_from_url

    async def go() -> bytes:
        arq = await create_pool(
            redis_settings_from_url(worker.config.redis_url),
            job_serializer=arq_serialize,
            job_deserializer=arq_deserialize,
        )
        try:
            job = await arq.enqueue_job(
                GENERATE_FUNCTION,
                payload,
                _job_id=f"raw-{uuid.uuid4().hex}",
                _queue_name=worker.config.queue,
            )
            return await job.result(timeout=timeout, poll_delay=0.05)
        finally:
            await arq.aclose()

    return asyncio.run(go())


def test_a_job_of_the_previous_wire_version_is_served_in_its_version(worker):
    v1 = {"v": 1, "request_id": "old", "prompt": "hello", "sampling_params": {"max_tokens": 3}}
    result = decode_result(_raw_result(worker, msgspec.msgpack.encode(v1)))
    assert result.v == 1 and result.error is None
    assert len(result.output.outputs[0].token_ids) == 3


def test_a_job_of_a_newer_wire_version_gets_a_version_error(worker):
    v9 = {"v": 9, "request_id": "new", "messages": [["user", "hi"]]}
    result = decode_result(_raw_result(worker, msgspec.msgpack.encode(v9)))
    assert result.error.code == UnsupportedVersionError.code
    assert "schema version 9 is not supported" in result.error.message


def test_chat_jobs_are_validated_before_the_engine(client):
    with pytest.raises(TypeError, match="not both or neither"):
        client.submit("x", messages=CHATS[0])
    too_many = [{"role": "user", "content": "x"}] * 1025
    with pytest.raises(InvalidRequestError, match="at most 1024 messages"):
        client.chat(too_many, GREEDY)


def test_generate_chat_from_the_command_line(worker):
    url, queue = worker.config.redis_url, worker.config.queue
    cmd = [sys.executable, "-m", "lorafleet.worker.cli", "generate", "--redis-url", url]
    cmd += ["--queue", queue, "--max-tokens", "4"]
    proc = subprocess.run(
        [*cmd, "--chat", "--system", "be brief", "hello"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    bad = subprocess.run([*cmd, "--system", "x", "hi"], capture_output=True, text=True)
    assert bad.returncode != 0 and "--system needs --chat" in bad.stderr
