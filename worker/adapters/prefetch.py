"""Reading adapters ahead of their jobs, in a background thread of the engine process.

The worker's routing (``lorafleet.worker.serve.routing``) names the adapters of jobs waiting
in the queue for this worker (homed here, not yet claimed: its job slots are full); the
engine process hands them here. One thread reads and validates each adapter's files
(``AdapterManager.read_ahead``: disk, safetensors parsing, shape checks) while the engine
keeps stepping on its own thread (torch's kernels release the GIL); the engine loop then
``collect``s finished reads into the CPU cache between steps, so the tiers are only ever
changed on the engine's thread. A request whose adapter is still being read waits for that
read (``finish``) instead of reading it a second time.

Requests the engine already has are not parked to read their adapter in the background: on
the CPU (a Python-bound step) the reading thread and the engine contend for the GIL, and
measured (bench_fleet.py, tiny model, 2 cores) that made every request slower, the cold
ones included, than reading synchronously between two steps.

A read that fails is dropped silently: the request that needs the adapter reads it itself
and reports the typed error, once, as ever.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor

from lorafleet.producer.types import LoRARequest
from lorafleet.worker.adapters.manager import AdapterManager
from lorafleet.worker.adapters.peft_adapter import AdapterWeights

log = logging.getLogger(__name__)

#: Reads queued at once; more requests than this are dropped (routing asks again on its
#: next poll if the jobs are still waiting).
MAX_PENDING = 8


class Prefetcher:
    """Reads ahead for ``manager`` (and registers itself as its ``prefetcher``)."""

    def __init__(self, manager: AdapterManager) -> None:
        self.manager = manager
        manager.prefetcher = self
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="lorafleet-prefetch")
        self._pending: dict[int, tuple[LoRARequest, Future[tuple[AdapterWeights, float]]]] = {}

    def request(self, loras: list[LoRARequest]) -> None:
        """Start reading the adapters of ``loras`` that are not held, not being read and
        not remembered as failed."""
        for lora in loras:
            if len(self._pending) >= MAX_PENDING:
                return
            if lora.lora_int_id in self._pending or not self.manager.needs_read(lora):
                continue
            future = self._pool.submit(self._read, lora)
            self._pending[lora.lora_int_id] = (lora, future)

    @property
    def busy(self) -> bool:
        return bool(self._pending)

    def collect(self) -> int:
        """Cache the reads that finished; returns how many were cached."""
        done = [i for i, (_, f) in self._pending.items() if f.done()]
        return sum(self._adopt(i) for i in done)

    def finish(self, lora: LoRARequest) -> bool:
        """If ``lora``'s adapter is being read, wait for that read and cache it; True if
        it is now cached."""
        if lora.lora_int_id not in self._pending:
            return False
        return self._adopt(lora.lora_int_id, wait=True)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _read(self, lora: LoRARequest) -> tuple[AdapterWeights, float]:
        start = time.perf_counter()
        return self.manager.read_ahead(lora), time.perf_counter() - start

    def _adopt(self, lora_id: int, wait: bool = False) -> bool:
        lora, future = self._pending[lora_id]
        if not wait and not future.done():
            return False
        del self._pending[lora_id]
        try:
            weights, seconds = future.result()
        except Exception as e:  # the request reads it itself and reports the error
            log.debug("prefetching adapter %r failed: %r", lora.lora_name, e)
            return False
        return self.manager.adopt(lora, weights, seconds)
