"""Paged KV-cache bookkeeping: fixed-size blocks handed to sequences from a free list."""

from __future__ import annotations

from collections import deque

from lorafleet.worker.engine.sequence import Sequence


class BlockManager:
    """Owns block ids ``0 .. num_blocks-1``. A sequence holding n tokens in the cache owns
    ``ceil(n / block_size)`` blocks, listed in order in ``seq.block_table``."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0..1."""
        return 1.0 - len(self.free) / self.num_blocks

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Extra blocks ``seq`` needs to hold ``num_new_tokens`` more computed tokens."""
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    def can_grow(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= len(self.free)

    def grow(self, seq: Sequence, num_new_tokens: int) -> None:
        need = self.blocks_needed(seq, num_new_tokens)
        if need > len(self.free):
            raise RuntimeError("out of KV-cache blocks (caller must check can_grow)")
        seq.block_table.extend(self.free.popleft() for _ in range(need))

    def release(self, seq: Sequence) -> None:
        """Return all of ``seq``'s blocks (finish, abort or preemption)."""
        self.free.extend(seq.block_table)
        seq.block_table = []
        seq.num_computed_tokens = 0
