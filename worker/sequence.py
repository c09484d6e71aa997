"""A request inside the engine: tokens, cache blocks, adapter, and progress."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from lorafleet.producer.types import LoRARequest, SamplingParams
from lorafleet.worker.detokenizer import Detokenizer


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One request. ``token_ids`` holds prompt then output tokens; the first
    ``num_computed_tokens`` of them have K/V in the cache blocks of ``block_table``."""

    request_id: str
    prompt: str | None
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    lora_request: LoRARequest | None
    detokenizer: Detokenizer
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
