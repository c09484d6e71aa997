"""Fuzzing what a worker does with a job payload before the engine sees it: decoding,
salvaging the reply inbox, and the worker's limits. Whatever the bytes, the outcome is a
valid job or a typed ``LoraFleetError``, quickly: never another exception, never a hang."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorafleet.producer.codec import GenerateJob, decode_job
from lorafleet.producer.errors import LoraFleetError
from lorafleet.worker.serve.validation import JobLimits, check_job, salvage_reply_to

LIMITS = JobLimits(max_model_len=512)
MIN_PAYLOADS = 1000

# Values of every msgpack type, with the edge cases that break naive code.
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.text(alphabet="\x00/.~\\", max_size=8),
    st.binary(max_size=40),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=20,
)

_VALID: dict[str, Any] = {
    "v": 1,
    "request_id": "fuzz",
    "prompt": "hello",
    "sampling_params": {"max_tokens": 8, "temperature": 0.5, "stop": ["\n"]},
    "lora_request": {"lora_name": "sql", "lora_int_id": 3, "lora_path": "/adapters/sql"},
    "enqueued_at": 1.0,
    "deadline": None,
    "reply_to": "lorafleet:inbox:abc",
}
_LORA_FIELDS = ("lora_name", "lora_int_id", "lora_path", "long_lora_max_len", "base_model_name")
_SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_tokens", "seed", "stop",
                    "stop_token_ids", "ignore_eos")  # fmt: skip


@st.composite
def _mutated_jobs(draw: st.DrawFn) -> bytes:
    """A valid job with fields replaced, removed or added, at the top level and inside
    ``sampling_params`` and ``lora_request``."""
    job = {**_VALID, "sampling_params": {**_VALID["sampling_params"]}}
    job["lora_request"] = {**_VALID["lora_request"]}
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.sampled_from(["top", "sampling_params", "lora_request"]))
        fields = {"top": [*_VALID, "extra"], "sampling_params": _SAMPLING_FIELDS}
        key = draw(st.sampled_from(fields.get(where, _LORA_FIELDS)))
        target = job if where == "top" else job.get(where)
        if not isinstance(target, dict):
            target = job[where] = {}
        if draw(st.booleans()):
            target.pop(key, None)
        else:
            target[key] = draw(_values)
    return msgspec.msgpack.encode(job)


_payloads = st.one_of(
    st.binary(max_size=300),
    _values.map(msgspec.msgpack.encode),
    _mutated_jobs(),
)


def _worker_side(payload: bytes) -> GenerateJob | LoraFleetError:
    """What ``lorafleet.worker.serve.jobs.generate`` does before the engine: the job or its error."""
    salvage_reply_to(payload)  # never raises
    try:
        job = decode_job(payload)
        check_job(job, LIMITS)
    except LoraFleetError as e:
        assert e.code in ("invalid_request", "unsupported_version", "prompt_too_long")
        assert e.message
        return e
    return job


def test_any_payload_gives_a_job_or_a_typed_error_quickly():
    outcomes = {"job": 0, "error": 0}

    @settings(
        max_examples=1200,
        deadline=timedelta(milliseconds=500),
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(_payloads)
    def check(payload: bytes) -> None:
        start = time.perf_counter()
        outcome = _worker_side(payload)
        assert time.perf_counter() - start < 0.1
        outcomes["job" if isinstance(outcome, GenerateJob) else "error"] += 1

    check()
    assert sum(outcomes.values()) >= MIN_PAYLOADS
    # The fuzzer must reach both sides, or it is not exercising validation.
    assert outcomes["job"] > 0 and outcomes["error"] > 0


def test_the_valid_seed_job_is_accepted():
    job = _worker_side(msgspec.msgpack.encode(_VALID))
    assert isinstance(job, GenerateJob) and job.lora_request.lora_int_id == 3
