"""A request inside the engine: its ``n`` sequences (tokens, cache blocks, adapter,
progress), grouped by a ``Request``."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from lorafleet.producer.types import Logprob, LoRARequest, SamplingParams
from lorafleet.worker.engine.detokenizer import Detokenizer

#: In ``Sequence.token_ids``: a sampled token still on the device. The engine queues a
#: sequence's next step before reading its last token back (see ``LLMEngine.step``).
PENDING_TOKEN = -1


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One completion (``index`` of its request's ``n``). ``token_ids`` holds prompt then
    output tokens, the last one or two of them possibly ``PENDING_TOKEN``; the first
    ``num_computed_tokens`` of them have K/V in the cache blocks of ``block_table`` (or are
    queued to). ``max_total_tokens`` is where generation stops by length: the prompt plus
    ``max_tokens``, within the model's length. ``logprobs`` (one entry per read-back output
    token) and ``prompt_logprobs`` (per prompt token, index 0 only) are kept when the
    request asks for them."""

    request_id: str
    prompt: str | None
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    lora_request: LoRARequest | None
    detokenizer: Detokenizer
    max_total_tokens: int
    arrival_time: float = field(default_factory=time.monotonic)
    status: SeqStatus = SeqStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    waited_steps: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    generator: torch.Generator | None = None
    first_token_time: float | None = None
    num_preemptions: int = 0
    index: int = 0
    logprobs: list[dict[int, Logprob]] | None = None
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    # Metering (``Usage``): when the engine took the request (monotonic; ``arrival_time``
    # may be a caller's clock), and seconds this sequence spent loading its adapter (a disk
    # read or a slot write it caused).
    added_at: float = field(default_factory=time.monotonic)
    adapter_load_s: float = 0.0

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.prompt_logprobs is not None

    @property
    def cumulative_logprob(self) -> float | None:
        """Sum of the output tokens' log-probabilities, when they are kept."""
        if self.logprobs is None:
            return None
        tokens = self.output_token_ids
        return sum(entry[t].logprob for entry, t in zip(self.logprobs, tokens, strict=True))

    @property
    def lora_id(self) -> int:
        """0 for the base model."""
        return self.lora_request.lora_int_id if self.lora_request else 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    @property
    def fully_queued(self) -> bool:
        """Every token it may have is generated or queued: nothing more to schedule."""
        return self.num_tokens >= self.max_total_tokens

    def drop_pending(self) -> None:
        """Forget tokens still on the device (the sequence ended before they were read)."""
        while self.token_ids and self.token_ids[-1] == PENDING_TOKEN:
            self.token_ids.pop()


@dataclass(eq=False)
class Request:
    """One request's ``n`` sequences; it is finished when all of them are."""

    request_id: str
    seqs: list[Sequence]

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)
