"""Wire types shared by producers and workers (msgspec Structs, vLLM's fields and rules).

These Structs travel through Redis as msgpack. Validation lives in ``__post_init__`` so it
runs both when user code constructs a value and when a worker decodes one; a decode that
fails validation surfaces as ``msgspec.ValidationError`` carrying the same message.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

import msgspec

from lorafleet.producer.usage import Usage

T = TypeVar("T")


def per_prompt(value: T | Sequence[T] | None, n: int, name: str, one: type) -> list[T | None]:
    """vLLM's broadcasting of ``generate`` / ``chat`` arguments: one value (or ``None``) for
    all ``n`` prompts, or a list with exactly one per prompt (``ValueError`` on a length
    mismatch, ``TypeError`` on anything else)."""
    if value is None or isinstance(value, one):
        return [value] * n
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a {one.__name__}, a list of them, or None")
    items = list(value)
    if len(items) != n:
        raise ValueError(
            f"{name} has {len(items)} entries for {n} prompts; pass one {one.__name__} for "
            "all of them, or a list with one entry per prompt"
        )
    return items


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


#: Most top-k logprobs a request may ask for per token (vLLM's default ``max_logprobs``).
MAX_LOGPROBS = 20
#: ``logit_bias`` values are clamped by OpenAI to this range; larger ones are refused here.
MAX_LOGIT_BIAS = 100.0


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    """Per-request sampling settings (vLLM's names, defaults and rules).

    - ``n``: completions per request, each sampled independently (greedy ones are equal).
    - ``temperature == 0`` means greedy. ``top_k`` of 0 or -1 disables top-k; ``top_p == 1``
      disables nucleus sampling; ``min_p`` drops tokens below ``min_p`` times the most
      likely token's probability (0: off). Applied in vLLM's order: temperature, min-p,
      top-k, top-p.
    - ``seed``: a request's draws come from its own generator, so they do not depend on the
      batch it shares (completion k > 0 of ``n`` uses a seed derived from ``seed`` and k).
    - ``repetition_penalty`` (> 0, 1 = off) divides positive logits and multiplies negative
      ones of every token in the prompt or the output (Hugging Face's rule);
      ``presence_penalty`` and ``frequency_penalty`` (in [-2, 2]) subtract a constant and a
      per-occurrence amount from the logits of tokens in the output (OpenAI's rule).
    - ``logit_bias`` adds to the logits of the given token ids; ``allowed_token_ids``, when
      set, is the only tokens that may be sampled (both checked against the vocabulary by
      the engine).
    - ``stop`` strings are matched on the detokenized output and cut from the returned text
      unless ``include_stop_str_in_output``; ``stop_token_ids`` end the request like EOS.
    - ``logprobs``: per sampled token, its log-probability and those of the ``logprobs``
      most likely tokens; ``prompt_logprobs``: the same for every prompt token after the
      first. Log-probabilities are of the model's raw distribution (before penalties,
      biases and temperature), as vLLM reports by default; at most ``MAX_LOGPROBS``.
    - ``skip_special_tokens``: leave special tokens out of the text (token ids keep them).
    """

    n: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    min_tokens: int = 0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):  # vLLM accepts a bare string
            msgspec.structs.force_setattr(self, "stop", [self.stop])
        for problem in _sampling_problems(self):
            raise ValueError(problem)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def resumable(self) -> bool:
        """Whether a run cut short (a drained or killed worker) may continue from the tokens
        it made: one completion, no log-probabilities to account for, and no seeded draw
        (a seed promises the same output every run, which a continuation cannot keep)."""
        seeded_draw = self.seed is not None and not self.greedy
        return self.n == 1 and self.logprobs is None and not seeded_draw

    @property
    def penalized(self) -> bool:
        """Whether a penalty makes each draw depend on the tokens so far."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _sampling_problems(p: SamplingParams) -> list[str]:
    """What is wrong with ``p``, in field order (empty: nothing)."""
    problems = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    need(_is_int(p.n) and p.n >= 1, f"n must be an integer >= 1, got {p.n!r}")
    need(
        _is_int(p.max_tokens) and p.max_tokens >= 1,
        f"max_tokens must be at least 1, got {p.max_tokens!r}",
    )
    need(
        math.isfinite(p.temperature) and p.temperature >= 0,
        f"temperature must be a finite number >= 0, got {p.temperature}",
    )
    need(0.0 < p.top_p <= 1.0, f"top_p must be in (0, 1], got {p.top_p}")
    need(p.top_k >= -1, f"top_k must be -1 or 0 (disabled) or >= 1, got {p.top_k}")
    need(0.0 <= p.min_p <= 1.0, f"min_p must be in [0, 1], got {p.min_p}")
    need(p.min_tokens >= 0, f"min_tokens must be >= 0, got {p.min_tokens}")
    need(
        p.min_tokens <= p.max_tokens,
        f"min_tokens ({p.min_tokens}) must be <= max_tokens ({p.max_tokens})",
    )
    need(p.seed is None or 0 <= p.seed < 2**63, f"seed must be in [0, 2**63), got {p.seed}")
    need(
        math.isfinite(p.repetition_penalty) and p.repetition_penalty > 0,
        f"repetition_penalty must be a finite number > 0, got {p.repetition_penalty}",
    )
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(p, name)
        need(-2.0 <= value <= 2.0, f"{name} must be in [-2, 2], got {value}")
    if p.logit_bias is not None:
        need(
            all(_is_int(t) and t >= 0 for t in p.logit_bias),
            "logit_bias keys must be token ids (integers >= 0)",
        )
        need(
            all(math.isfinite(b) and abs(b) <= MAX_LOGIT_BIAS for b in p.logit_bias.values()),
            f"logit_bias values must be finite and within [-{MAX_LOGIT_BIAS:g}, "
            f"{MAX_LOGIT_BIAS:g}]",
        )
    if p.allowed_token_ids is not None:
        need(bool(p.allowed_token_ids), "allowed_token_ids cannot be empty (None: all)")
        need(
            all(_is_int(t) and t >= 0 for t in p.allowed_token_ids),
            "allowed_token_ids must be token ids (integers >= 0)",
        )
    need(p.stop is None or all(p.stop), "stop strings must be non-empty")
    need(
        p.stop_token_ids is None or all(t >= 0 for t in p.stop_token_ids),
        "stop_token_ids must be >= 0",
    )
    for name in ("logprobs", "prompt_logprobs"):
        value = getattr(p, name)
        need(
            value is None or (_is_int(value) and 0 <= value <= MAX_LOGPROBS),
            f"{name} must be an integer in [0, {MAX_LOGPROBS}] or None, got {value!r}",
        )
    return problems


class Logprob(msgspec.Struct, frozen=True, array_like=True):
    """A token's log-probability, its rank in the distribution (1 = most likely) and its
    text (vLLM's ``Logprob``)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


#: Per generated token: token id -> ``Logprob``, the sampled token and the top-k ones.
SampleLogprobs = list[dict[int, Logprob]]
#: Per prompt token, the same; ``None`` for the first token (nothing precedes it).
PromptLogprobs = list[dict[int, Logprob] | None]


class ChatMessage(msgspec.Struct, frozen=True):
    """One message of a conversation, as chat templates take them."""

    role: str
    content: str

    def __post_init__(self) -> None:
        if not isinstance(self.role, str) or not self.role:
            raise ValueError("a chat message needs a non-empty role")
        if not isinstance(self.content, str):
            raise ValueError(f"chat message content must be a str, got {type(self.content)}")


def chat_messages(conversation: object) -> list[ChatMessage]:
    """A conversation as ``ChatMessage``s: a list of ``{"role": ..., "content": ...}`` dicts
    (OpenAI's and vLLM's shape) or of ``ChatMessage``. Raises ``ValueError`` naming the bad
    message."""
    if isinstance(conversation, str | bytes) or not isinstance(conversation, list | tuple):
        raise ValueError(
            'a conversation is a list of messages like {"role": "user", "content": "Hi"}'
        )
    if not conversation:
        raise ValueError("a conversation needs at least one message")
    messages = []
    for i, m in enumerate(conversation):
        if isinstance(m, ChatMessage):
            messages.append(m)
            continue
        if not isinstance(m, dict) or not {"role", "content"} <= m.keys():
            raise ValueError(f'message {i} must be a dict with "role" and "content", got {m!r}')
        try:
            messages.append(ChatMessage(m["role"], m["content"]))
        except ValueError as e:
            raise ValueError(f"message {i}: {e}") from None
    return messages


def conversations(messages: object) -> list[list[ChatMessage]]:
    """vLLM's ``chat`` input: one conversation (a list of messages) or a list of them."""
    if isinstance(messages, list | tuple) and messages and isinstance(messages[0], list | tuple):
        return [chat_messages(c) for c in messages]
    return [chat_messages(messages)]


class CompletionOutput(msgspec.Struct, kw_only=True):
    """One generated completion (``index`` of the request's ``n``). ``finish_reason`` is
    ``"stop"``, ``"length"`` or ``"abort"``; ``stop_reason`` is the matched stop string or
    stop token id, else None. ``logprobs`` (one entry per token of ``token_ids``) and
    ``cumulative_logprob`` (their sum) are set when the request asked for ``logprobs``."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: SampleLogprobs | None = None
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
    """The result of one request (vLLM's ``RequestOutput`` fields): ``outputs`` holds the
    ``n`` completions in index order. ``prompt`` is the text the model saw (for a chat
    request, the conversation rendered by the model's chat template). ``prompt_logprobs``
    is set when the request asked for it. ``metrics`` is set on outputs that came through
    the queue, ``None`` in process. ``usage`` (tokens, engine and adapter-load time) is set
    by the engine, in process and through the queue; ``None`` from builds before it."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    lora_request: LoRARequest | None = None
    prompt_logprobs: PromptLogprobs | None = None
    metrics: RequestMetrics | None = None
    usage: Usage | None = None
