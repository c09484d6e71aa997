"""Wire types shared by producers and workers (msgspec Structs, vLLM's fields and rules).

These Structs travel through Redis as msgpack. Validation lives in ``__post_init__`` so it
runs both when user code constructs a value and when a worker decodes one; a decode that
fails validation surfaces as ``msgspec.ValidationError`` carrying the same message.
"""

from __future__ import annotations

import math

import msgspec


class LoRARequest(msgspec.Struct, frozen=True):
    """Names the LoRA adapter a request runs with (vLLM's ``LoRARequest``).

    ``lora_int_id`` identifies the adapter in every cache; the same id must always mean the
    same ``lora_name`` and ``lora_path``.
    """

    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    long_lora_max_len: int | None = None
    base_model_name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.lora_int_id, int) or isinstance(self.lora_int_id, bool):
            raise ValueError(f"lora_int_id must be an int, got {self.lora_int_id!r}")
        if self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be > 0, got {self.lora_int_id}")
        if not self.lora_name:
            raise ValueError("lora_name cannot be empty")
        if not self.lora_path:
            raise ValueError("lora_path cannot be empty")
        if self.long_lora_max_len is not None:
            raise ValueError("long_lora_max_len (LongLoRA) is not supported by lorafleet")

    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    """Per-request sampling settings (vLLM's names and defaults).

    ``temperature == 0`` means greedy. ``top_k`` of 0 or -1 disables top-k; ``top_p == 1``
    disables nucleus sampling. ``stop`` strings are matched on the detokenized output and are
    not included in the returned text.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_tokens: int = 0
    seed: int | None = None
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):  # vLLM accepts a bare string
            msgspec.structs.force_setattr(self, "stop", [self.stop])
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 or 0 (disabled) or >= 1, got {self.top_k}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})"
            )
        if self.seed is not None and not (0 <= self.seed < 2**63):
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        if self.stop is not None and any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if self.stop_token_ids is not None and any(t < 0 for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must be >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class CompletionOutput(msgspec.Struct, kw_only=True):
    """One generated completion. ``finish_reason`` is ``"stop"``, ``"length"`` or
    ``"abort"``; ``stop_reason`` is the matched stop string or stop token id, else None."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class RequestMetrics(msgspec.Struct, kw_only=True):
    """When a queued request reached each stage (vLLM's ``RequestMetrics`` names), in Unix
    seconds. ``arrival_time`` is the producer's clock at enqueue; the others are the worker's
    clock, so ``time_in_queue`` (``first_scheduled_time - arrival_time``) includes any clock
    skew between the two hosts.

    ``first_scheduled_time`` is when a worker took the job off the Redis queue; the engine
    may still hold it until a batch has room, which shows in the time to first token.
    """

    arrival_time: float
    first_scheduled_time: float | None = None
    finished_time: float | None = None
    time_in_queue: float | None = None


class RequestOutput(msgspec.Struct, kw_only=True):
    """The result of one request (vLLM's ``RequestOutput`` fields). ``metrics`` is set on
    outputs that came through the queue, ``None`` in process."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    lora_request: LoRARequest | None = None
    metrics: RequestMetrics | None = None
