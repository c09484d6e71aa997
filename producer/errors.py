"""Typed request errors with stable codes.

A request that fails for a request-level reason travels back as an ``ErrorInfo`` value (code +
message) and the client re-raises it as the matching ``LoraFleetError`` subclass. Codes are a
public contract: clients and dashboards key on them, so never rename one.
"""

from __future__ import annotations

import msgspec

from lorafleet.producer.types import RequestOutput


class ErrorInfo(msgspec.Struct, frozen=True):
    """An error on the wire: a stable ``code``, a human message, and for a request cut short
    (a deadline, an abort) the ``output`` it had produced by then; ``details``: facts a
    program may act on (a quota refusal's limit and ``retry_after``)."""

    code: str
    message: str
    output: RequestOutput | None = None
    details: dict[str, str | int | float] | None = None


class LoraFleetError(Exception):
    """Base of all request errors. ``code`` is stable; ``message`` is for humans.
    ``output``: what a request cut short had produced (its ``finish_reason`` is ``abort``),
    else None."""

    code: str = "internal_error"

    def __init__(
        self,
        message: str,
        output: RequestOutput | None = None,
        *,
        details: dict[str, str | int | float] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.output = output
        self.details = details

    @property
    def partial_text(self) -> str:
        """The text generated before the request was cut short ("" if none)."""
        return self.output.outputs[0].text if self.output and self.output.outputs else ""

    def to_info(self) -> ErrorInfo:
        return ErrorInfo(self.code, self.message, self.output, self.details)

    def __reduce__(self):  # keep subclasses picklable for multiprocessing users
        return (_rebuild, (type(self), self.message, self.output, self.details))


def _rebuild(cls, message, output, details):
    return cls(message, output, details=details)


class InvalidRequestError(LoraFleetError, ValueError):
    """Bad sampling parameters, a malformed job or an invalid ``LoRARequest``."""

    code = "invalid_request"


class PromptTooLongError(LoraFleetError, ValueError):
    """The prompt is longer than the worker accepts: more tokens than ``max_model_len``
    leaves room for, or more characters than ``LORAFLEET_MAX_PROMPT_CHARS``."""

    code = "prompt_too_long"


class AdapterNotFoundError(LoraFleetError, ValueError):
    """``lora_path`` names no adapter: no folder there, or one without the adapter's config
    or weights file; or a hub id the worker cannot get (hub off, not cached while offline,
    not available)."""

    code = "adapter_not_found"


class AdapterInvalidError(LoraFleetError, ValueError):
    """The adapter exists but cannot be served: bad config, corrupt or pickled weights,
    shapes of another model, a target module the model lacks, or a base model mismatch."""

    code = "adapter_invalid"


class AdapterRankTooLargeError(AdapterInvalidError):
    """The adapter's rank is above the worker's ``max_lora_rank``."""

    code = "adapter_rank_too_large"


class AdapterConflictError(LoraFleetError, ValueError):
    """The same ``lora_int_id`` was used with another name or path."""

    code = "adapter_conflict"


class AdapterPathForbiddenError(LoraFleetError, ValueError):
    """The adapter's folder, or a file linked from it, lies outside the worker's
    ``LORAFLEET_ADAPTER_ROOTS`` (or no local adapters are allowed at all)."""

    code = "adapter_path_forbidden"


class LoRADisabledError(LoraFleetError, ValueError):
    """A ``LoRARequest`` reached an engine started with ``enable_lora=False``."""

    code = "lora_disabled"


class DeadlineExceededError(LoraFleetError, TimeoutError):
    """The job's deadline passed, in the queue or while it ran; ``output`` holds what it
    generated before."""

    code = "deadline_exceeded"


class AbortedError(LoraFleetError):
    """The job was aborted (``abort``), before it started or while it ran; ``output`` holds
    what it generated before."""

    code = "aborted"


class QuotaExceededError(LoraFleetError):
    """The tenant's quota refused the job (see ``lorafleet.producer.quotas``); it did not run
    and costs nothing. ``limit`` names the limit (``max_in_flight`` or
    ``tokens_per_minute``), ``value`` its value, ``retry_after`` seconds until retrying may
    succeed."""

    code = "quota_exceeded"

    @property
    def limit(self) -> str:
        return str((self.details or {}).get("limit", ""))

    @property
    def value(self) -> int:
        return int((self.details or {}).get("value", 0))

    @property
    def retry_after(self) -> float:
        return float((self.details or {}).get("retry_after", 0.0))


class UnsupportedVersionError(LoraFleetError, ValueError):
    """A job, result or stream event in a wire version this side cannot read (a producer
    or worker newer than the other)."""

    code = "unsupported_version"


class InternalError(LoraFleetError):
    """The worker or its engine failed in a way the request did not cause (a bug, a failed
    engine step): submitting the request again may succeed."""

    code = "internal_error"


class QueueUnavailableError(LoraFleetError, ConnectionError):
    """Redis cannot be used: it does not answer within the client's timeout, refuses the
    connection, the login or the URL's database, or the connection was lost. The message
    names the URL (password masked) and, for a first connection, what to do."""

    code = "queue_unavailable"


class RedisURLError(LoraFleetError, ValueError):
    """A Redis URL the client cannot use: a scheme other than ``redis://``, ``rediss://`` or
    ``unix://``, or a port, database or option that is not a number. Raised when the client
    is created, before anything connects. Client-side only: it never travels on the wire,
    so it is not in ``ERROR_TYPES``."""

    code = "invalid_redis_url"


class JobNotFoundError(LoraFleetError, LookupError):
    """The queue holds neither the job nor its result: never enqueued, or expired."""

    code = "job_not_found"


class StreamRestartedError(LoraFleetError):
    """The job was re-run (at-least-once delivery) and the new attempt's text differs from
    what the stream already yielded; ``result()`` still returns the authoritative output."""

    code = "stream_restarted"


ERROR_TYPES: dict[str, type[LoraFleetError]] = {
    cls.code: cls
    for cls in (
        InvalidRequestError,
        PromptTooLongError,
        AdapterNotFoundError,
        AdapterInvalidError,
        AdapterRankTooLargeError,
        AdapterConflictError,
        AdapterPathForbiddenError,
        LoRADisabledError,
        DeadlineExceededError,
        AbortedError,
        QuotaExceededError,
        UnsupportedVersionError,
        InternalError,
        QueueUnavailableError,
        JobNotFoundError,
        StreamRestartedError,
    )
}

#: The codes a worker answers jobs with: every wire code but the ones a client raises
#: itself (Redis unreachable, job unknown, stream restarted).
WORKER_ERROR_CODES: tuple[str, ...] = tuple(
    code
    for code, cls in ERROR_TYPES.items()
    if cls not in (QueueUnavailableError, JobNotFoundError, StreamRestartedError)
)


def error_from_info(info: ErrorInfo) -> LoraFleetError:
    """The typed exception for a wire error; unknown codes become ``LoraFleetError``."""
    cls = ERROR_TYPES.get(info.code)
    if cls is None:
        err = LoraFleetError(info.message, info.output, details=info.details)
        err.code = info.code
        return err
    return cls(info.message, info.output, details=info.details)
