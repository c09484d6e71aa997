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
multiply-adds, and so do short ones whose block-diagonal would hold many zeros
(``PER_SLICE_MIN_ZEROS``). A projection call cuts every segment's rows out of x and out
with one ``split_with_sizes`` each (``Segments.sizes``), not a slice per segment.

A step whose tokens all sit on one slot (a single stream, or a batch on one adapter) takes a
shorter road, ``HotSlot``: the slot's A lies under the base weight, so the base GEMM yields
the shrink too and only the expand is left. On 2 threads that drops the one op MKL splits
across threads at decode sizes (x @ A^T at one token: 46 us of CPU time against 4-5 us for
the expand, measured on the 2-core VM while other work loaded it), and most of a call's
Python (one cached lookup per step and projection). When the same slot has held every row
for ``merge_after`` steps in a row (a long single-adapter stream), the hot slot merges it:
W + B A in a copy of W, so a step costs what the base model's does (dLoRA's dynamic merge,
for one stream at a time; the unmerged road stays for every other step).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lorafleet.kernels.meta import LoRAMeta

#: Segments of at most this many tokens expand every slice in one matmul over the
#: block-diagonal B (n times the expand's multiply-adds, cheaper than n - 1 more calls up
#: to about 32 tokens, measured); longer ones, one matmul per slice on its diagonal block.
BLOCK_DIAGONAL_MAX_TOKENS = 32

#: A short segment expands slice by slice instead of through the block-diagonal B when the
#: block-diagonal's zeros would be at least this many floats (128 KiB): reading them costs
#: about as much as the three or four more calls a split takes (a few us each) near 10 GB/s,
#: the 2-core VM's order of memory bandwidth. gate|up at rank 16 (49,152 zeros on
#: SmolLM2-135M) splits; q|k|v at ranks 8 and 16 (15,360, 30,720) and gate|up at rank 8
#: (24,576) stay block-diagonal.
PER_SLICE_MIN_ZEROS = 32768

#: A step whose short segments on one linear lie on at least this many consecutive slots
#: runs them all as one ``bmm`` pair (``Batched``): torch splits a batched matmul across
#: threads by matrix, each one whole on one thread, where a decode-sized matmul alone is
#: split inside at a loss. Measured on SmolLM2-135M's shapes, 2-core VM, 8 segments of 8
#: tokens on one decoder layer's four linears: 786 us one segment at a time, 333 us
#: batched (5 to 11 tokens each, padded: 873 against 679 us).
BATCHED_MIN_SEGMENTS = 2
#: ... when padding each segment to the longest adds at most this share of rows (padded
#: rows are computed and thrown away: 1, 20, 3, 12, 8, 2, 10 and 8 tokens, 60% padding,
#: gained nothing, measured).
BATCHED_MAX_PADDING = 0.5


