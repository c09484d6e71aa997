"""CUDA graphs for decode steps: one capture per batch-size bucket, replayed with new inputs.

An eager decode step launches a few hundred kernels from Python, and for a 1B model the
launches take longer than the GPU work (measured in BENCHMARKS.md): the engine is
host-bound. A graph replays the whole forward pass in one launch.

A graph fixes shapes, pointers and grids, so a step's batch is padded up to a bucket of
1, 2, 3, 4, 6, 8, 12, ... sequences (at most 1.5x the rows of the exact step). Inputs live
in static buffers that every graph reads a prefix of: token ids, positions, cache rows,
context lengths and block tables as wide as ``max_model_len`` needs (decode attention reads
a context's keys in place, bounded by its length, so no graph depends on context size).
Padded rows decode token 0 at position 0 on no adapter, write their K/V to a scratch block
of the KV cache and attend to that one key. The LoRA ops read a static ``LoRAMeta`` (see
``LoRAMeta.for_capture``) whose grids cover any mix of adapters. Which linears run LoRA
ops at all is fixed at capture, so the graph key includes the set of linears that some
loaded adapter targets.

On a CPU there is nothing to capture: the same static buffers run eagerly, which is how
the CPU tests check the padded layout against eager steps.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lorafleet.kernels import LoRAMeta
from lorafleet.kernels.transfer import copy_to_device, int_tensor
from lorafleet.worker.engine.step_layout import PendingTokens, StepLayout, fill_pending
from lorafleet.worker.model.context import StepContext
from lorafleet.worker.model.decoder import CausalLM

log = logging.getLogger(__name__)
_INPUT_ROWS = 5  # ids, positions, slot mapping, logits rows, context lengths


def size_buckets(limit: int) -> list[int]:
    """1, 2, 3, 4, 6, 8, 12, 16, 24, ... (powers of two and 1.5 times them) below ``limit``,
    then ``limit`` itself."""
    sizes, p = [1, 2], 2
    while sizes[-1] < limit:
        sizes.extend((p + p // 2, 2 * p))
        p *= 2
    return [s for s in sizes if s < limit] + [limit]


def _bucket(n: int, sizes: list[int]) -> int:
    return next(s for s in sizes if s >= n)


class GraphCaptureError(RuntimeError):
    """Capturing a decode graph failed; the step can still run eagerly."""


@dataclass
class _Graph:
    """One bucket's replayable forward: ``replay()`` returns final hidden states [B, hidden]
    (the logits, [B, vocab] in fp32, would cost every graph its own 0.5 MB per row of
    memory; they are computed after the replay, in two launches)."""

    replay: Callable[[], torch.Tensor]


class DecodeGraphs:
    """Decode steps of ``model`` over ``kv_caches`` (one (K, V) pair per layer, rows of
    ``block_size``-token blocks; padded rows write to block ``scratch_block``) from graphs,
    for up to ``max_num_seqs`` sequences of up to ``max_model_len`` tokens, with
    ``num_slots`` adapter slots."""

    def __init__(
        self,
        model: CausalLM,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        *,
        block_size: int,
        scratch_block: int,
        num_slots: int,
        max_num_seqs: int,
        max_model_len: int,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = bs = block_size
        self.scratch_block = scratch_block
        self.num_slots = num_slots
        self.device = device = next(model.parameters()).device
        self.batch_sizes = size_buckets(max_num_seqs)
        max_b, max_blocks = self.batch_sizes[-1], -(-max_model_len // bs)
        self.inputs = torch.zeros(_INPUT_ROWS, max_b, dtype=torch.int64, device=device)
        self.tables = torch.full(
            (max_b, max_blocks), scratch_block, dtype=torch.int64, device=device
        )
        self.metas: dict[int, LoRAMeta] = {}  # per batch bucket, shared by its graphs
        self.graphs: dict[tuple, _Graph] = {}
        self.capture = device.type == "cuda"
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.capture_stream = torch.cuda.Stream(device) if self.capture else None
        self.linears = list({id(lin): lin for lin, _ in model.lora_linears().values()}.values())
        self.replays = 0

    def fits(self, layout: StepLayout) -> bool:
        return layout.is_decode and layout.num_seqs <= self.batch_sizes[-1]

    def run(
        self,
        layout: StepLayout,
        slot_ranks: list[int],
        pending: PendingTokens | None = None,
    ) -> torch.Tensor:
        """Final hidden states [num_seqs, hidden] of a decode step's sequences, in batch
        order: a view of the graph's output, overwritten by the next replay. ``slot_ranks``:
        each adapter slot's rank now. Ids still on the device come from ``pending``. Raises
        ``GraphCaptureError`` if the step's graph could not be captured."""
        n = layout.num_seqs
        batch = _bucket(n, self.batch_sizes)
        uses_lora = any(s >= 0 for s in layout.token_slots)
        targets = tuple(lin.slot_mask != 0 for lin in self.linears) if uses_lora else None
        self._write_inputs(layout, batch)
        fill_pending(self.inputs[0], layout, pending)
        if uses_lora:
            meta = self._meta(batch)
            meta.write(layout.token_slots + [-1] * (batch - n), slot_ranks)
        key = (batch, targets)
        graph = self.graphs.get(key)
        if graph is None:
            start = time.perf_counter()
            try:
                graph = self._capture(batch, uses_lora)
            except Exception as exc:  # whatever broke, the caller can still run it eagerly
                raise GraphCaptureError(
                    f"capturing the decode graph for {batch} sequences failed: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            self.graphs[key] = graph
            log.debug(
                "captured the decode graph for %d sequences%s in %.0f ms (%d graphs)",
                batch,
                " with LoRA" if uses_lora else "",
                1000 * (time.perf_counter() - start),
                len(self.graphs),
            )
        self.replays += 1
        return graph.replay()[:n]

    def _meta(self, batch: int) -> LoRAMeta:
        meta = self.metas.get(batch)
        if meta is None:
            meta = LoRAMeta.for_capture(batch, self.num_slots, self.device)
            self.metas[batch] = meta
        return meta

    def _write_inputs(self, layout: StepLayout, batch: int) -> None:
        """Copy the step into the static buffers, padded to ``batch`` rows. Block tables
        are written as wide as this step's longest context; columns past it keep older
        entries, which no context length reaches."""
        pad = batch - layout.num_seqs
        scratch = self.scratch_block
        host = int_tensor(
            layout.ids
            + [0] * pad
            + layout.positions
            + [0] * pad
            + layout.slot_mapping
            + [scratch * self.block_size] * pad
            + layout.logits_indices
            + list(range(layout.num_seqs, batch))
            + layout.context_lens
            + [1] * pad
        )
        copy_to_device(self.inputs[:, :batch], host.view(_INPUT_ROWS, batch))
        width = max(len(t) for t in layout.block_tables)
        tables = layout.table_tensor(batch, width, fill_block=scratch)
        copy_to_device(self.tables[:batch, :width], tables)

    def _forward(self, batch: int, lora: LoRAMeta | None) -> torch.Tensor:
        """The captured work: the model over the static inputs' first ``batch`` rows."""
        ids, positions, slot_mapping, logits_rows, context_lens = self.inputs[:, :batch]
        ctx = StepContext(
            positions=positions,
            slot_mapping=slot_mapping,
            logits_indices=logits_rows,
            num_seqs=batch,
            max_query_len=1,
            block_size=self.block_size,
            lora=lora,
            block_tables=self.tables[:batch],
            context_lens=context_lens,
        )
        return self.model(ids, self.kv_caches, ctx)

    def _capture(self, batch: int, uses_lora: bool) -> _Graph:
        lora = self._meta(batch) if uses_lora else None
        if not self.capture:
            return _Graph(lambda: self._forward(batch, lora))
        # Warm up outside the capture, on the capture stream: the first call compiles
        # Triton kernels and builds the launch plans the static meta caches for replays.
        stream = self.capture_stream
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream):
            self._forward(batch, lora)
            # ``torch.cuda.graph`` would also run gc.collect() and empty_cache() around
            # every capture: a few hundred ms each in a serving process, for nothing here
            # (vLLM skips them too). capture_end also runs when the forward raises.
            graph.capture_begin(pool=self.pool)
            try:
                hidden = self._forward(batch, lora)
            finally:
                graph.capture_end()
        torch.cuda.current_stream().wait_stream(stream)

        def replay() -> torch.Tensor:
            graph.replay()
            return hidden

        return _Graph(replay)
