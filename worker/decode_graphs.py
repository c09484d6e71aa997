"""CUDA graphs for decode steps: one capture per size bucket, replayed with new inputs.

An eager decode step launches a few hundred kernels from Python, and for a 1B model the
launches take longer than the GPU work (measured in BENCHMARKS.md): the engine is
host-bound. A graph replays the whole forward pass in one launch.

A graph fixes shapes, pointers and grids, so a step is padded up to a bucket: batch size
B and context width C (keys gathered per sequence) each round up to the next size in
1, 2, 3, 4, 6, 8, 12, ... (at most 1.5x the work of the exact step). Inputs live in static
buffers that every graph reads a prefix of; padded rows decode token 0 at position 0 on no
adapter, write their K/V to the runner's scratch block and attend to one key there. The
LoRA ops read a static ``LoRAMeta`` (see ``LoRAMeta.for_capture``) whose grids cover any
mix of adapters. Which linears run LoRA ops at all is fixed at capture, so the graph key
includes the set of linears that some loaded adapter targets.

On a CPU there is nothing to capture: the same static buffers run eagerly, which is how
the CPU tests check the padded layout against eager steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lorafleet.kernels import LoRAMeta
from lorafleet.kernels.meta import int_tensor
from lorafleet.worker.context import StepContext
from lorafleet.worker.step_layout import StepLayout

if TYPE_CHECKING:
    from lorafleet.worker.model_runner import ModelRunner

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
    def __init__(self, runner: ModelRunner, max_num_seqs: int, max_model_len: int) -> None:
        self.runner = runner
        self.block_size = bs = runner.block_size
        self.batch_sizes = size_buckets(max_num_seqs)
        self.block_counts = size_buckets(-(-max_model_len // bs))
        max_b, max_blocks = self.batch_sizes[-1], self.block_counts[-1]
        device = runner.device
        self.inputs = torch.zeros(_INPUT_ROWS, max_b, dtype=torch.int64, device=device)
        self.tables = torch.zeros(max_b * max_blocks, dtype=torch.int64, device=device)
        self.key_pos = torch.arange(max_blocks * bs, device=device)
        self.rows = torch.arange(max_b, device=device)
        self.metas: dict[int, LoRAMeta] = {}  # per batch bucket, shared by its graphs
        self.graphs: dict[tuple, _Graph] = {}
        self.capture = device.type == "cuda"
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.capture_stream = torch.cuda.Stream(device) if self.capture else None
        self.linears = list({id(lin): lin for lin, _ in runner.adapters.linears.values()}.values())
        self.replays = 0

    def fits(self, layout: StepLayout) -> bool:
        return layout.is_decode and layout.num_seqs <= self.batch_sizes[-1]

    def run(self, layout: StepLayout) -> torch.Tensor:
        """Final hidden states [num_seqs, hidden] of a decode step's sequences, in batch
        order: a view of the graph's output, overwritten by the next replay. Raises
        ``GraphCaptureError`` if the step's graph could not be captured."""
        n = layout.num_seqs
        batch = _bucket(n, self.batch_sizes)
        blocks = _bucket(max(len(t) for t in layout.block_tables), self.block_counts)
        uses_lora = any(s >= 0 for s in layout.token_slots)
        targets = tuple(lin.slot_mask != 0 for lin in self.linears) if uses_lora else None
        self._write_inputs(layout, batch, blocks)
        if uses_lora:
            meta = self._meta(batch)
            meta.write(layout.token_slots + [-1] * (batch - n), self.runner.adapters.slot_ranks)
        key = (batch, blocks, targets)
        graph = self.graphs.get(key)
        if graph is None:
            try:
                graph = self._capture(batch, blocks, uses_lora)
            except Exception as exc:  # whatever broke, the caller can still run it eagerly
                raise GraphCaptureError(
                    f"capturing the decode graph for {batch} sequences x {blocks} blocks "
                    f"failed: {type(exc).__name__}: {exc}"
                ) from exc
            self.graphs[key] = graph
        self.replays += 1
        return graph.replay()[:n]

    def _meta(self, batch: int) -> LoRAMeta:
        meta = self.metas.get(batch)
        if meta is None:
            slots = self.runner.adapters.num_slots
            meta = self.metas[batch] = LoRAMeta.for_capture(batch, slots, self.runner.device)
        return meta

    def _write_inputs(self, layout: StepLayout, batch: int, blocks: int) -> None:
        """Copy the step into the static buffers, padded to ``batch`` rows and ``blocks``
        blocks per row."""
        pad = batch - layout.num_seqs
        scratch = self.runner.scratch_block
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
        self.inputs[:, :batch].copy_(host.view(_INPUT_ROWS, batch), non_blocking=True)
        flat: list[int] = []
        for table in layout.block_tables:
            flat.extend(table)
            flat.extend([scratch] * (blocks - len(table)))
        flat.extend([scratch] * (blocks * pad))
        self.tables[: batch * blocks].copy_(int_tensor(flat), non_blocking=True)

    def _forward(self, batch: int, blocks: int, lora: LoRAMeta | None) -> torch.Tensor:
        """The captured work: attention tables from the static inputs, then the model."""
        bs = self.block_size
        ids, positions, slot_mapping, logits_rows, context_lens = self.inputs[:, :batch]
        tables = self.tables[: batch * blocks].view(batch, blocks)
        key_pos = self.key_pos[: blocks * bs]
        gather = tables[:, key_pos // bs] * bs + key_pos % bs
        mask = key_pos[None, :] < context_lens[:, None]  # a decode token sees its whole context
        window = self.runner.model.args.sliding_window
        if window is not None:
            mask &= key_pos[None, :] > (context_lens[:, None] - 1) - window
        ctx = StepContext(
            positions=positions,
            slot_mapping=slot_mapping,
            query_pad_index=self.rows[:batch],
            kv_gather_index=gather,
            attn_mask=mask[:, None, None, :],
            logits_indices=logits_rows,
            num_seqs=batch,
            max_query_len=1,
            lora=lora,
        )
        return self.runner.model(ids, self.runner.kv_caches, ctx)

    def _capture(self, batch: int, blocks: int, uses_lora: bool) -> _Graph:
        lora = self._meta(batch) if uses_lora else None
        if not self.capture:
            return _Graph(lambda: self._forward(batch, blocks, lora))
        # Warm up outside the capture, on the capture stream: the first call compiles
        # Triton kernels and builds the launch plans the static meta caches for replays.
        stream = self.capture_stream
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream):
            self._forward(batch, blocks, lora)
            # ``torch.cuda.graph`` would also run gc.collect() and empty_cache() around
            # every capture: a few hundred ms each in a serving process, for nothing here
            # (vLLM skips them too). capture_end also runs when the forward raises.
            graph.capture_begin(pool=self.pool)
            try:
                hidden = self._forward(batch, blocks, lora)
            finally:
                graph.capture_end()
        torch.cuda.current_stream().wait_stream(stream)

        def replay() -> torch.Tensor:
            graph.replay()
            return hidden

        return _Graph(replay)