@dataclass(frozen=True)
class SlotViews:
    """One slot's weights at live rank r, as views of a ``FusedStacks``: ``a`` [H, r*n] (A^T),
    ``b`` [r*n, N] (block-diagonal), and ``diagonal[i]`` [r, N_i], slice i's block of ``b``;
    ``per_slice``: short segments expand through ``diagonal`` (``PER_SLICE_MIN_ZEROS``)."""

    a: torch.Tensor
    b: torch.Tensor
    diagonal: tuple[torch.Tensor, ...]
    per_slice: bool = False


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
    # (slot, live rank) -> SlotViews; (first slot, slots, rank) -> ``slot_range``. Views of
    # fixed memory: they never go stale.
    _ranges: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, compare=False, repr=False
    )
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

    def slot_range(self, lo: int, num: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots ``lo .. lo + num - 1`` at rank ``rank``: A^T [num, H, rank*n] and the
        block-diagonal B [num, rank*n, N] (views, built once each)."""
        key = (lo, num, rank)
        found = self._ranges.get(key)
        if found is None:
            width = rank * self.num_slices
            found = self._ranges[key] = (
                self.a_t[lo : lo + num, :, :width],
                self.b_t[lo : lo + num, :width],
            )
        return found

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
            zeros = (n - 1) * sum(self.out_sizes) * rank
            found = self._views[key] = SlotViews(
                self.a_t[slot, :, :width], b, diagonal, n > 1 and zeros >= PER_SLICE_MIN_ZEROS
            )
        return found


@dataclass(frozen=True)
class Segment:
    """The tokens of one active slot in a step, and its live ``rank``: ``rows``, a slice of
    contiguous rows (``whole``: every row of the step), or ``index``, int64 row numbers when
    they are scattered; ``short``: few enough tokens for the block-diagonal expand;
    ``piece``: for contiguous rows, their place in the step's ``Pieces``, else -1."""

    slot: int
    rank: int
    rows: slice
    index: torch.Tensor | None
    whole: bool
    short: bool
    piece: int = -1


@dataclass(frozen=True)
class Segments:
    """A step's segments for stacks of one max rank, and ``sizes``: row counts that tile
    the step's T rows in order, each contiguous segment one of them (so one
    ``split_with_sizes`` cuts every segment's rows: a Python slice costs microseconds, eight
    of them several times one split, measured)."""

    items: tuple[Segment, ...]
    sizes: tuple[int, ...]


def segments(meta: LoRAMeta, max_rank: int) -> Segments:
    """The step's segments for stacks of rank ``max_rank``, built once per step (every
    layer shares ``meta``). Slots of live rank 0 add nothing and have none."""
    key = ("segments", max_rank)
    found = meta.cache.get(key)
    if found is None:
        host = meta.host_tables()
        spans = sorted(
            (span, g) for g, span in enumerate(meta.spans) if span is not None and span[1] > span[0]
        )
        sizes: list[int] = []
        piece_of: dict[int, int] = {}
        pos = 0
        for (start, end), g in spans:
            if start > pos:
                sizes.append(start - pos)
            piece_of[g] = len(sizes)
            sizes.append(end - start)
            pos = end
        if pos < meta.num_tokens:
            sizes.append(meta.num_tokens - pos)
        items = []
        for g, (slot, span) in enumerate(zip(host.active, meta.spans, strict=True)):
            rank = meta.rank_of(slot, max_rank)
            if rank == 0:
                continue
            start, end = span if span is not None else (0, 0)
            items.append(
                Segment(
                    slot,
                    rank,
                    slice(start, end),
                    None if span is not None else meta.groups[g][1],
                    span == (0, meta.num_tokens),
                    host.counts[slot] <= BLOCK_DIAGONAL_MAX_TOKENS,
                    piece_of.get(g, -1),
                )
            )
        found = meta.cache[key] = Segments(tuple(items), tuple(sizes))
    return found


@dataclass(frozen=True)
class Batched:
    """A step's short segments on slots ``lo .. lo + num - 1`` (at most one each; a slot
    between two of them with none, or without weights for the linear, gets padding rows
    only), padded to ``length`` rows each for one ``bmm``.

    ``rows``: the slots' segments are the step's rows ``rows``, slot after slot, ``length``
    each (x and out are viewed, not copied; a slot in between without weights for the linear
    is there on its own rows, masked); else ``gather`` [num * length] int64 holds the row of
    each padded position (a padding position repeats a real row).
    ``keep`` [num, length or 1, max rank] (float32): 1.0 on real rows and rank columns
    below the slot's live rank, else 0.0, so padding and stale rank columns add nothing.
    ``rank``: the largest live rank among the slots."""

    lo: int
    num: int
    length: int
    rank: int
    rows: slice | None
    gather: torch.Tensor | None
    keep: torch.Tensor
    # number of slices n -> ``keep`` repeated for rank-interleaved columns [num, L|1, rank*n]
    _by_slices: dict[int, torch.Tensor] = field(default_factory=dict, compare=False, repr=False)

    def keep_for(self, num_slices: int) -> torch.Tensor:
        found = self._by_slices.get(num_slices)
        if found is None:
            found = self._by_slices[num_slices] = self.keep.repeat_interleave(num_slices, dim=2)
        return found


def batched(meta: LoRAMeta, max_rank: int, slot_mask: int, device: torch.device) -> Batched | None:
    """The step's ``Batched`` plan for a linear whose slots with weights are ``slot_mask``,
    or None where it does not apply (fewer than ``BATCHED_MIN_SEGMENTS`` segments, a long
    or scattered one, slots not consecutive, too much padding); built once per step."""
    key = ("batched", max_rank, slot_mask)
    found = meta.cache.get(key, False)
    if found is False:
        found = meta.cache[key] = _plan_batched(meta, max_rank, slot_mask, device)
    return found


def _plan_batched(
    meta: LoRAMeta, max_rank: int, slot_mask: int, device: torch.device
) -> Batched | None:
    every = {seg.slot: seg for seg in segments(meta, max_rank).items}
    mine = {slot: seg for slot, seg in every.items() if slot_mask >> slot & 1}
    if len(mine) < BATCHED_MIN_SEGMENTS or any(
        seg.index is not None or not seg.short for seg in mine.values()
    ):
        return None
    lo = min(mine)
    num = max(mine) - lo + 1
    rank = max(seg.rank for seg in mine.values())
    # A slot between two of the step's with no weights for this linear (its bit clear) or no
    # rows is batched too, on rows whose update is masked to zero: its weights are read.
    rows = _aligned_rows([every.get(slot) for slot in range(lo, lo + num)])
    segs = [mine.get(slot) for slot in range(lo, lo + num)]
    counts = [0 if seg is None else seg.rows.stop - seg.rows.start for seg in segs]
    length = max(counts) if rows is None else (rows.stop - rows.start) // num
    if num * length > (1 + BATCHED_MAX_PADDING) * sum(counts):
        return None
    keep = torch.zeros(num, length if rows is None else 1, rank)
    for j, (seg, count) in enumerate(zip(segs, counts, strict=True)):
        if seg is not None:
            keep[j, : count if rows is None else 1, : seg.rank] = 1.0
    if rows is not None:
        return Batched(lo, num, length, rank, rows, None, keep.to(device))
    # Padding positions repeat a real row (of the slot, or the step's first one for a slot
    # with none): multiplied by zero, they add nothing wherever they land.
    first = min(seg.rows.start for seg in mine.values())
    gather = [
        (first if seg is None else seg.rows.start) + min(i, max(count - 1, 0))
        for seg, count in zip(segs, counts, strict=True)
        for i in range(length)
    ]
    gather_t = torch.tensor(gather, dtype=torch.int64).to(device)
    return Batched(lo, num, length, rank, None, gather_t, keep.to(device))


def _aligned_rows(segs: list[Segment | None]) -> slice | None:
    """The rows of ``segs`` (consecutive slots' segments) when they are one run of rows,
    slot after slot, the same number each; else None."""
    if any(seg is None or seg.index is not None for seg in segs):
        return None
    first = segs[0].rows.start
    length = segs[0].rows.stop - first
    for j, seg in enumerate(segs):
        if seg.rows.start != first + j * length or seg.rows.stop != first + (j + 1) * length:
            return None
    return slice(first, first + len(segs) * length)


def _add_batched(
    x: torch.Tensor, stacks: FusedStacks, plan: Batched, out: torch.Tensor, scale: float
) -> None:
    """float32 ``add_lora_fused`` of a ``Batched`` step: one shrink ``bmm`` over every slot's
    (padded) rows, the padding and stale rank columns zeroed, one expand ``bmm`` (block-
    diagonal B) added into out."""
    size = plan.num
    a, b = stacks.slot_range(plan.lo, size, plan.rank)
    keep = plan.keep_for(stacks.num_slices)
    if plan.rows is not None:
        buf = torch.bmm(x[plan.rows].view(size, plan.length, -1), a).mul_(keep)
        out[plan.rows].view(size, plan.length, -1).baddbmm_(buf, b, alpha=scale)
        return
    rows = x.index_select(0, plan.gather).view(size, plan.length, -1)
    buf = torch.bmm(rows, a).mul_(keep)
    out.index_add_(0, plan.gather, torch.bmm(buf, b).view(size * plan.length, -1), alpha=scale)


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
    weights for this linear: its tokens are skipped); other rows are untouched. Every
    slot's weights must be finite (the ``AdapterManager`` loads finite weights only): a
    ``Batched`` step reads the stacks of the slots between its own and the rank columns
    past a slot's rank, and multiplies what they give by zero.

    x [T, H] and out [T, N] (N = sum of ``stacks.out_sizes``) share the stacks' dtype; rank
    columns past a slot's rank (``meta.slot_ranks_host``) are ignored. float32 runs in
    place with no copies (``addmm_`` into row slices); other dtypes accumulate in float32
    with one cast on write. Returns ``out``.
    """
    exact = out.dtype == torch.float32
    if exact and (plan := batched(meta, stacks.max_rank, slot_mask, x.device)) is not None:
        _add_batched(x, stacks, plan, out, scale)
        return out
    single = stacks.num_slices == 1
    step = segments(meta, stacks.max_rank)
    xs = outs = None
    for seg in step.items:
        if not slot_mask >> seg.slot & 1:
            continue
        views = stacks.views(seg.slot, seg.rank)
        if seg.index is not None or not exact:
            _add_upcast(x, views, seg, out, scale)
            continue
        if seg.whole:
            rows, dest = x, out
        else:
            if xs is None:  # the first segment that needs its rows cuts them all
                xs, outs = x.split_with_sizes(step.sizes), out.split_with_sizes(step.sizes)
            rows, dest = xs[seg.piece], outs[seg.piece]
        buf = torch.mm(rows, views.a)  # [t, r*n], the slices interleaved: slice i is i::n
        if single or not (views.per_slice or not seg.short):
            # Every slice in one matmul over the block-diagonal B (inline: a call costs
            # microseconds on a cold interpreter, and so does a keyword argument to addmm_).
            if scale == 1.0:
                dest.addmm_(buf, views.b)
            else:
                dest.addmm_(buf, views.b, alpha=scale)
        else:
            _expand_per_slice(buf, views, dest, stacks.out_sizes, scale)
    return out


def _expand_per_slice(
    buf: torch.Tensor,
    views: SlotViews,
    dest: torch.Tensor,
    out_sizes: tuple[int, ...],
    scale: float,
) -> None:
    """float32 ``dest[:, slice i] += scale * buf[:, i::n] @ diagonal[i]``: one expand per
    slice on its diagonal block, skipping the block-diagonal's zeros."""
    n = len(views.diagonal)
    parts = buf.view(buf.shape[0], -1, n).unbind(2)  # slice i: columns i::n, one call
    for target, part, block in zip(
        dest.split_with_sizes(out_sizes, 1), parts, views.diagonal, strict=True
    ):
        target.addmm_(part, block, alpha=scale)


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


