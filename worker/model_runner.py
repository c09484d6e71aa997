"""Owns the model and its paged KV cache; turns a scheduled batch into next-token logits."""

from __future__ import annotations

import itertools

import torch

from lorafleet.kernels import LoRAMeta
from lorafleet.worker.adapter_manager import AdapterManager
from lorafleet.worker.context import StepContext
from lorafleet.worker.model import CausalLM
from lorafleet.worker.scheduler import ScheduledBatch


def kv_block_bytes(model: CausalLM, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of K and V for one block across all layers."""
    a = model.args
    return 2 * a.num_layers * block_size * a.num_kv_heads * a.head_dim * dtype.itemsize


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        adapters: AdapterManager,
        num_blocks: int,
        block_size: int,
    ) -> None:
        self.model = model
        self.adapters = adapters
        self.block_size = block_size
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        a = model.args
        shape = (num_blocks * block_size, a.num_kv_heads, a.head_dim)
        self.kv_caches = [
            (
                torch.zeros(shape, dtype=self.dtype, device=self.device),
                torch.zeros(shape, dtype=self.dtype, device=self.device),
            )
            for _ in range(a.num_layers)
        ]

    def prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, StepContext]:
        """Flatten the batch into input ids and the step's ``StepContext``."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        token_slots: list[int] = []
        query_pad_index: list[int] = []
        starts: list[int] = []
        query_lens: list[int] = []
        context_lens: list[int] = []
        max_q = max(batch.num_new_tokens)
        slots = [
            -1 if seq.lora_request is None else self.adapters.slot_of(seq.lora_id)
            for seq in batch.seqs
        ]
        # Lay sequences out grouped by slot: each adapter's tokens form one contiguous run,
        # so LoRA ops touch slices instead of gathering rows.
        order = sorted(range(len(batch)), key=lambda i: slots[i])
        last_token: dict[int, int] = {}
        for b, i in enumerate(order):
            seq, n, slot = batch.seqs[i], batch.num_new_tokens[i], slots[i]
            start = seq.num_computed_tokens
            table = seq.block_table
            ids.extend(seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            slot_mapping.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            token_slots.extend([slot] * n)
            query_pad_index.extend(range(b * max_q, b * max_q + n))
            if batch.samples(i):
                last_token[i] = len(ids) - 1
            starts.append(start)
            query_lens.append(n)
            context_lens.append(start + n)
        logits_indices = [last_token[i] for i in range(len(batch)) if i in last_token]
        max_ctx = max(context_lens)
        max_blocks = -(-max_ctx // bs)
        rows = []
        for b, i in enumerate(order):
            row = batch.seqs[i].block_table[: -(-context_lens[b] // bs)]
            rows.append(row + [0] * (max_blocks - len(row)))
        tables = torch.tensor(rows, dtype=torch.int64)  # one conversion, not one per sequence
        key_pos = torch.arange(max_ctx)
        kv_gather_index = tables[:, key_pos // bs] * bs + key_pos % bs
        q_pos = torch.tensor(starts)[:, None] + torch.arange(max_q)[None, :]  # [B, max_q]
        ctx_len = torch.tensor(context_lens)[:, None, None]
        mask = (key_pos[None, None, :] <= q_pos[:, :, None]) & (key_pos[None, None, :] < ctx_len)
        window = self.model.args.sliding_window
        if window is not None:
            mask &= key_pos[None, None, :] > q_pos[:, :, None] - window
        pad_rows = torch.arange(max_q)[None, :] >= torch.tensor(query_lens)[:, None]
        mask[:, :, 0] |= pad_rows  # padded query rows attend to one key: no NaN rows
        lora = None
        if any(s >= 0 for s in token_slots):
            lora = LoRAMeta.from_token_slots(
                token_slots, self.adapters.num_slots, self.adapters.slot_ranks, self.device
            )
        # The int64 inputs travel in one host-to-device copy (each copy from pageable memory
        # waits for the stream on CUDA), then split into views.
        flat = [ids, positions, slot_mapping, query_pad_index, logits_indices]
        host = torch.tensor(list(itertools.chain.from_iterable(flat)), dtype=torch.int64)
        packed = torch.cat([host, kv_gather_index.flatten()])
        packed = packed.to(self.device, non_blocking=True)
        input_ids, pos, slot_map, pad_index, logit_rows, gather = packed.split(
            [*map(len, flat), kv_gather_index.numel()]
        )
        ctx = StepContext(
            positions=pos,
            slot_mapping=slot_map,
            query_pad_index=pad_index,
            kv_gather_index=gather.view(kv_gather_index.shape),
            attn_mask=mask[:, None].to(self.device, non_blocking=True),
            logits_indices=logit_rows,
            num_seqs=len(batch),
            max_query_len=max_q,
            lora=lora,
        )
        return input_ids, ctx

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> torch.Tensor:
        """Run one step; returns float32 logits [N, vocab] for the sampling sequences, in
        batch order."""
        input_ids, ctx = self.prepare(batch)
        hidden = self.model(input_ids, self.kv_caches, ctx)
        return self.model.compute_logits(hidden)
