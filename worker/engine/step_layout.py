"""Host-side layout of one step: where each scheduled token goes, before any tensor exists.

Built once per step by the ``ModelRunner`` and turned into device tensors either at their
exact sizes (eager steps) or padded into a captured decode graph's static buffers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lorafleet.kernels.transfer import int_tensor, to_device
from lorafleet.worker.engine.scheduler import ScheduledBatch
from lorafleet.worker.engine.sequence import PENDING_TOKEN


@dataclass
class StepLayout:
    """The T tokens of a step from B sequences, laid out grouped by adapter slot.

    Per token: ``ids``, ``positions``, ``slot_mapping`` (flat KV-cache row), ``token_slots``
    (adapter slot, -1 = base model), ``query_pad_index`` (row in the padded [B * max_query_len]
    queries). Per sequence, in layout order: ``block_tables`` (blocks covering its context),
    ``starts`` (tokens cached before the step), ``query_lens``, ``context_lens``.
    ``logits_indices`` lists, in batch order, the token whose next-token logits each sampling
    sequence needs. ``pending`` lists (row, batch index) of the ids that are
    ``PENDING_TOKEN``: the previous step's samples, which the runner fills in on the device.
    ``prompt_rows`` lists the rows whose logits score the next prompt token, for requests
    that asked for prompt log-probabilities, in the order of ``prompt_targets(batch)``;
    their logits follow the sampling rows' (see ``logit_rows``).
    """

    ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    token_slots: list[int]
    query_pad_index: list[int]
    logits_indices: list[int]
    block_tables: list[list[int]]
    starts: list[int]
    query_lens: list[int]
    context_lens: list[int]
    max_query_len: int
    pending: list[tuple[int, int]] = field(default_factory=list)
    prompt_rows: list[int] = field(default_factory=list)

    @property
    def num_seqs(self) -> int:
        return len(self.starts)

    @property
    def is_decode(self) -> bool:
        """One new token per sequence, each sampled: the shape CUDA graphs capture."""
        return (
            self.max_query_len == 1
            and len(self.logits_indices) == self.num_seqs
            and not self.prompt_rows
        )

    @property
    def logit_rows(self) -> list[int]:
        """Rows whose logits the step computes: the sampling rows, then the prompt rows."""
        return self.logits_indices + self.prompt_rows if self.prompt_rows else self.logits_indices

    @classmethod
    def of(cls, batch: ScheduledBatch, slots: list[int], block_size: int) -> StepLayout:
        """Lay out ``batch``; ``slots[i]`` is sequence i's adapter slot (-1: none)."""
        bs = block_size
        max_q = max(batch.num_new_tokens)
        # Sequences grouped by slot: each adapter's tokens form one contiguous run, so LoRA
        # ops touch slices (or whole segments) instead of gathering rows.
        order = sorted(range(len(batch)), key=lambda i: slots[i])
        if max_q == 1:
            return cls._of_decode(batch, slots, bs, order)
        layout = cls([], [], [], [], [], [], [], [], [], [], max_q)
        last_token: dict[int, int] = {}
        first_row: dict[int, int] = {}  # batch index -> its first row
        for b, i in enumerate(order):
            seq, n, slot = batch.seqs[i], batch.num_new_tokens[i], slots[i]
            start = seq.num_computed_tokens
            table = seq.block_table
            first_row[i] = len(layout.ids)
            layout.ids.extend(seq.token_ids[start : start + n])
            if layout.ids[-1] == PENDING_TOKEN:  # only a sequence's last token can be
                layout.pending.append((len(layout.ids) - 1, i))
            layout.positions.extend(range(start, start + n))
            layout.slot_mapping.extend(
                table[p // bs] * bs + p % bs for p in range(start, start + n)
            )
            layout.token_slots.extend([slot] * n)
            layout.query_pad_index.extend(range(b * max_q, b * max_q + n))
            if batch.samples(i):
                last_token[i] = len(layout.ids) - 1
            layout.block_tables.append(table[: -(-(start + n) // bs)])
            layout.starts.append(start)
            layout.query_lens.append(n)
            layout.context_lens.append(start + n)
        layout.logits_indices = [last_token[i] for i in range(len(batch)) if i in last_token]
        layout.prompt_rows = _prompt_rows(batch, lambda: first_row)
        return layout

    @classmethod
    def _of_decode(
        cls, batch: ScheduledBatch, slots: list[int], bs: int, order: list[int]
    ) -> StepLayout:
        """``of`` for one new token per sequence: the same layout, built without the
        per-token ranges (the host path every decode step, CUDA graphs or not, takes)."""
        ids, positions, slot_mapping, tables, starts, pending = [], [], [], [], [], []
        rows = {}  # batch index -> layout row
        for b, i in enumerate(order):
            seq = batch.seqs[i]
            p = seq.num_computed_tokens
            table = seq.block_table
            ids.append(seq.token_ids[p])
            if ids[-1] == PENDING_TOKEN:
                pending.append((b, i))
            positions.append(p)
            slot_mapping.append(table[p // bs] * bs + p % bs)
            tables.append(table[: p // bs + 1])
            starts.append(p)
            if p + 1 == seq.num_tokens:  # batch.samples(i)
                rows[i] = b
        n = len(order)
        return cls(
            ids=ids,
            positions=positions,
            slot_mapping=slot_mapping,
            token_slots=[slots[i] for i in order],
            query_pad_index=list(range(n)),
            logits_indices=[rows[i] for i in range(n) if i in rows],
            block_tables=tables,
            starts=starts,
            query_lens=[1] * n,
            context_lens=[p + 1 for p in starts],
            max_query_len=1,
            pending=pending,
            prompt_rows=_prompt_rows(batch, lambda: {i: b for b, i in enumerate(order)}),
        )

    def table_tensor(self, num_rows: int, num_blocks: int, fill_block: int) -> torch.Tensor:
        """int64 [num_rows, num_blocks] host tensor: each sequence's block table, then rows
        of padding, every row filled out with ``fill_block``."""
        flat: list[int] = []
        for table in self.block_tables:
            flat.extend(table)
            flat.extend([fill_block] * (num_blocks - len(table)))
        flat.extend([fill_block] * (num_blocks * (num_rows - self.num_seqs)))
        return int_tensor(flat).view(num_rows, num_blocks)

    def attention_tables(
        self, block_size: int, window: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(kv_gather_index int64 [B, C], attn_mask bool [B, 1, max_q, C]) on the host, for
        steps with prefill chunks (C = the longest context).

        Row b gathers sequence b's keys from the cache; keys past its context read block 0
        and are masked; padded query rows attend to the first key only, so no row of the
        softmax is empty (no NaN).
        """
        n, max_q, num_keys = self.num_seqs, self.max_query_len, max(self.context_lens)
        tables = self.table_tensor(n, -(-num_keys // block_size), fill_block=0)
        key_pos = torch.arange(num_keys)
        gather = tables[:, key_pos // block_size] * block_size + key_pos % block_size
        q_pos = torch.tensor(self.starts)[:, None] + torch.arange(max_q)[None, :]  # [B, max_q]
        ctx_len = torch.tensor(self.context_lens)[:, None, None]
        mask = (key_pos[None, None, :] <= q_pos[:, :, None]) & (key_pos[None, None, :] < ctx_len)
        if window is not None:
            mask &= key_pos[None, None, :] > q_pos[:, :, None] - window
        pad_rows = torch.arange(max_q)[None, :] >= torch.tensor(self.query_lens)[:, None]
        mask[:, :, 0] |= pad_rows
        return gather, mask[:, None]


def prompt_targets(batch: ScheduledBatch) -> list[tuple[int, int]]:
    """(batch index, index in ``token_ids``) of each prompt token the step scores, in batch
    order: for sequences that keep prompt log-probabilities, every token of the step's
    chunk whose next token is still part of the prompt scores that next token."""
    targets = []
    for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens, strict=True)):
        if seq.wants_prompt_logprobs:
            start = seq.num_computed_tokens
            end = min(start + n, seq.num_prompt_tokens - 1)
            targets.extend((i, p + 1) for p in range(start, end))
    return targets


def _prompt_rows(batch: ScheduledBatch, first_rows: Callable[[], dict[int, int]]) -> list[int]:
    """The layout rows of ``prompt_targets(batch)``; ``first_rows()`` maps each batch index
    to the row of its first token in the step (built only when a prompt is scored)."""
    targets = prompt_targets(batch)
    if not targets:
        return []
    first_row = first_rows()
    return [first_row[i] + index - 1 - batch.seqs[i].num_computed_tokens for i, index in targets]


@dataclass
class PendingTokens:
    """The previous step's samples, still on the device: ``tokens`` int64 [N], and
    ``rows``, batch index -> row in ``tokens``, for the sequences of this step whose last
    token is one of them."""

    tokens: torch.Tensor
    rows: dict[int, int]


def fill_pending(ids: torch.Tensor, layout: StepLayout, pending: PendingTokens | None) -> None:
    """Put the device-side samples into ``ids`` (int64 [>= T], on the device) where
    ``layout`` has ``PENDING_TOKEN``: two small kernels, no wait for the device."""
    if not layout.pending:
        return
    if pending is None:
        raise RuntimeError("the step has pending token ids but no samples to take them from")
    dst = [row for row, _ in layout.pending]
    src = [pending.rows[i] for _, i in layout.pending]
    index = to_device(int_tensor(dst + src), ids.device)
    ids.index_copy_(0, index[: len(dst)], pending.tokens.index_select(0, index[len(dst) :]))
