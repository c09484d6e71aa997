"""What the engine reports: per-request ``StepOutput``, per-step ``StepStats`` and the
adapter tiers' ``AdapterStats``.

Torch-free, so the worker process, which only relays them, never loads torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorafleet.producer.errors import LoraFleetError
from lorafleet.producer.types import RequestOutput


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


@dataclass
class StepStats:
    """Facts about the last step, for metrics."""

    num_seqs: int = 0
    num_tokens: int = 0
    num_adapters: int = 0
    seconds: float = 0.0


@dataclass
class AdapterStats:
    """Monotonic counters, read by metrics."""

    disk_loads: int = 0
    disk_load_seconds: float = 0.0
    disk_load_failures: int = 0
    failure_cache_hits: int = 0
    cpu_hits: int = 0
    slot_hits: int = 0
    slot_loads: int = 0
    cpu_evictions: int = 0
    slot_evictions: int = 0
