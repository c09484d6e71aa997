"""End to end: producers -> real Redis -> a real worker process -> results and streams."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import pytest
import redis

from lorafleet.producer import Client, LoRARequest, SamplingParams
from lorafleet.producer.codec import encode
from lorafleet.producer.errors import (
    AbortedError,
    AdapterInvalidError,
    AdapterNotFoundError,
    AdapterPathForbiddenError,
    AdapterRankTooLargeError,
    DeadlineExceededError,
    LoraFleetError,
    PromptTooLongError,
)
from lorafleet.producer.keys import GENERATE_FUNCTION as GENERATE
from lorafleet.producer.keys import stream_key
from lorafleet.producer.stream import decode_event

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(max_tokens=8, temperature=0.0)
PROMPTS = ["hello world", "the queue", "lora", "adapters all the way down", "x", "redis"]


def _async_client(worker) -> Client:
    return Client(worker.config.redis_url, queue_name=worker.config.queue)


def test_outputs_match_the_in_process_engine(client, adapters, llama_dir, adapter_root):
    from lorafleet.worker import LLM

    loras = [None, adapters[0], adapters[1], None, adapters[2], adapters[5]]
    through_queue = client.generate(PROMPTS, GREEDY, lora_request=loras)
    llm = LLM(model=str(llama_dir), max_loras=4, max_model_len=256)
    in_process = llm.generate(PROMPTS, GREEDY, lora_request=loras)
    for q, local, lora in zip(through_queue, in_process, loras, strict=True):
        assert q.outputs[0].token_ids == local.outputs[0].token_ids
        assert q.outputs[0].text == local.outputs[0].text
        assert q.outputs[0].finish_reason == local.outputs[0].finish_reason
        assert q.prompt_token_ids == local.prompt_token_ids
        assert q.lora_request == lora


def test_single_prompt_and_one_adapter_for_all(client, adapters):
    (one,) = client.generate("hello", GREEDY, lora_request=adapters[3])
    both = client.generate(["hello", "hello"], GREEDY, lora_request=adapters[3])
    assert one.outputs[0].token_ids == both[0].outputs[0].token_ids == both[1].outputs[0].token_ids
    assert one.lora_request == adapters[3]


def test_200_concurrent_jobs_over_10_adapters_each_once(worker, adapters):
    n = 200
    params = SamplingParams(max_tokens=4, temperature=0.0)
    ids = [f"many-{uuid.uuid4().hex}" for _ in range(n)]

    async def go():
        async with _async_client(worker) as c:
            handles = await asyncio.gather(
                *(
                    c.submit(f"prompt {i}", params, adapters[i % 10], job_id=ids[i])
                    for i in range(n)
                )
            )
            return await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), 120)

    outs = asyncio.run(go())
    assert [o.request_id for o in outs] == ids
    assert all(o.lora_request == adapters[i % 10] for i, o in enumerate(outs))
    assert all(len(o.outputs[0].token_ids) >= 1 and o.finished for o in outs)
    r = redis.Redis.from_url(worker.config.redis_url)
    for job_id in ids:  # each job ran exactly once: one attempt, one final event
        events = [decode_event(f[b"e"]) for _, f in r.xrange(stream_key(job_id))]
        assert [e.attempt for e in events if e.final] == [1]
        assert {e.attempt for e in events} == {1}
    assert r.zcard(worker.config.queue) == 0
    assert not list(r.scan_iter("arq:in-progress:many-*"))


def test_stream_deltas_concatenate_to_the_final_text(client, worker, adapters):
    params = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    handles = [
        client.submit(p, params, lr) for p, lr in zip(PROMPTS, [None, *adapters[:5]], strict=True)
    ]
    pieces = [list(h.stream()) for h in handles]
    for handle, deltas in zip(handles, pieces, strict=True):
        out = handle.result(timeout=30)
        assert "".join(deltas) == out.outputs[0].text
    assert max(len(d) for d in pieces) > 1, "expected tokens to arrive in several deltas"

    async def via_async():
        async with _async_client(worker) as c:
            deltas = [d async for d in c.stream("async stream", params, adapters[7])]
            (out,) = await c.generate("async stream", params, adapters[7])
            return deltas, out

    deltas, out = asyncio.run(via_async())
    assert "".join(deltas) == out.outputs[0].text
    assert (
        "".join(client.stream("sync stream", params))
        == client.generate("sync stream", params)[0].outputs[0].text
    )


def _bad_adapters(root, llama_dir, outside) -> dict[str, LoRARequest]:
    from lorafleet.worker.demo.synthetic import build_random_adapter

    corrupt = root / "corrupt"
    corrupt.mkdir(exist_ok=True)
    (corrupt / "adapter_config.json").write_text("{ not json")
    build_random_adapter(llama_dir, root / "huge", rank=128, seed=1)
    build_random_adapter(llama_dir, outside / "elsewhere", rank=4, seed=2)
    return {
        "missing": LoRARequest("missing", 101, str(root / "missing")),
        "corrupt": LoRARequest("corrupt", 102, str(corrupt)),
        "huge": LoRARequest("huge", 103, str(root / "huge")),
        "outside": LoRARequest("outside", 104, str(outside / "elsewhere")),
    }


def test_bad_requests_get_typed_errors_while_the_batch_completes(
    client, adapters, adapter_root, llama_dir, tmp_path
):
    bad = _bad_adapters(adapter_root, llama_dir, tmp_path)
    good = [(p, lr) for p, lr in zip(PROMPTS, [None, *adapters[:5]], strict=True)]
    plan = [
        *good[:3],
        ("x", bad["missing"]),
        *good[3:],
        ("x", bad["corrupt"]),
        ("x", bad["huge"]),
        ("x", bad["outside"]),
        ("y" * 400, None),  # longer than max_model_len (256)
    ]
    handles = [client.submit(p, GREEDY, lr) for p, lr in plan]
    expected = {
        3: AdapterNotFoundError,
        7: AdapterInvalidError,
        8: AdapterRankTooLargeError,
        9: AdapterPathForbiddenError,
        10: PromptTooLongError,
    }
    reference = client.generate([p for p, _ in good], GREEDY, lora_request=[lr for _, lr in good])
    got = []
    for i, handle in enumerate(handles):
        if i in expected:
            with pytest.raises(expected[i]) as info:
                handle.result(timeout=30)
            assert info.value.code == expected[i].code and info.value.message
        else:
            got.append(handle.result(timeout=30).outputs[0].token_ids)
    assert got == [r.outputs[0].token_ids for r in reference]
    with pytest.raises(AdapterNotFoundError):  # generate() raises the first error
        client.generate(["a", "b"], GREEDY, lora_request=[adapters[0], bad["missing"]])


def test_malformed_payload_is_answered_not_crashed(worker, client):
    async def go():
        async with _async_client(worker) as c:
            arq, _ = await c._connected()
            await arq.enqueue_job(
                GENERATE, b"\x93junk", _job_id="junk-job", _queue_name=c.queue_name
            )
            await arq.enqueue_job(
                GENERATE, encode(_future_job()), _job_id="v99-job", _queue_name=c.queue_name
            )
            errors = []
            for job_id in ("junk-job", "v99-job"):
                with pytest.raises(LoraFleetError) as info:
                    await (await c.job(job_id)).result(timeout=30)
                errors.append(info.value.code)
            return errors

    assert asyncio.run(go()) == ["invalid_request", "unsupported_version"]
    assert client.generate("still alive", GREEDY)[0].finished


def _future_job():
    import msgspec

    class Future(msgspec.Struct):
        v: int
        request_id: str

    return Future(v=99, request_id="v99-job")


def test_abort_stops_a_running_job(client):
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    handle = client.submit("abort me", params)
    stream = handle.stream()
    next(stream)  # it is generating
    start = time.monotonic()
    handle.abort()
    with pytest.raises(AbortedError):
        for _ in stream:
            pass
    with pytest.raises(AbortedError):
        handle.result(timeout=10)
    assert time.monotonic() - start < 5


def test_abort_before_start_and_deadlines(client):
    job_id = f"pre-aborted-{uuid.uuid4().hex}"
    client.abort(job_id)
    with pytest.raises(AbortedError, match="before it started"):
        client.submit("never runs", GREEDY, job_id=job_id).result(timeout=10)
    with pytest.raises(DeadlineExceededError, match="in the queue"):
        client.submit("too late", GREEDY, deadline=time.time() - 1).result(timeout=10)
    params = SamplingParams(max_tokens=240, temperature=0.0, ignore_eos=True)
    with pytest.raises(DeadlineExceededError):
        client.submit("slow", params, timeout=0.05).result(timeout=10)


def test_job_id_is_an_idempotency_key(client, worker):
    job_id = f"idem-{uuid.uuid4().hex}"
    first = client.submit("same job", GREEDY, job_id=job_id)
    second = client.submit("same job", GREEDY, job_id=job_id)
    a, b = first.result(timeout=30), second.result(timeout=30)
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    later = client.submit("same job", GREEDY, job_id=job_id).result(timeout=30)
    assert later.outputs[0].token_ids == a.outputs[0].token_ids
    r = redis.Redis.from_url(worker.config.redis_url)
    finals = [decode_event(f[b"e"]) for _, f in r.xrange(stream_key(job_id))]
    assert sum(e.final for e in finals) == 1


def test_result_survives_an_expired_stream(client, worker):
    handle = client.submit("durable", GREEDY)
    out = handle.result(timeout=30)
    r = redis.Redis.from_url(worker.config.redis_url)
    r.delete(stream_key(handle.job_id))  # as if its TTL ran out
    again = client.job(handle.job_id).result(timeout=10)
    assert again.outputs[0].token_ids == out.outputs[0].token_ids


def test_worker_registered_itself(worker):
    from lorafleet.producer.keys import WORKERS_KEY

    info = json.loads(
        redis.Redis.from_url(worker.config.redis_url).hget(WORKERS_KEY, worker.config.name)
    )
    assert info["pid"] == worker.pid and info["queue"] == worker.config.queue


def test_sync_client_works_inside_a_running_event_loop(worker):
    """As in Jupyter: sync calls from a thread whose loop is running."""
    from lorafleet.producer import SyncClient

    async def notebook_cell():
        with SyncClient(worker.config.redis_url, queue_name=worker.config.queue) as c:
            return c.generate("from a notebook", GREEDY)

    (out,) = asyncio.run(notebook_cell())
    assert out.finished


def test_a_handle_outlives_its_unreferenced_client(worker):
    from lorafleet.producer import SyncClient

    handle = SyncClient(worker.config.redis_url, queue_name=worker.config.queue).submit("x", GREEDY)
    assert handle.result(timeout=30).finished
