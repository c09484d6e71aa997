"""Versioned msgpack codec for jobs and results.

Every payload starts with a ``v`` field. A decoder first reads only ``v``, so a job from a
newer producer fails with ``unsupported_version`` instead of a confusing field error.
Version 2 added chat jobs (``messages``), ``n``, log-probabilities and the penalties; a v2
build reads v1 jobs and results (their new fields take defaults) and answers a job in its
own version, so producers and workers can be upgraded one at a time.
Fields added since, within version 2, are optional with defaults (a job's ``tenant``, a
result's ``usage``): a build without them ignores them (msgspec skips unknown fields), a
build with them reads payloads that lack them, so no version bump is needed.
Decoding never executes code (msgpack, no pickle) and turns every malformed payload into an
``InvalidRequestError`` naming what is wrong.
"""

from __future__ import annotations

from typing import Any

import msgspec

from lorafleet.producer.errors import (
    ErrorInfo,
    InternalError,
    InvalidRequestError,
    UnsupportedVersionError,
)
from lorafleet.producer.types import ChatMessage, LoRARequest, RequestOutput, SamplingParams
from lorafleet.producer.usage import check_tenant

WIRE_VERSION = 2
#: Versions this build decodes.
READABLE_VERSIONS = (1, 2)


class GenerateJob(msgspec.Struct, frozen=True, kw_only=True):
    """One generation request as enqueued. Times are Unix seconds (float).

    Exactly one of ``prompt`` (text, tokenized as is) and ``messages`` (a conversation the
    worker renders with the model's chat template, so producers need no tokenizer) is set.
    ``add_generation_prompt`` and ``continue_final_message`` go to the template (vLLM's
    ``LLM.chat`` options). ``reply_to`` names the submitting client's inbox stream
    (``lorafleet:inbox:*``); the worker appends the job's final stream event there too, so a
    client waiting on many jobs blocks on one key (see ``lorafleet.producer.watch``).
    ``tenant`` names who the job runs for (``lorafleet.producer.usage``): the key of its
    metering and quotas; ``None`` for none.
    """

    request_id: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    sampling_params: SamplingParams = msgspec.field(default_factory=SamplingParams)
    lora_request: LoRARequest | None = None
    enqueued_at: float = 0.0
    deadline: float | None = None
    reply_to: str | None = None
    tenant: str | None = None
    v: int = WIRE_VERSION

    def __post_init__(self) -> None:
        check_tenant(self.tenant)
        if not self.request_id:
            raise ValueError("request_id cannot be empty")
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("a job needs a `prompt` (text) or `messages` (chat), not both")
        if self.prompt is not None and not self.prompt:
            raise ValueError("prompt cannot be empty")
        if self.messages is not None and not self.messages:
            raise ValueError("messages cannot be empty")
        if self.add_generation_prompt and self.continue_final_message:
            raise ValueError("continue_final_message needs add_generation_prompt=False")

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


class JobResult(msgspec.Struct, frozen=True, kw_only=True):
    """What a worker returns for a job: exactly one of ``output`` and ``error`` is set."""

    request_id: str
    output: RequestOutput | None = None
    error: ErrorInfo | None = None
    worker: str | None = None
    attempt: int = 1
    v: int = WIRE_VERSION


class _Header(msgspec.Struct):
    v: int


_encoder = msgspec.msgpack.Encoder()
_header_decoder = msgspec.msgpack.Decoder(_Header)
_job_decoder = msgspec.msgpack.Decoder(GenerateJob)
_result_decoder = msgspec.msgpack.Decoder(JobResult)


def encode(value: msgspec.Struct) -> bytes:
    return _encoder.encode(value)


def _decode(data: bytes, decoder: msgspec.msgpack.Decoder, what: str) -> Any:
    """``data`` decoded and validated by ``decoder`` once its schema version is known to be
    readable. Raises ``InvalidRequestError`` (malformed, or not a valid ``what``) or
    ``UnsupportedVersionError``."""
    try:
        header = _header_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise InvalidRequestError(f"malformed {what} payload: {e}") from None
    if header.v not in READABLE_VERSIONS:
        raise UnsupportedVersionError(
            f"{what} schema version {header.v} is not supported (this build reads "
            f"v{READABLE_VERSIONS[0]} to v{READABLE_VERSIONS[-1]}); upgrade lorafleet here"
        )
    try:
        return decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise InvalidRequestError(f"invalid {what}: {e}") from None


def decode_job(data: bytes) -> GenerateJob:
    """Decode and validate a job. Raises ``InvalidRequestError`` or ``UnsupportedVersionError``."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidRequestError(f"job payload must be bytes, got {type(data).__name__}")
    return _decode(data, _job_decoder, "job")


def decode_result(data: bytes) -> JobResult:
    return _decode(data, _result_decoder, "result")


# arq's envelope (job and result dicts) is serialized with msgpack too, never pickle. arq puts
# an exception object in the result of a job that failed inside arq itself (max retries
# exceeded, job expired, cancelled); it becomes a plain map so the envelope stays encodable.


def _encode_exception(obj: Any) -> Any:
    if isinstance(obj, BaseException):
        return {"exception": type(obj).__name__, "message": str(obj)}
    raise NotImplementedError(f"cannot serialize {type(obj).__name__} in an arq envelope")


_arq_encoder = msgspec.msgpack.Encoder(enc_hook=_encode_exception)
_arq_decoder = msgspec.msgpack.Decoder()


def arq_serialize(envelope: dict[str, Any]) -> bytes:
    """arq ``job_serializer``: producers and workers must use this same pair."""
    return _arq_encoder.encode(envelope)


def arq_deserialize(data: bytes) -> dict[str, Any]:
    """arq ``job_deserializer`` (tuples come back as lists, which arq accepts)."""
    return _arq_decoder.decode(data)


def result_from_arq(request_id: str, envelope: dict[str, Any]) -> JobResult:
    """The ``JobResult`` inside an arq result envelope.

    A job that our job function answered carries its encoded ``JobResult``; one that arq
    failed by itself (its function never returned) becomes an ``internal_error`` result.
    """
    value = envelope.get("r")
    if envelope.get("s") and isinstance(value, bytes):
        return decode_result(value)
    if isinstance(value, dict) and "exception" in value:
        reason = f"{value['exception']}: {value.get('message', '')}"
    else:
        reason = repr(value)
    message = f"job {request_id} failed in the queue before producing a result ({reason})"
    return JobResult(request_id=request_id, error=InternalError(message).to_info())
