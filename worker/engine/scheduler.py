"""Continuous batching with adapter-aware admission.

Every step spends a token budget (``max_num_batched_tokens``): first on running sequences
(one decode token each, or the next chunk of an unfinished prefill), then on admitting
waiting ones. Admission order:

1. requests that waited ``starvation_steps`` steps or more, oldest first — if the oldest of
   them cannot get a slot or cache blocks, nothing else is admitted until it can;
2. base-model requests and requests whose adapter already holds a slot, oldest first;
3. requests needing a new slot, grouped by adapter, the adapter with most waiting first.

A running sequence pins its adapter's slot, so a step never holds more than ``max_loras``
distinct adapters. When blocks run out, the newest running sequence is preempted: its blocks
and slot are released and it is recomputed later from its tokens (prompt + output so far).
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

from lorafleet.producer.errors import LoraFleetError
from lorafleet.worker.adapters.manager import AdapterManager
from lorafleet.worker.engine.block_manager import BlockManager
from lorafleet.worker.engine.config import EngineConfig
from lorafleet.worker.engine.sequence import SeqStatus, Sequence
from lorafleet.worker.engine.usage import timed_load


@dataclass
class ScheduledBatch:
    """Sequences of one step and how many of their tokens are computed in it."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    failed: list[tuple[Sequence, LoraFleetError]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def samples(self, i: int) -> bool:
        """Whether sequence i reaches its last token this step (so a next token is sampled)."""
        seq = self.seqs[i]
        return seq.num_computed_tokens + self.num_new_tokens[i] == seq.num_tokens


class Scheduler:
    def __init__(
        self, config: EngineConfig, blocks: BlockManager, adapters: AdapterManager
    ) -> None:
        self.config = config
        self.blocks = blocks
        self.adapters = adapters
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def find(self, request_id: str) -> Sequence | None:
        return next((s for s in (*self.running, *self.waiting) if s.request_id == request_id), None)

    def finish(self, seq: Sequence) -> None:
        """Remove ``seq`` from the queues and free its blocks and slot."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
            self._release(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED

    def _release(self, seq: Sequence) -> None:
        self.blocks.release(seq)
        if seq.lora_request is not None:
            self.adapters.release(seq.lora_id)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    # -- one step --------------------------------------------------------------------------

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        preempted = False
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SeqStatus.RUNNING:  # preempted earlier in this loop
                continue
            if seq.fully_queued:  # its last token is on the device, read back next step
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.blocks.can_grow(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is not SeqStatus.RUNNING:
                continue
            self.blocks.grow(seq, n)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
        if not preempted:
            budget = self._admit(batch, budget)
        for seq in self.waiting:
            seq.waited_steps += 1
        return batch

    def _admission_order(self) -> list[Sequence]:
        bound = self.config.starvation_steps
        demand = Counter(s.lora_id for s in self.waiting)
        first_arrival: dict[int, float] = {}
        for s in self.waiting:
            first_arrival.setdefault(s.lora_id, s.arrival_time)
            first_arrival[s.lora_id] = min(first_arrival[s.lora_id], s.arrival_time)

        def key(s: Sequence) -> tuple:
            if s.waited_steps >= bound:
                return (0, s.arrival_time)
            if s.lora_request is None or self.adapters.slot_of(s.lora_id) is not None:
                return (1, s.arrival_time)
            return (2, -demand[s.lora_id], first_arrival[s.lora_id], s.arrival_time)

        return sorted(self.waiting, key=key)

    def _admit(self, batch: ScheduledBatch, budget: int) -> int:
        if budget == 0 or len(self.running) >= self.config.max_num_seqs or not self.waiting:
            return budget  # nothing can be admitted: skip ordering the whole queue
        bound = self.config.starvation_steps
        for seq in self._admission_order():
            if budget == 0 or len(self.running) >= self.config.max_num_seqs:
                break
            starving = seq.waited_steps >= bound
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            fits_slot = seq.lora_request is None or self.adapters.has_room_for(seq.lora_id)
            if not fits_slot or not self.blocks.can_grow(seq, n):
                if starving or fits_slot:  # out of blocks, or the oldest starving one waits
                    break
                continue
            if seq.lora_request is not None:
                try:
                    seq.adapter_load_s += timed_load(
                        self.adapters, self.adapters.acquire, seq.lora_request
                    )
                except LoraFleetError as err:
                    self.waiting.remove(seq)
                    seq.status = SeqStatus.FINISHED
                    batch.failed.append((seq, err))
                    continue
            self.waiting.remove(seq)
            seq.status = SeqStatus.RUNNING
            seq.waited_steps = 0
            self.running.append(seq)
            self.blocks.grow(seq, n)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
        return budget
