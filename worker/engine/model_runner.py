"""Owns the model and its paged KV cache; turns a scheduled batch into next-token logits."""

from __future__ import annotations

import itertools
import logging
import math
import mmap

import torch

from lorafleet.kernels import LoRAMeta
from lorafleet.kernels.transfer import int_tensor, to_device
from lorafleet.worker.adapters.manager import AdapterManager
from lorafleet.worker.engine.decode_graphs import DecodeGraphs, GraphCaptureError
from lorafleet.worker.engine.scheduler import ScheduledBatch
from lorafleet.worker.engine.step_layout import PendingTokens, StepLayout, fill_pending
from lorafleet.worker.model.context import StepContext
from lorafleet.worker.model.decoder import CausalLM

log = logging.getLogger(__name__)


def cache_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed KV-cache tensor. On the CPU it is backed by an anonymous memory map, whose
    pages the OS gives as zeros when first touched: a cache sized for the worst case takes
    memory as it fills, not all at start (``torch.zeros`` writes every page)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    size = math.prod(shape) * dtype.itemsize
    return torch.frombuffer(mmap.mmap(-1, size), dtype=dtype).view(shape)


class ModelRunner:
    """Runs the model over a step's tokens. The KV cache holds one block more than the
    ``BlockManager`` hands out: ``scratch_block``, where padded rows of a captured decode
    graph write their keys and values."""

    def __init__(
        self,
        model: CausalLM,
        adapters: AdapterManager,
        num_blocks: int,
        block_size: int,
    ) -> None:
        param = next(model.parameters())  # the caches live where the weights do, in their dtype
        self.device, self.dtype = param.device, param.dtype
        self.model = model
        self.adapters = adapters
        self.block_size = block_size
        a = model.args
        self.scratch_block = num_blocks
        shape = ((num_blocks + 1) * block_size, a.num_kv_heads, a.head_dim)
        self.kv_caches = [
            (
                cache_zeros(shape, self.dtype, self.device),
                cache_zeros(shape, self.dtype, self.device),
            )
            for _ in range(a.num_layers)
        ]
        self.graphs: DecodeGraphs | None = None
        self.graphs_error: str | None = None  # why graphs were turned off, if they were

    def enable_decode_graphs(self, max_num_seqs: int, max_model_len: int) -> None:
        """Replay decode steps of up to ``max_num_seqs`` sequences and ``max_model_len``
        tokens of context from CUDA graphs (captured on first use per size bucket)."""
        self.graphs = DecodeGraphs(
            self.model,
            self.kv_caches,
            block_size=self.block_size,
            scratch_block=self.scratch_block,
            num_slots=self.adapters.num_slots,
            max_num_seqs=max_num_seqs,
            max_model_len=max_model_len,
        )

    def layout(self, batch: ScheduledBatch) -> StepLayout:
        slots = [
            -1 if seq.lora_request is None else self.adapters.slot_of(seq.lora_id)
            for seq in batch.seqs
        ]
        return StepLayout.of(batch, slots, self.block_size)

    def prepare(
        self, layout: StepLayout, pending: PendingTokens | None = None
    ) -> tuple[torch.Tensor, StepContext]:
        """Input ids and the step's ``StepContext``, at the layout's exact sizes; ids that
        are still on the device come from ``pending``."""
        lora = None
        if any(s >= 0 for s in layout.token_slots):
            lora = LoRAMeta.from_token_slots(
                layout.token_slots, self.adapters.num_slots, self.adapters.slot_ranks, self.device
            )
        decode = layout.max_query_len == 1
        if decode:  # block tables [B, W] and lengths: the kernel reads keys in place
            width = max(len(t) for t in layout.block_tables)
            index, mask = layout.table_tensor(layout.num_seqs, width, fill_block=0), None
            per_step = layout.context_lens
        else:  # the cache row of every key [B, C], the mask, and where queries pad to
            index, mask = layout.attention_tables(self.block_size, self.model.args.sliding_window)
            per_step = layout.query_pad_index
        # The int64 inputs travel in one host-to-device copy, then split into views.
        flat = [layout.ids, layout.positions, layout.slot_mapping, layout.logit_rows, per_step]
        host = int_tensor(list(itertools.chain.from_iterable(flat)))
        packed = to_device(torch.cat([host, index.flatten()]), self.device)
        ids, positions, slot_mapping, logits_rows, per_step_view, index_flat = packed.split(
            [*map(len, flat), index.numel()]
        )
        index_view = index_flat.view(index.shape)
        fill_pending(ids, layout, pending)
        ctx = StepContext(
            positions=positions,
            slot_mapping=slot_mapping,
            logits_indices=logits_rows,
            num_seqs=layout.num_seqs,
            max_query_len=layout.max_query_len,
            block_size=self.block_size,
            lora=lora,
            block_tables=index_view if decode else None,
            context_lens=per_step_view if decode else None,
            query_pad_index=None if decode else per_step_view,
            kv_gather_index=None if decode else index_view,
            attn_mask=None if decode else to_device(mask, self.device),
        )
        return ids, ctx

    def forward(self, input_ids: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """float32 logits [len(logits_indices), vocab] of the tokens in ``ctx.logits_indices``."""
        return self.model.compute_logits(self.model(input_ids, self.kv_caches, ctx))

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, pending: PendingTokens | None = None) -> torch.Tensor:
        """Queue one step; returns float32 logits [N + P, vocab]: the N sampling sequences in
        batch order, then the P prompt tokens scored for prompt log-probabilities
        (``prompt_targets(batch)``, in that order). ``pending`` holds the ids that are
        ``PENDING_TOKEN`` on the host.
        Decode steps replay a captured CUDA graph when graphs are on; if a capture fails,
        graphs are turned off (``graphs_error`` says why) and steps run eagerly."""
        layout = self.layout(batch)
        if self.graphs is not None and self.graphs.fits(layout):
            try:
                hidden = self.graphs.run(layout, self.adapters.slot_ranks, pending)
                return self.model.compute_logits(hidden)
            except GraphCaptureError as err:
                # A serving engine keeps serving: eager steps give the same tokens, slower.
                log.warning("CUDA graphs turned off, decode steps run eagerly: %s", err)
                self.graphs, self.graphs_error = None, str(err)
        return self.forward(*self.prepare(layout, pending))
