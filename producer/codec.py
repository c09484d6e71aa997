"""Versioned msgpack codec for jobs and results.

Every payload starts with a ``v`` field. A decoder first reads only ``v``, so a job from a
newer producer fails with ``unsupported_version`` instead of a confusing field error.
Decoding never executes code (msgpack, no pickle) and turns every malformed payload into an
``InvalidRequestError`` naming what is wrong.
"""

from __future__ import annotations

import msgspec

from lorafleet.producer.errors import (
    ErrorInfo,
    InvalidRequestError,
    UnsupportedVersionError,
)
from lorafleet.producer.types import LoRARequest, RequestOutput, SamplingParams

WIRE_VERSION = 1


class GenerateJob(msgspec.Struct, frozen=True, kw_only=True):
    """One generation request as enqueued. Times are Unix seconds (float)."""

    request_id: str
    prompt: str
    sampling_params: SamplingParams
    lora_request: LoRARequest | None = None
    enqueued_at: float = 0.0
    deadline: float | None = None
    v: int = WIRE_VERSION

    def __post_init__(self) -> None:
        if not self.request_id:
            raise ValueError("request_id cannot be empty")
        if not self.prompt:
            raise ValueError("prompt cannot be empty")


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


def _check_version(data: bytes, what: str) -> None:
    try:
        header = _header_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise InvalidRequestError(f"malformed {what} payload: {e}") from None
    if header.v != WIRE_VERSION:
        raise UnsupportedVersionError(
            f"{what} schema version {header.v} is not supported (this build speaks v{WIRE_VERSION})"
        )


def decode_job(data: bytes) -> GenerateJob:
    """Decode and validate a job. Raises ``InvalidRequestError`` or ``UnsupportedVersionError``."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidRequestError(f"job payload must be bytes, got {type(data).__name__}")
    _check_version(data, "job")
    try:
        return _job_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise InvalidRequestError(f"invalid job: {e}") from None


def decode_result(data: bytes) -> JobResult:
    _check_version(data, "result")
    try:
        return _result_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise InvalidRequestError(f"invalid result: {e}") from None
