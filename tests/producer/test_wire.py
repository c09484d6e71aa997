"""Wire types and the versioned codec: round trips, validation on decode, version checks."""

from __future__ import annotations

import msgspec
import pytest

from lorafleet.producer import CompletionOutput, LoRARequest, RequestOutput, SamplingParams
from lorafleet.producer.codec import (
    WIRE_VERSION,
    GenerateJob,
    JobResult,
    decode_job,
    decode_result,
    encode,
)
from lorafleet.producer.errors import (
    AdapterNotFoundError,
    ErrorInfo,
    InvalidRequestError,
    LoraFleetError,
    UnsupportedVersionError,
    error_from_info,
)


def _job(**kw) -> GenerateJob:
    base = dict(
        request_id="j1",
        prompt="hi",
        sampling_params=SamplingParams(max_tokens=4, stop=["\n"], seed=3),
        lora_request=LoRARequest("sql", 1, "/adapters/sql", base_model_name="m"),
        enqueued_at=1.5,
    )
    return GenerateJob(**(base | kw))


def test_lora_request_positional_like_vllm():
    r = LoRARequest("sql", 1, "/adapters/sql")
    assert (r.lora_name, r.lora_int_id, r.lora_path) == ("sql", 1, "/adapters/sql")
    assert r.adapter_id == 1 and r.name == "sql" and r.path == "/adapters/sql"
    assert r == LoRARequest("sql", 1, "/adapters/sql") and hash(r) == hash(
        LoRARequest("sql", 1, "/adapters/sql")
    )


def test_sampling_defaults_match_vllm():
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_tokens) == (16, 1.0, 1.0, 0, 0)
    assert SamplingParams(stop="END").stop == ["END"]


def test_job_round_trip():
    job = _job()
    assert decode_job(encode(job)) == job
    assert decode_job(encode(_job(lora_request=None))).lora_request is None


def test_result_round_trip():
    out = RequestOutput(
        request_id="j1",
        prompt="hi",
        prompt_token_ids=[1, 2],
        outputs=[
            CompletionOutput(index=0, text="yo", token_ids=[3], finish_reason="stop", stop_reason=3)
        ],
        finished=True,
        lora_request=LoRARequest("a", 2, "/p"),
    )
    res = JobResult(request_id="j1", output=out)
    assert decode_result(encode(res)) == res
    err = JobResult(request_id="j1", error=ErrorInfo("adapter_not_found", "no folder"))
    back = decode_result(encode(err))
    exc = error_from_info(back.error)
    assert isinstance(exc, AdapterNotFoundError) and exc.code == "adapter_not_found"


@pytest.mark.parametrize(
    "payload, match",
    [
        (b"\xc1garbage", "malformed job"),
        (msgspec.msgpack.encode({"v": WIRE_VERSION}), "invalid job"),
        (
            msgspec.msgpack.encode(
                {
                    "v": WIRE_VERSION,
                    "request_id": "x",
                    "prompt": "p",
                    "sampling_params": {"max_tokens": "many"},
                }
            ),
            "invalid job",
        ),
        (
            msgspec.msgpack.encode(
                {
                    "v": WIRE_VERSION,
                    "request_id": "x",
                    "prompt": "p",
                    "sampling_params": {"max_tokens": 0},
                }
            ),
            "max_tokens must be at least 1",
        ),
        (
            msgspec.msgpack.encode(
                {
                    "v": WIRE_VERSION,
                    "request_id": "x",
                    "prompt": "p",
                    "sampling_params": {},
                    "lora_request": {"lora_name": "a", "lora_int_id": 0, "lora_path": "/p"},
                }
            ),
            "lora_int_id must be > 0",
        ),
        (msgspec.msgpack.encode([1, 2, 3]), "malformed job"),
    ],
)
def test_bad_payloads_are_typed_errors(payload, match):
    with pytest.raises(InvalidRequestError, match=match):
        decode_job(payload)


def test_unknown_version_is_named():
    data = msgspec.msgpack.encode({"v": 99, "anything": 1})
    with pytest.raises(UnsupportedVersionError, match="version 99"):
        decode_job(data)


def test_unknown_error_code_still_raises_typed_base():
    exc = error_from_info(ErrorInfo("brand_new_code", "msg"))
    assert isinstance(exc, LoraFleetError) and exc.code == "brand_new_code"
