"""The engine's side of metering: what a request cost (``Usage``), and which adapter loads
it caused.

An adapter load is charged to the request that caused it: the one whose arrival read the
adapter from disk into the CPU cache (``AdapterManager.load``), and the one whose admission
wrote it into a device slot (``AdapterManager.acquire``). A request that finds its adapter
already cached or in a slot is charged nothing for it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from lorafleet.producer.usage import Usage

if TYPE_CHECKING:
    from lorafleet.worker.adapters.manager import AdapterManager
    from lorafleet.worker.engine.sequence import Request

A = TypeVar("A")


def timed_load(adapters: AdapterManager, call: Callable[[A], object], arg: A) -> float:
    """Run ``call(arg)`` (a load or an acquire of ``adapters``) and return the seconds it
    took if it read from disk or wrote a slot, else 0. Exceptions propagate."""
    stats = adapters.stats
    before = (stats.disk_loads, stats.slot_loads)
    start = time.perf_counter()
    call(arg)
    if (stats.disk_loads, stats.slot_loads) == before:
        return 0.0
    return time.perf_counter() - start


def request_usage(request: Request) -> Usage:
    """``Usage`` of a request as of now (its end): the prompt once, every completion's
    tokens, seconds since the engine took it, and the adapter loads it caused."""
    first = request.seqs[0]
    return Usage(
        prompt_tokens=first.num_prompt_tokens,
        completion_tokens=sum(max(seq.num_output_tokens, 0) for seq in request.seqs),
        engine_s=time.monotonic() - min(seq.added_at for seq in request.seqs),
        adapter_load_s=sum(seq.adapter_load_s for seq in request.seqs),
    )
