"""Bad input through the queue, all in one batch with good jobs: every bad job gets its typed
error within a second, the good ones get the same output as in a clean batch, the worker
stays up; a thousand jobs naming a broken adapter read the disk once."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
import pytest
import torch
from arq.connections import ArqRedis, create_pool
from reliability_support import MAX_MODEL_LEN, fresh_entry
from safetensors.torch import load_file, save_file

from lorafleet.producer import Client, LoRARequest, SamplingParams
from lorafleet.producer.codec import arq_deserialize, arq_serialize
from lorafleet.producer.errors import LoraFleetError
from lorafleet.producer.keys import GENERATE_FUNCTION, arq_job_key
from lorafleet.worker.serve.redis_url import redis_settings_from_url

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(max_tokens=8, temperature=0.0)
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def _variant(good: Path, folder: Path, *, config: dict | None = None, tensors=None) -> str:
    """A copy of adapter ``good`` in ``folder`` with its config updated / tensors edited."""
    shutil.copytree(good, folder)
    if config is not None:
        cfg = json.loads((folder / CONFIG).read_text())
        (folder / CONFIG).write_text(json.dumps({**cfg, **config}))
    if tensors is not None:
        weights = load_file(folder / WEIGHTS)
        save_file(tensors(weights), folder / WEIGHTS)
    return str(folder)


def _wrong_shape(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    key = next(k for k in weights if k.endswith("lora_A.weight"))
    return {**weights, key: torch.zeros(weights[key].shape[0], weights[key].shape[1] + 1)}


def _nan(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    key = next(iter(weights))
    return {**weights, key: torch.full_like(weights[key], float("nan"))}


@pytest.fixture(scope="module")
def bad_adapters(rel_adapter_root, rel_adapters, tmp_path_factory) -> dict[str, tuple]:
    """name -> (LoRARequest, expected code, part of the expected message): every adapter
    error the engine knows
    that a worker can meet (LoRA is always enabled on a worker, so not ``lora_disabled``)."""
    root = rel_adapter_root / f"bad-{uuid.uuid4().hex[:6]}"
    root.mkdir()
    outside = tmp_path_factory.mktemp("outside")
    good = Path(rel_adapters[0].lora_path)
    paths: dict[str, tuple[str, str, str]] = {
        "missing": (str(root / "missing"), "adapter_not_found", "no folder"),
        "hub_id": ("some-org/some-adapter", "adapter_not_found", "hub is disabled"),
        "corrupt_json": (str(root / "corrupt_json"), "adapter_invalid", "not valid JSON"),
        "pickle_only": (str(root / "pickle_only"), "adapter_invalid", "pickle"),
        "too_big_file": (str(root / "too_big_file"), "adapter_invalid", "1048576-byte limit"),
        "wrong_shapes": (_variant(good, root / "wrong_shapes", tensors=_wrong_shape), "adapter_invalid", "expected A"),
        "nan_weights": (_variant(good, root / "nan_weights", tensors=_nan), "adapter_invalid", "NaN"),
        "dora": (_variant(good, root / "dora", config={"use_dora": True}), "adapter_invalid", "DoRA"),
        "rank_128": (_variant(good, root / "rank_128", config={"r": 128}), "adapter_rank_too_large", "rank 128"),
        "outside": (_variant(good, outside / "elsewhere"), "adapter_path_forbidden", "outside"),
        "traversal": (str(root / ".." / ".." / outside.name / "elsewhere"), "adapter_path_forbidden", "outside"),
        "symlink": (str(root / "symlink"), "adapter_path_forbidden", "outside"),
    }  # fmt: skip
    (root / "corrupt_json").mkdir()
    (root / "corrupt_json" / CONFIG).write_text("{ not json")
    _variant(good, root / "pickle_only")
    (root / "pickle_only" / WEIGHTS).rename(root / "pickle_only" / "adapter_model.bin")
    _variant(good, root / "too_big_file")
    (root / "too_big_file" / WEIGHTS).write_bytes(b"\0" * (2 * 2**20))  # limit: 1 MiB
    (root / "symlink").symlink_to(outside / "elsewhere", target_is_directory=True)
    made = {
        name: (LoRARequest(name, 100 + i, path), code, fragment)
        for i, (name, (path, code, fragment)) in enumerate(paths.items())
    }
    # The id of a good adapter with another path; a good adapter for another base model.
    made["id_conflict"] = (
        LoRARequest("other", rel_adapters[0].lora_int_id, str(root)),
        "adapter_conflict",
        "already bound",
    )
    made["base_model"] = (
        LoRARequest("good1", rel_adapters[1].lora_int_id, rel_adapters[1].lora_path, base_model_name="gpt-x"),
        "adapter_invalid",
        "'gpt-x'",
    )  # fmt: skip
    return made


def _job(**fields: Any) -> dict[str, Any]:
    base = {"v": 1, "request_id": "x", "prompt": "hi", "sampling_params": {"max_tokens": 4}}
    return {**base, **fields}


def _lora(**fields: Any) -> dict[str, Any]:
    return {"lora_name": "a", "lora_int_id": 5, "lora_path": "/x", **fields}


#: name -> (arq argument for ``generate``, expected code, part of the expected message): what a buggy or hostile producer
#: could put on the queue. Produced with plain msgpack, as no lorafleet client would.
RAW_PAYLOADS: dict[str, tuple[Any, str, str]] = {
    "junk_bytes": (b"\x93junk", "invalid_request", "malformed job payload"),
    "not_a_map": (msgspec.msgpack.encode([1, 2, 3]), "invalid_request", "malformed job payload"),
    "not_bytes": ("a string, not bytes", "invalid_request", "must be bytes"),
    "future_version": (msgspec.msgpack.encode(_job(v=99)), "unsupported_version", "version 99"),
    "missing_prompt": (msgspec.msgpack.encode({"v": 1, "request_id": "x"}), "invalid_request", "`prompt`"),
    "wrong_type": (msgspec.msgpack.encode(_job(sampling_params={"max_tokens": "ten"})), "invalid_request", "max_tokens"),
    "empty_prompt": (msgspec.msgpack.encode(_job(prompt="")), "invalid_request", "prompt cannot be empty"),
    "lora_id_zero": (msgspec.msgpack.encode(_job(lora_request=_lora(lora_int_id=0))), "invalid_request", "lora_int_id must be > 0"),
    "lora_no_path": (msgspec.msgpack.encode(_job(lora_request=_lora(lora_path=""))), "invalid_request", "lora_path cannot be empty"),
    "long_lora": (msgspec.msgpack.encode(_job(lora_request=_lora(long_lora_max_len=4096))), "invalid_request", "LongLoRA"),
    "nul_in_path": (msgspec.msgpack.encode(_job(lora_request=_lora(lora_path="/x\x00y"))), "invalid_request", "NUL"),
    "nan_temperature": (msgspec.msgpack.encode(_job(sampling_params={"temperature": float("nan")})), "invalid_request", "temperature"),
    "nan_deadline": (msgspec.msgpack.encode(_job(deadline=float("nan"))), "invalid_request", "deadline must be a finite"),
    "absurd_max_tokens": (msgspec.msgpack.encode(_job(sampling_params={"max_tokens": 10**12})), "invalid_request", "max_tokens is 1000000000000"),
    "max_tokens_over_len": (msgspec.msgpack.encode(_job(sampling_params={"max_tokens": MAX_MODEL_LEN + 1})), "invalid_request", "max_model_len of 512"),
    "prompt_over_len": (msgspec.msgpack.encode(_job(prompt="y" * (MAX_MODEL_LEN + 10))), "prompt_too_long", "tokens; max_model_len is 512"),
    "huge_prompt": (msgspec.msgpack.encode(_job(prompt="z" * 2_000_000)), "prompt_too_long", "2000000 characters"),
    "many_stops": (msgspec.msgpack.encode(_job(sampling_params={"stop": ["s"] * 100_000})), "invalid_request", "stop takes at most"),
}  # fmt: skip


async def _arq_pool(url: str) -> ArqRedis:
    return await create_pool(
        redis_settings_from_url(url), job_serializer=arq_serialize, job_deserializer=arq_deserialize
    )


async def _outcome(handle) -> tuple[str, Any, float]:
    """('ok', output, when) or (error code, error, when), ``when`` a monotonic time."""
    try:
        output = await asyncio.wait_for(handle.result(), 30)
    except LoraFleetError as e:
        return e.code, e, time.monotonic()
    return "ok", output, time.monotonic()


def test_every_bad_job_gets_its_typed_error_while_the_batch_completes(
    shared_worker, rel_adapters, bad_adapters
):
    url, queue = shared_worker.config.redis_url, shared_worker.config.queue
    good = [(f"good prompt {i}", [None, *rel_adapters][i % 4]) for i in range(8)]

    async def scenario():
        async with Client(url, queue_name=queue) as client:
            arq = await _arq_pool(url)
            try:
                submitted: dict[str, tuple[Any, float]] = {}
                for i, (prompt, lora) in enumerate(good):
                    submitted[f"good{i}"] = (
                        await client.submit(prompt, GREEDY, lora),
                        time.monotonic(),
                    )
                for name, (lora, _, _) in bad_adapters.items():
                    submitted[name] = (await client.submit("x", GREEDY, lora), time.monotonic())
                for name, (payload, _, _) in RAW_PAYLOADS.items():
                    job_id = f"raw-{name}-{uuid.uuid4().hex}"
                    await arq.enqueue_job(
                        GENERATE_FUNCTION, payload, _job_id=job_id, _queue_name=queue
                    )
                    submitted[name] = (await client.job(job_id), time.monotonic())
                outcomes = await asyncio.gather(*(_outcome(h) for h, _ in submitted.values()))
                reference = await client.generate(
                    [p for p, _ in good], GREEDY, lora_request=[lr for _, lr in good]
                )
            finally:
                await arq.aclose()
            return (
                dict(zip(submitted, outcomes, strict=True)),
                {k: t for k, (_, t) in submitted.items()},
                reference,
            )

    outcomes, sent_at, reference = asyncio.run(scenario())

    cases = {**bad_adapters, **RAW_PAYLOADS}
    assert {name: outcomes[name][0] for name in cases} == {n: c for n, (_, c, _) in cases.items()}
    for name, (_, _, fragment) in cases.items():
        _, error, when = outcomes[name]
        assert fragment in error.message, (name, error.message)
        assert when - sent_at[name] < 1.0, (name, when - sent_at[name])
    for name, (lora, _, _) in bad_adapters.items():  # adapter errors name the adapter
        assert repr(lora.lora_name) in outcomes[name][1].message, name
    tokens = [outcomes[f"good{i}"][1].outputs[0].token_ids for i in range(len(good))]
    assert tokens == [r.outputs[0].token_ids for r in reference]
    assert shared_worker.running


def test_jobs_arq_itself_cannot_run_are_answered(shared_worker):
    """A corrupt arq envelope and a call with extra arguments never reach lorafleet's code;
    arq records them as failed and the client's sweep of arq's results answers them."""
    url, queue = shared_worker.config.redis_url, shared_worker.config.queue

    async def scenario():
        async with Client(url, queue_name=queue) as client:
            arq = await _arq_pool(url)
            try:
                corrupt, extra = f"corrupt-{uuid.uuid4().hex}", f"extra-{uuid.uuid4().hex}"
                await arq.set(arq_job_key(corrupt), b"\xc1 not msgpack")
                await arq.zadd(queue, {corrupt: time.time() * 1000})
                await arq.enqueue_job(
                    GENERATE_FUNCTION, b"", "extra", _job_id=extra, _queue_name=queue
                )
                start = time.monotonic()
                outcomes = [await _outcome(await client.job(j)) for j in (corrupt, extra)]
                return outcomes, time.monotonic() - start
            finally:
                await arq.aclose()

    outcomes, took = asyncio.run(scenario())
    assert [code for code, _, _ in outcomes] == ["internal_error", "internal_error"]
    assert "failed in the queue" in outcomes[1][1].message
    assert took < 5
    assert shared_worker.running


def test_a_thousand_jobs_naming_a_broken_adapter_read_it_once(shared_worker, rel_adapter_root):
    url, queue, name = (
        shared_worker.config.redis_url,
        shared_worker.config.queue,
        shared_worker.config.name,
    )
    folder = rel_adapter_root / f"broken-{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    (folder / CONFIG).write_text('{"peft_type": "LORA", "r": "eight"}')
    broken = LoRARequest("broken", 9000, str(folder))
    before = fresh_entry(url, name, time.time())["engine"]

    async def scenario():
        async with Client(url, queue_name=queue) as client:
            handles = await asyncio.gather(
                *(client.submit(f"p{i}", GREEDY, broken) for i in range(1000))
            )
            return await asyncio.gather(*(_outcome(h) for h in handles))

    outcomes = asyncio.run(scenario())
    assert {code for code, _, _ in outcomes} == {"adapter_invalid"}
    assert all("'broken'" in error.message for _, error, _ in outcomes)
    after = fresh_entry(url, name, time.time())["engine"]
    assert after["adapter_load_failures"] - before["adapter_load_failures"] == 1
    assert after["adapter_failure_cache_hits"] - before["adapter_failure_cache_hits"] == 999
