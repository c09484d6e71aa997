"""Worker-side checks of a decoded job, before it costs the engine anything.

``decode_job`` guarantees types and the wire types' own rules (vLLM's); these checks add the
limits of *this* worker, so that a hostile or buggy producer cannot make one job expensive
for everyone sharing the batch:

- ``max_tokens`` above ``max_model_len`` is refused, not clipped: no request can ever get
  that many tokens, so the producer has a bug worth hearing about. Values up to the limit
  are accepted and stop at ``max_model_len`` (``finish_reason == "length"``), because the
  producer cannot know how many tokens its prompt will take.
- A prompt longer than ``max_prompt_chars`` is refused before it is tokenized (tokenizing
  megabytes would stall the worker's event loop); the exact token limit is the engine's.
- A chat job's messages count toward the same character bound; their number and roles
  are bounded too.
- Stop lists, ``n``, token-id lists, adapter names and paths are bounded; NUL bytes and
  non-finite times, which would blow up deep inside the filesystem or the event loop's
  timer heap, are refused.

Every failure is a ``LoraFleetError`` with a stable code; nothing here touches the disk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import msgspec

from lorafleet.producer.codec import GenerateJob
from lorafleet.producer.errors import InvalidRequestError, PromptTooLongError

#: Prompt characters allowed per token of ``max_model_len`` by default. Natural text and
#: code average 3-6 characters per token, so a prompt above this bound cannot fit anyway.
CHARS_PER_TOKEN_BOUND = 16

MAX_COMPLETIONS = 64
MAX_MESSAGES = 1024
MAX_ROLE_CHARS = 64
MAX_LOGIT_BIAS_ENTRIES = 1024
MAX_ALLOWED_TOKEN_IDS = 1 << 18
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024
MAX_LORA_NAME_CHARS = 256
MAX_LORA_PATH_CHARS = 4096


@dataclass(frozen=True)
class JobLimits:
    """What one worker accepts. ``max_prompt_chars`` ``None``: ``CHARS_PER_TOKEN_BOUND``
    characters per token of ``max_model_len``."""

    max_model_len: int
    max_prompt_chars: int | None = None

    @property
    def prompt_chars(self) -> int:
        return self.max_prompt_chars or CHARS_PER_TOKEN_BOUND * self.max_model_len


def check_job(job: GenerateJob, limits: JobLimits) -> None:
    """Raise ``InvalidRequestError`` / ``PromptTooLongError`` if a worker with ``limits``
    must refuse ``job``; return ``None`` if its engine may take it."""
    _check_times(job)
    _check_messages(job)
    chars = len(job.prompt or "") + sum(len(m.content) for m in job.messages or ())
    if chars > limits.prompt_chars:
        what = "messages have" if job.is_chat else "prompt has"
        raise PromptTooLongError(
            f"{what} {chars} characters; this worker takes at most "
            f"{limits.prompt_chars} (max_model_len is {limits.max_model_len} tokens)"
        )
    _check_sampling(job, limits.max_model_len)
    _check_lora(job)


def _check_messages(job: GenerateJob) -> None:
    messages = job.messages or ()
    if len(messages) > MAX_MESSAGES:
        raise InvalidRequestError(f"a conversation takes at most {MAX_MESSAGES} messages")
    if any(len(m.role) > MAX_ROLE_CHARS for m in messages):
        raise InvalidRequestError(f"message roles are at most {MAX_ROLE_CHARS} characters")


def _check_times(job: GenerateJob) -> None:
    for name in ("enqueued_at", "deadline"):
        value = getattr(job, name)
        if value is not None and not math.isfinite(value):
            raise InvalidRequestError(f"{name} must be a finite Unix time, got {value!r}")


def _check_sampling(job: GenerateJob, max_model_len: int) -> None:
    params = job.sampling_params
    if params.max_tokens > max_model_len:
        raise InvalidRequestError(
            f"max_tokens is {params.max_tokens}, above this model's max_model_len of "
            f"{max_model_len} tokens (prompt and output together)"
        )
    stop = params.stop or []
    if len(stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_STRING_CHARS for s in stop):
        raise InvalidRequestError(
            f"stop takes at most {MAX_STOP_STRINGS} strings of at most "
            f"{MAX_STOP_STRING_CHARS} characters"
        )
    if len(params.stop_token_ids or []) > MAX_STOP_TOKEN_IDS:
        raise InvalidRequestError(f"stop_token_ids takes at most {MAX_STOP_TOKEN_IDS} ids")
    if params.n > MAX_COMPLETIONS:
        raise InvalidRequestError(f"n is {params.n}; a job takes at most {MAX_COMPLETIONS}")
    if len(params.logit_bias or {}) > MAX_LOGIT_BIAS_ENTRIES:
        raise InvalidRequestError(f"logit_bias takes at most {MAX_LOGIT_BIAS_ENTRIES} entries")
    if len(params.allowed_token_ids or []) > MAX_ALLOWED_TOKEN_IDS:
        raise InvalidRequestError(f"allowed_token_ids takes at most {MAX_ALLOWED_TOKEN_IDS} ids")


def _check_lora(job: GenerateJob) -> None:
    lora = job.lora_request
    if lora is None:
        return
    if len(lora.lora_name) > MAX_LORA_NAME_CHARS:
        raise InvalidRequestError(f"lora_name is longer than {MAX_LORA_NAME_CHARS} characters")
    if len(lora.lora_path) > MAX_LORA_PATH_CHARS or "\x00" in lora.lora_path:
        raise InvalidRequestError(
            f"adapter {lora.lora_name[:MAX_LORA_NAME_CHARS]!r}: lora_path must be at most "
            f"{MAX_LORA_PATH_CHARS} characters without NUL bytes"
        )


class _ReplyTo(msgspec.Struct):
    reply_to: str | None = None


_reply_to_decoder = msgspec.msgpack.Decoder(_ReplyTo)


def salvage_reply_to(payload: object) -> str | None:
    """The ``reply_to`` inbox of a payload that failed to decode as a job, if it is a msgpack
    map with a string ``reply_to``: its producer then hears of the failure at once instead
    of on its next sweep of arq's results. Never raises."""
    if not isinstance(payload, bytes | bytearray | memoryview):
        return None
    try:
        return _reply_to_decoder.decode(payload).reply_to
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
