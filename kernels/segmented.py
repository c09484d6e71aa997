"""The CPU path of a LoRA linear: slot stacks fused across slices, one segment per adapter.

Every token meets its own adapter's weights only: ``add_lora_fused`` walks the step's
segments (the tokens of one slot: a slice of rows, as the engine lays tokens out grouped by
slot) and gives each, on each projection its adapter targets (``slot_mask``), two matmuls
at the slot's live rank: one that shrinks every fused slice (q|k|v, gate|up) at once and
one that expands them all. On the CPU those small matmuls cost mostly their fixed price
(measured on SmolLM2-135M, 2-core x86: 20-40 us per projection call in a decode step,
against about 10 us of reading the weights), so the layout (``FusedStacks``) is chosen
for the fewest calls: A interleaved by rank, so one matmul covers every slice at any live
rank, and B block-diagonal, so one more covers every output slice. Long segments (prefill)
expand one slice at a time instead, where the block-diagonal's zeros would cost real
multiply-adds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lorafleet.kernels.meta import LoRAMeta

#: Segments of at most this many tokens expand every slice in one matmul over the
#: block-diagonal B (n times the expand's multiply-adds, cheaper than n - 1 more calls up
#: to about 32 tokens, measured); longer ones, one matmul per slice on its diagonal block.
BLOCK_DIAGONAL_MAX_TOKENS = 32


@dataclass(frozen=True)
class SlotViews:
    """One slot's weights at live rank r, as views of a ``FusedStacks``: ``a`` [H, r*n] (A^T),
    ``b`` [r*n, N] (block-diagonal), and ``diagonal[i]`` [r, N_i], slice i's block of ``b``."""

    a: torch.Tensor
    b: torch.Tensor
    diagonal: tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class FusedStacks:
    """The adapter slot stacks of one LoRA linear with n output slices, fused for the CPU.

    - ``a_t`` [S, H, R*n]: each slot's A transposed, the slices interleaved by rank: column
      ``r * n + i`` is row r of slice i's A, so a slot of live rank r reads its first r*n
      columns. Transposed, the shrink is a plain (NN) matmul, which MKL runs well on any
      number of threads; x @ A.T (NT) at decode sizes it splits across threads at a loss
      (8 segments of q|k|v on 2 threads: 82 us against 270 us, measured).
    - ``b_t`` [S, R*n, N]: each slot's B transposed, block-diagonal: row ``r * n + i`` holds
      column r of slice i's B in that slice's output columns and zeros elsewhere (n times
      the memory of B, for one expand matmul over every slice).
    ``lora_as[i]`` [S, R, H] and ``lora_bs[i]`` [S, N_i, R] are the per-slice stacks of the
    kernels' contract, as views of this memory: writing a slot through them (the
    ``AdapterManager`` does) is writing it here. The off-diagonal zeros are never written.
    """

    a_t: torch.Tensor
    b_t: torch.Tensor
    max_rank: int
    num_slices: int
    offsets: tuple[int, ...]
    out_sizes: tuple[int, ...]
    lora_as: tuple[torch.Tensor, ...]
    lora_bs: tuple[torch.Tensor, ...]
    # (slot, live rank) -> SlotViews. Views of fixed memory: they never go stale.
    _views: dict[tuple[int, int], SlotViews] = field(
        default_factory=dict, compare=False, repr=False
    )

    @classmethod
    def allocate(
        cls,
        num_slots: int,
        rank: int,
        in_features: int,
        out_sizes: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> FusedStacks:
        """Zeroed stacks for ``num_slots`` adapters of rank up to ``rank``; the slices'
        output columns lie back to back in ``out_sizes`` order."""
        n, total = len(out_sizes), sum(out_sizes)
        offsets = tuple(sum(out_sizes[:i]) for i in range(n))
        a_t = torch.zeros(num_slots, in_features, rank * n, dtype=dtype, device=device)
        b_t = torch.zeros(num_slots, rank * n, total, dtype=dtype, device=device)
        a_split = a_t.view(num_slots, in_features, rank, n)
        b_split = b_t.view(num_slots, rank, n, total)
        lora_as = tuple(a_split[..., i].transpose(1, 2) for i in range(n))
        lora_bs = tuple(
            b_split[:, :, i, off : off + size].transpose(1, 2)
            for i, (off, size) in enumerate(zip(offsets, out_sizes, strict=True))
        )
        return cls(a_t, b_t, rank, n, offsets, tuple(out_sizes), lora_as, lora_bs)

    def views(self, slot: int, rank: int) -> SlotViews:
        """``slot``'s weights at live rank ``rank`` (views, built once per slot and rank)."""
        key = (slot, rank)
        found = self._views.get(key)
        if found is None:
            n, width = self.num_slices, rank * self.num_slices
            b = self.b_t[slot, :width]
            diagonal = tuple(
                b[i::n, off : off + size]
                for i, (off, size) in enumerate(zip(self.offsets, self.out_sizes, strict=True))
            )
            found = self._views[key] = SlotViews(self.a_t[slot, :, :width], b, diagonal)
        return found


@dataclass(frozen=True)
class Segment:
    """The tokens of one active slot in a step, and its live ``rank``: ``rows``, a slice of
    contiguous rows (``whole``: every row of the step), or ``index``, int64 row numbers when
    they are scattered; ``short``: few enough tokens for the block-diagonal expand."""

    slot: int
    rank: int
    rows: slice
    index: torch.Tensor | None
    whole: bool
    short: bool


def segments(meta: LoRAMeta, max_rank: int) -> tuple[Segment, ...]:
    """The step's segments for stacks of rank ``max_rank``, built once per step (every
    layer shares ``meta``). Slots of live rank 0 add nothing and have none."""
    key = ("segments", max_rank)
    found = meta.cache.get(key)
    if found is None:
        found = []
        counts = meta.host_tables().counts
        for g, (slot, span) in enumerate(zip(meta.host_tables().active, meta.spans, strict=True)):
            rank = meta.rank_of(slot, max_rank)
            if rank == 0:
                continue
            start, end = span if span is not None else (0, 0)
            found.append(
                Segment(
                    slot,
                    rank,
                    slice(start, end),
                    None if span is not None else meta.groups[g][1],
                    span == (0, meta.num_tokens),
                    counts[slot] <= BLOCK_DIAGONAL_MAX_TOKENS,
                )
            )
        found = meta.cache[key] = tuple(found)
    return found


def add_lora_fused(
    x: torch.Tensor,
    stacks: FusedStacks,
    meta: LoRAMeta,
    out: torch.Tensor,
    slot_mask: int = -1,
    scale: float = 1.0,
) -> torch.Tensor:
    """``out[t, off_i:off_i+N_i] += scale * x[t] @ A_i[slot].T @ B_i[slot].T`` for every
    token with a slot whose bit is set in ``slot_mask`` (a clear bit says the slot holds no
    weights for this linear: its tokens are skipped); other rows are untouched.

    x [T, H] and out [T, N] (N = sum of ``stacks.out_sizes``) share the stacks' dtype; rank
    columns past a slot's rank (``meta.slot_ranks_host``) are ignored. float32 runs in
    place with no copies (``addmm_`` into row slices); other dtypes accumulate in float32
    with one cast on write. Returns ``out``.
    """
    exact = out.dtype == torch.float32
    single = stacks.num_slices == 1
    for seg in segments(meta, stacks.max_rank):
        if not slot_mask >> seg.slot & 1:
            continue
        views = stacks.views(seg.slot, seg.rank)
        if seg.index is not None or not exact:
            _add_upcast(x, views, seg, out, scale)
        elif not (seg.short or single):
            _add_per_slice(x, views, seg, out, scale, stacks.offsets)
        else:  # the decode case, inline: a call costs microseconds on a cold interpreter
            rows, dest = (x, out) if seg.whole else (x[seg.rows], out[seg.rows])
            buf = torch.mm(rows, views.a)
            if scale == 1.0:  # so does a keyword argument to addmm_
                dest.addmm_(buf, views.b)
            else:
                dest.addmm_(buf, views.b, alpha=scale)
    return out


def _add_per_slice(
    x: torch.Tensor,
    views: SlotViews,
    seg: Segment,
    out: torch.Tensor,
    scale: float,
    offsets: tuple[int, ...],
) -> None:
    """float32, contiguous rows of a long segment: one expand per slice on its diagonal
    block, skipping the block-diagonal's zeros."""
    rows, dest = (x, out) if seg.whole else (x[seg.rows], out[seg.rows])
    buf = torch.mm(rows, views.a)  # [t, r*n], the slices interleaved: slice i is i::n
    n = len(views.diagonal)
    for i, (block, off) in enumerate(zip(views.diagonal, offsets, strict=True)):
        dest[:, off : off + block.shape[1]].addmm_(buf[:, i::n], block, alpha=scale)


def _add_upcast(
    x: torch.Tensor, views: SlotViews, seg: Segment, out: torch.Tensor, scale: float
) -> None:
    """16-bit dtypes, or rows scattered through the batch: the update in float32, one cast
    on write."""
    if seg.index is None:
        rows, dest = x[seg.rows], out[seg.rows]
    else:
        rows, dest = x.index_select(0, seg.index), out.index_select(0, seg.index)
    part = torch.mm(torch.mm(rows.float(), views.a.float()), views.b.float())
    new = torch.add(dest.float(), part, alpha=scale)
    if seg.index is None:
        dest.copy_(new)
    else:
        out.index_copy_(0, seg.index, new.to(out.dtype))
