"""Tenants and usage on the wire: validation with clear errors, on every producer entry
point, and compatibility with builds before the fields existed."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from lorafleet.producer import Client, SamplingParams
from lorafleet.producer.codec import GenerateJob, JobResult, decode_job, decode_result, encode
from lorafleet.producer.errors import InvalidRequestError
from lorafleet.producer.types import CompletionOutput, RequestOutput
from lorafleet.producer.usage import MAX_TENANT_LEN, Usage, check_tenant, tenant_problem


@pytest.mark.parametrize("tenant", [None, "acme", "a", "Team-7.prod:eu@x_y", "9" * MAX_TENANT_LEN])
def test_valid_tenants(tenant):
    assert tenant_problem(tenant) is None
    assert check_tenant(tenant) == tenant


@pytest.mark.parametrize(
    "tenant, message",
    [
        ("", "tenant cannot be empty"),
        ("x" * (MAX_TENANT_LEN + 1), f"tenant is {MAX_TENANT_LEN + 1} characters long"),
        ("two words", "tenant 'two words' is not valid"),
        ("-leading", "tenant '-leading' is not valid"),
        ("tab\there", "is not valid"),
        ("é", "is not valid"),
        (7, "tenant must be a str or None, got int"),
    ],
)
def test_invalid_tenants_name_the_problem(tenant, message):
    assert message in tenant_problem(tenant)
    with pytest.raises(ValueError, match=r"letters, digits|characters long|must be a str"):
        check_tenant(tenant)
    with pytest.raises(ValueError, match="tenant"):
        GenerateJob(request_id="j", prompt="p", tenant=tenant)


def test_a_bad_tenant_on_the_wire_is_an_invalid_request():
    # A producer that skipped validation (another language, an old build): the worker's
    # decode refuses it with the same message.
    raw = msgspec.msgpack.encode({"request_id": "j", "prompt": "p", "tenant": "no spaces", "v": 2})
    with pytest.raises(InvalidRequestError, match="tenant 'no spaces' is not valid"):
        decode_job(raw)


def test_every_client_entry_point_checks_the_tenant_before_connecting():
    client = Client("redis://127.0.0.1:1/0", connect_timeout=0.2)  # nothing listens there

    async def calls():
        for call in (
            client.submit("p", tenant="bad tenant"),
            client.generate(["p"], tenant="bad tenant"),
            client.chat([{"role": "user", "content": "hi"}], tenant="bad tenant"),
        ):
            with pytest.raises(ValueError, match="tenant 'bad tenant' is not valid"):
                await call

    asyncio.run(calls())


class _JobBeforeTenants(msgspec.Struct, kw_only=True):
    """A job as a v2 build before tenants wrote it."""

    request_id: str
    prompt: str
    sampling_params: SamplingParams = msgspec.field(default_factory=SamplingParams)
    v: int = 2


class _OutputBeforeUsage(msgspec.Struct, kw_only=True):
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool


class _ResultBeforeUsage(msgspec.Struct, kw_only=True):
    request_id: str
    output: _OutputBeforeUsage | None = None
    v: int = 2


def _output(usage: Usage | None) -> RequestOutput:
    return RequestOutput(
        request_id="j",
        prompt="p",
        prompt_token_ids=[1, 2],
        outputs=[CompletionOutput(index=0, text="x", token_ids=[3], finish_reason="stop")],
        finished=True,
        usage=usage,
    )


def test_tenant_and_usage_round_trip_and_stay_compatible():
    job = GenerateJob(request_id="j", prompt="p", tenant="acme")
    assert decode_job(encode(job)).tenant == "acme"
    # An older producer's job: no tenant.
    assert (
        decode_job(msgspec.msgpack.encode(_JobBeforeTenants(request_id="j", prompt="p"))).tenant
        is None
    )
    # An older reader skips the new fields.
    old = msgspec.msgpack.decode(encode(job), type=_JobBeforeTenants)
    assert old.prompt == "p"
    usage = Usage(prompt_tokens=2, completion_tokens=1, engine_s=0.5, adapter_load_s=0.25)
    result = JobResult(request_id="j", output=_output(usage))
    assert decode_result(encode(result)).output.usage == usage
    assert usage.total_tokens == 3
    old_result = msgspec.msgpack.decode(encode(result), type=_ResultBeforeUsage)
    assert old_result.output.prompt_token_ids == [1, 2]
    older = _ResultBeforeUsage(
        request_id="j",
        output=msgspec.msgpack.decode(
            msgspec.msgpack.encode(_output(None)), type=_OutputBeforeUsage
        ),
    )
    assert decode_result(msgspec.msgpack.encode(older)).output.usage is None
