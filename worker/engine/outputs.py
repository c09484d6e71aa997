"""What the engine reports: per-request ``StepOutput`` (a finished request's
``RequestOutput`` built by ``request_output``), per-step ``StepStats`` and the
``EngineSnapshot`` of its gauges and counters (with the adapter tiers' ``AdapterStats``).

Torch-free, so the worker process, which only relays them, never loads torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lorafleet.producer.errors import LoraFleetError
from lorafleet.producer.types import CompletionOutput, RequestOutput
from lorafleet.worker.adapters.stats import AdapterStats
from lorafleet.worker.engine.usage import request_usage

if TYPE_CHECKING:
    from lorafleet.worker.engine.sequence import Request


@dataclass
class StepOutput:
    """What one step produced for one completion (``index`` of the request's ``n``): new
    text and tokens, and when the whole request finished (``finished``) its final
    ``RequestOutput`` (or the error that ended it). ``finish_reason`` is the completion's,
    once it ended."""

    request_id: str
    delta_text: str
    delta_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    output: RequestOutput | None = None
    error: LoraFleetError | None = None
    index: int = 0


def request_output(request: Request) -> RequestOutput:
    """The ``RequestOutput`` of ``request`` as of now: every completion so far, and its usage."""
    first = request.seqs[0]
    completions = [
        CompletionOutput(
            index=seq.index,
            text=seq.detokenizer.text,
            token_ids=seq.output_token_ids,
            cumulative_logprob=seq.cumulative_logprob,
            logprobs=seq.logprobs,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
        )
        for seq in request.seqs
    ]
    return RequestOutput(
        request_id=request.request_id,
        prompt=first.prompt,
        prompt_token_ids=first.token_ids[: first.num_prompt_tokens],
        outputs=completions,
        finished=request.finished,
        lora_request=first.lora_request,
        prompt_logprobs=first.prompt_logprobs,
        usage=request_usage(request),
    )


@dataclass
class StepStats:
    """Facts about the last step, for metrics."""

    num_seqs: int = 0
    num_tokens: int = 0
    num_adapters: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class EngineSnapshot:
    """The engine's gauges and counters after a step: what metrics and heartbeats export.
    ``waiting_for_slot`` counts waiting requests whose adapter has no device slot and
    cannot get one now: every slot is pinned by running requests (``max_loras`` too few
    for the adapters in demand). ``adapters_in_slots`` and ``adapters_in_cpu`` are the
    ``lora_int_id``s held in device slots and in the CPU cache: what fleet routing reads."""

    running: int = 0
    waiting: int = 0
    waiting_for_slot: int = 0
    free_blocks: int = 0
    num_blocks: int = 0
    slots_in_use: int = 0
    cpu_adapters: int = 0
    preemptions: int = 0
    adapters_in_slots: tuple[int, ...] = ()
    adapters_in_cpu: tuple[int, ...] = ()
    adapters: AdapterStats = field(default_factory=AdapterStats)

    @property
    def kv_cache_usage(self) -> float:
        return 1.0 - self.free_blocks / self.num_blocks if self.num_blocks else 0.0