def single_segment(meta: LoRAMeta, max_rank: int, slot_mask: int) -> Segment | None:
    """The step's one segment among the slots in ``slot_mask`` when it holds every row of
    the step (contiguous, so no index), else None; built once per step and mask."""
    key = ("single", max_rank, slot_mask)
    found = meta.cache.get(key, False)
    if found is False:
        mine = [seg for seg in segments(meta, max_rank).items if slot_mask >> seg.slot & 1]
        found = mine[0] if len(mine) == 1 and mine[0].whole and mine[0].index is None else None
        meta.cache[key] = found
    return found


class HotSlot:
    """A CPU LoRA linear's base weight with one slot's A under it: ``w_ext`` [N + R*n, H]
    (float32) holds W in rows [0, N) and the hot slot's A at live rank r in the next r*n
    rows, interleaved by rank as ``FusedStacks.a_t`` (row ``N + j*n + i`` is row j of slice
    i's A), so ``x @ w_ext[:N + r*n].T`` is the base output and the shrink in one GEMM.

    The linear's weight (and bias, zero-padded in ``b_ext``) become views of this memory,
    so the base path reads it unchanged and costs nothing more; the extra memory is one
    slot's A. The hot slot's rows are copied from the stacks when the slot, its live rank
    or the stacks' contents change (tracked by the stacks' version counter, which every
    in-place write through any of their views bumps): a single stream copies once.

    Per step (``prepare``, on the step's first call) it decides whether the step is one
    segment and readies its views; the calls after it (``forward``) only check that the
    step and the stacks' version are still the ones prepared: a decode step makes 120 such
    calls on a 30-layer model, so each microsecond of Python there is about 0.3% of it.

    ``merge_after`` > 0: once ``merge_after`` prepared steps in a row were one segment on the
    same slot, rank and stacks' versions (A's and B's), ``w_merged`` [N, H] (allocated
    here) becomes ``W + B_s A_s`` and the step is one GEMM against it: the expand, the wider
    GEMM and the split are gone, at the price of one more copy of W and one merge (``r*n``
    multiply-adds per weight) each time the hot slot's contents change. A step on the slot
    ``w_merged`` already holds (unchanged since) runs merged at once. Any other
    step reads W unchanged, so results differ from the unmerged road only by rounding.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        stacks: FusedStacks,
        merge_after: int = 0,
    ) -> None:
        n_out, h = weight.shape
        rows = stacks.max_rank * stacks.num_slices
        self.stacks = stacks
        self.out_features = n_out
        self.w_ext = weight.new_zeros(n_out + rows, h)
        self.w_ext[:n_out].copy_(weight)
        self.b_ext = None
        if bias is not None:
            self.b_ext = bias.new_zeros(n_out + rows)
            self.b_ext[:n_out].copy_(bias)
        self._key: tuple[int, int, int] | None = None
        # live rank -> (weight rows, bias, split sizes), views built once each
        self._shapes: dict[int, tuple] = {}
        # The prepared step: its meta, the stacks' version then, and the plan (or None).
        self.meta: LoRAMeta | None = None
        self.version = -1
        self.plan: tuple | None = None
        # The run of one-segment steps: its (slot, rank, A's and B's versions) and length.
        self.merge_after = merge_after
        self._run: tuple[int, int, int, int] | None = None
        self._run_steps = 0
        # Allocated (and touched) now: the memory shows at start-up, where the engine
        # checked it fits, and a first merge costs no page faults (0.27 s against 0.09 s
        # for SmolLM2-135M's 120 linears on the 2-core VM).
        self.w_merged = weight.clone() if merge_after else None
        # The run whose merge w_merged holds (None: none yet), and the plan reading it.
        self._merged_key: tuple[int, int, int, int] | None = None
        self._merged_plan: tuple | None = None

    def weight(self) -> torch.Tensor:
        """The base weight [N, H]: a view of ``w_ext``."""
        return self.w_ext[: self.out_features]

    def bias(self) -> torch.Tensor | None:
        """The base bias [N] (a view of ``b_ext``), or None."""
        return None if self.b_ext is None else self.b_ext[: self.out_features]

    def prepare(self, meta: LoRAMeta, slot_mask: int) -> tuple | None:
        """Ready ``meta``'s step for a linear whose slots with weights are ``slot_mask``:
        the plan ``forward`` runs when the step's rows all sit on one of them (the slot's A
        copied under W if it is not there yet), else None. Returns the plan."""
        self.meta, self.version = meta, self.stacks.a_t._version
        seg = single_segment(meta, self.stacks.max_rank, slot_mask)
        if seg is None:
            self.plan, self._run = None, None
            return None
        stacks, n_out = self.stacks, self.out_features
        key = (seg.slot, seg.rank, self.version)
        # A merge reads B too: a run ends when either stack is written.
        run = (*key, stacks.b_t._version)
        self._run_steps = self._run_steps + 1 if run == self._run else 1
        self._run = run
        # Waiting pays for a merge not yet made; one already made for this slot is free.
        if self.merge_after and (self._run_steps >= self.merge_after or run == self._merged_key):
            if run != self._merged_key:
                self._merge(run, stacks.views(seg.slot, seg.rank))
            self.plan = self._merged_plan
            return self.plan
        width = seg.rank * stacks.num_slices
        if key != self._key:
            self.w_ext[n_out : n_out + width].copy_(stacks.a_t[seg.slot, :, :width].t())
            self._key = key
        shapes = self._shapes.get(seg.rank)
        if shapes is None:
            bias = None if self.b_ext is None else self.b_ext[: n_out + width]
            shapes = self._shapes[seg.rank] = (self.w_ext[: n_out + width], bias, (n_out, width))
        views = stacks.views(seg.slot, seg.rank)
        per_slice = stacks.num_slices > 1 and (views.per_slice or not seg.short)
        self.plan = (*shapes, views, per_slice)
        return self.plan

    def _merge(self, run: tuple[int, int, int, int], views: SlotViews) -> None:
        """``w_merged`` = W + B A of ``run``'s slot (``views``), and the plan reading it."""
        # The block-diagonal B [r*n, N] and A^T [H, r*n]: B^T A^T^T is every slice's B_i A_i
        # in its own rows.
        torch.addmm(self.weight(), views.b.t(), views.a.t(), out=self.w_merged)
        self._merged_key = run
        self._merged_plan = (self.w_merged, self.bias(), None, None, False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x W^T + b`` plus the prepared slot's update for every row of x [T, H] (float32;
        call ``prepare`` for the step first and only where it gave a plan). Returns [T, N]:
        merged, the GEMM's output; else a view of the GEMM's [T, N + r*n] output (row stride
        N + r*n: contiguous for one token)."""
        weight, bias, sizes, views, per_slice = self.plan
        if sizes is None:
            return F.linear(x, weight, bias)
        y, buf = F.linear(x, weight, bias).split_with_sizes(sizes, 1)
        if per_slice:
            _expand_per_slice(buf, views, y, self.stacks.out_sizes, 1.0)
        else:
            y.addmm_(buf, views.b)
        return y
