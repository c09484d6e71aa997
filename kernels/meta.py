"""Per-step LoRA batch metadata, built once per step and shared by every layer."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from lorafleet.kernels.transfer import copy_to_device, int_tensor, to_device

#: Tokens per segment of a static meta: one 16-row kernel tile (the smallest a GPU dot
#: takes), so a captured decode grid is one tile per segment.
STATIC_SEGMENT_TOKENS = 16


@dataclass(frozen=True)
class HostTables:
    """A step's slot tables as host lists: token slots [T], counts and starts [S], active
    slots [A]."""

    slots: list[int]
    counts: list[int]
    starts: list[int]
    active: list[int]


@dataclass(frozen=True)
class LoRAMeta:
    """How the T tokens of one step map to adapter slots.

    Tensors live on the device of ``token_slots``:
      - ``token_slots``      int64 [T]  slot of each token, -1 = no adapter
      - ``sorted_token_ids`` int64 [T]  token indices grouped by slot (ascending slot, stable);
                                        the ``num_lora_tokens`` adapter tokens come first
      - ``slot_counts``      int32 [S]  tokens per slot
      - ``slot_starts``      int32 [S]  offset of each slot's group in ``sorted_token_ids``
      - ``active_slots``     int32 [A]  slots with at least one token, ascending
      - ``slot_ranks``       int32 [S]  effective rank per slot: rank columns past it are
                                        neither read nor computed (S-LoRA style, so a rank-8
                                        adapter in a rank-64 stack costs rank-8 work); ``None``
                                        means every slot uses the full R
      - ``seg_slots``, ``seg_starts``, ``seg_counts``  int32 [G]: the kernels' work list,
        runs of ``sorted_token_ids`` sharing one slot (slot, offset, length). One segment per
        active slot here; a static meta cuts them to ``STATIC_SEGMENT_TOKENS``.
    ``slot_ranks_host`` is the same per-slot rank as a host tuple (for the torch path).
    Host ints (``num_segments``, ``max_segment_tokens``, ``num_lora_tokens``, ``active_mask``)
    size kernel grids and skip untouched layers without a device sync per layer.
    ``groups`` and ``spans`` (built on first use) serve the torch reference path.

    A *static* meta (``for_capture``) has fixed-size tensors for CUDA-graph capture: it is
    rewritten in place (``write``) before each replay and its host ints are capacity bounds,
    so one grid covers any step: G is the most segments T tokens over S slots can need,
    unused segments have length 0 (their programs exit at once), ``active_slots`` is padded
    with -1, and the kernels always read per-slot ranks. Its host-side groups are unknown:
    ``concrete()`` reads them back from the device for the torch path.
    """

    token_slots: torch.Tensor
    num_slots: int
    sorted_token_ids: torch.Tensor
    slot_counts: torch.Tensor
    slot_starts: torch.Tensor
    active_slots: torch.Tensor
    slot_ranks: torch.Tensor | None
    num_tokens: int
    num_active: int
    num_lora_tokens: int
    seg_slots: torch.Tensor
    seg_starts: torch.Tensor
    seg_counts: torch.Tensor
    num_segments: int
    max_segment_tokens: int
    slot_ranks_host: tuple[int, ...] | None = None
    active_mask: int = 0  # bit s set for each active slot s (host-side set test per layer)
    static: bool = False
    # Host copies of the slot tables (None for a static meta), for ``groups`` and ``spans``.
    host: HostTables | None = field(default=None, compare=False, repr=False)
    # Derived tensors the torch path reuses across layers (built lazily, per step).
    cache: dict = field(default_factory=dict, compare=False, repr=False)

    @functools.cached_property
    def groups(self) -> tuple[tuple[int, torch.Tensor], ...]:
        """(slot, token index tensor) per active slot, for the torch path; built on first
        use, so the Triton path on CUDA never pays for it."""
        h = self.host_tables()
        ids = self.sorted_token_ids
        return tuple((s, ids[h.starts[s] : h.starts[s] + h.counts[s]]) for s in h.active)

    @functools.cached_property
    def spans(self) -> tuple[tuple[int, int] | None, ...]:
        """Per active slot, its (start, end) row range when its tokens are contiguous."""
        h = self.host_tables()
        return _contiguous_spans(h.slots, h.active, h.counts)

    def host_tables(self) -> HostTables:
        """The step's slot tables on the host (a static meta has none: ``concrete()`` first)."""
        if self.host is None:
            raise ValueError("a static meta has no host tables: use meta.concrete()")
        return self.host

    def span_of(self, group: int) -> tuple[int, int] | None:
        """(start, end) if group ``group``'s tokens are one contiguous run of rows, else None.

        The engine lays tokens out grouped by slot, so the torch path can use slices."""
        return self.spans[group]

    def rank_of(self, slot: int, max_rank: int) -> int:
        """Effective rank of ``slot`` in a stack of rank ``max_rank`` (host side, no sync)."""
        if self.slot_ranks_host is None:
            return max_rank
        return min(self.slot_ranks_host[slot], max_rank)

    @classmethod
    def from_token_slots(
        cls,
        token_slots: torch.Tensor | Sequence[int],
        num_slots: int,
        slot_ranks: torch.Tensor | Sequence[int] | None = None,
        device: torch.device | str | None = None,
    ) -> LoRAMeta:
        """Build the metadata. ``token_slots`` values must be in [-1, num_slots).

        ``token_slots`` is an int tensor or a host sequence; the metadata lives on ``device``
        (default: the tensor's device, or the CPU for a sequence). The bookkeeping runs on
        the host and every int tensor reaches the device in one copy: on CUDA that is one
        transfer per step instead of a dozen small kernels and syncs. Pass the engine's
        host-side lists where it has them (no device round trip at all).
        ``slot_ranks`` (int tensor or sequence, [num_slots]) is each slot's true adapter rank;
        pass it when slots hold adapters of different ranks in one padded stack.
        """
        if isinstance(token_slots, torch.Tensor) and device is None:
            device = token_slots.device
        device = torch.device("cpu" if device is None else device)
        slots_host = _host_slots(token_slots, num_slots)
        ranks_host = None if slot_ranks is None else _host_ranks(slot_ranks, num_slots)
        counts, starts, active, sorted_ids = _slot_tables(slots_host, num_slots)
        # One host buffer, one copy: int64 [slots | sorted ids], then int32 [counts | starts |
        # active | ranks], as raw bytes; the device tensors are views into the copy.
        wide = [slots_host, sorted_ids]
        narrow = [counts, starts, active, [counts[s] for s in active], [starts[s] for s in active]]
        if ranks_host is not None:
            narrow.append(list(ranks_host))
        wide_dev, narrow_dev = _unpack(to_device(_pack(wide, narrow), device), wide, narrow)
        slots, sorted_token_ids = wide_dev
        return cls(
            token_slots=slots,
            num_slots=num_slots,
            sorted_token_ids=sorted_token_ids,
            slot_counts=narrow_dev[0],
            slot_starts=narrow_dev[1],
            active_slots=narrow_dev[2],
            slot_ranks=narrow_dev[5] if ranks_host is not None else None,
            num_tokens=len(slots_host),
            num_active=len(active),
            num_lora_tokens=sum(counts),
            seg_slots=narrow_dev[2],
            seg_starts=narrow_dev[4],
            seg_counts=narrow_dev[3],
            num_segments=len(active),
            max_segment_tokens=max(counts, default=0),
            slot_ranks_host=ranks_host,
            active_mask=sum(1 << s for s in active),
            host=HostTables(slots_host, counts, starts, active),
        )

    @classmethod
    def for_capture(cls, num_tokens: int, num_slots: int, device: torch.device | str) -> LoRAMeta:
        """A static meta for ``num_tokens`` tokens over ``num_slots`` slots (see the class
        docstring), every token on no adapter until ``write`` says otherwise."""
        if num_tokens < 1 or num_slots < 1:
            raise ValueError(f"need num_tokens, num_slots >= 1; got {num_tokens}, {num_slots}")
        wide, narrow = _static_tables([-1] * num_tokens, [0] * num_slots)
        packed = _pack(wide, narrow).to(device)
        (slots, sorted_ids), narrow_dev = _unpack(packed, wide, narrow)
        counts, starts, active, ranks, seg_slots, seg_starts, seg_counts = narrow_dev
        meta = cls(
            token_slots=slots,
            num_slots=num_slots,
            sorted_token_ids=sorted_ids,
            slot_counts=counts,
            slot_starts=starts,
            active_slots=active,
            slot_ranks=ranks,
            num_tokens=num_tokens,
            num_active=active.numel(),
            num_lora_tokens=num_tokens,
            seg_slots=seg_slots,
            seg_starts=seg_starts,
            seg_counts=seg_counts,
            num_segments=seg_slots.numel(),
            max_segment_tokens=min(num_tokens, STATIC_SEGMENT_TOKENS),
            active_mask=(1 << num_slots) - 1,
            static=True,
        )
        meta.cache["packed"] = packed
        return meta

    def write(self, token_slots: Sequence[int], slot_ranks: Sequence[int]) -> None:
        """Rewrite a static meta in place for a step: ``token_slots`` [num_tokens] (host ints,
        -1 = no adapter), ``slot_ranks`` [num_slots]. One host-to-device copy."""
        if not self.static:
            raise ValueError("write() rewrites a static meta (LoRAMeta.for_capture) only")
        if len(token_slots) != self.num_tokens:
            raise ValueError(f"token_slots has {len(token_slots)} entries, meta {self.num_tokens}")
        slots = [int(s) for s in token_slots]  # plain Python: this runs every replayed step
        if slots and (min(slots) < -1 or max(slots) >= self.num_slots):
            raise ValueError(
                f"token_slots values must be in [-1, {self.num_slots}), "
                f"got [{min(slots)}, {max(slots)}]"
            )
        ranks = [int(r) for r in slot_ranks]
        if len(ranks) != self.num_slots or min(ranks) < 0:
            raise ValueError(f"slot_ranks must be {self.num_slots} ranks >= 0, got {ranks}")
        wide, narrow = _static_tables(slots, ranks)
        packed = self.cache["packed"]
        copy_to_device(packed, _pack(wide, narrow))

    def concrete(self) -> LoRAMeta:
        """This meta with its host-side groups: itself, or for a static meta a new one read
        back from the device (a sync; the torch path runs on the CPU anyway)."""
        if not self.static:
            return self
        ranks = self.slot_ranks.tolist()
        return LoRAMeta.from_token_slots(self.token_slots, self.num_slots, ranks)


def _host_slots(token_slots: torch.Tensor | Sequence[int], num_slots: int) -> list[int]:
    """Validated host list of a step's token slots."""
    if isinstance(token_slots, torch.Tensor):
        if token_slots.dim() != 1:
            raise ValueError(f"token_slots must be 1-D, got shape {tuple(token_slots.shape)}")
        slots = token_slots.tolist()
    else:
        slots = [int(s) for s in token_slots]
    if num_slots < 1:
        raise ValueError(f"num_slots must be >= 1, got {num_slots}")
    if slots and (min(slots) < -1 or max(slots) >= num_slots):
        raise ValueError(
            f"token_slots values must be in [-1, {num_slots}), got [{min(slots)}, {max(slots)}]"
        )
    return slots


def _host_ranks(slot_ranks: torch.Tensor | Sequence[int], num_slots: int) -> tuple[int, ...]:
    values = slot_ranks.tolist() if isinstance(slot_ranks, torch.Tensor) else slot_ranks
    ranks = tuple(int(r) for r in values)
    if len(ranks) != num_slots:
        raise ValueError(f"slot_ranks must have shape ({num_slots},)")
    if min(ranks) < 0:
        raise ValueError(f"slot_ranks must be >= 0, got {ranks}")
    return ranks


def _slot_tables(
    slots: list[int], num_slots: int
) -> tuple[list[int], list[int], list[int], list[int]]:
    """(counts [S], starts [S], active slots [A], token ids grouped by slot [T]) of host
    slots, -1 tokens last. Plain Python: it runs every step, and for a step's tokens the
    small torch ops it replaced cost more (``from_token_slots`` took 160 us for 1 or 64
    tokens with them, 60-70 us now, on a 2-core x86 VM)."""
    groups: list[list[int]] = [[] for _ in range(num_slots + 1)]
    for i, s in enumerate(slots):
        groups[s if s >= 0 else num_slots].append(i)
    counts = [len(g) for g in groups[:num_slots]]
    starts, total = [], 0
    for c in counts:
        starts.append(total)
        total += c
    active = [s for s in range(num_slots) if counts[s]]
    sorted_ids = [i for g in groups for i in g]
    return counts, starts, active, sorted_ids


def static_segment_capacity(num_tokens: int, num_slots: int) -> int:
    """The most segments of ``STATIC_SEGMENT_TOKENS`` that T tokens over at most
    min(T, S) active slots need: sum of ceil(count / 16) <= (T + 15 * min(T, S)) / 16."""
    active = min(num_tokens, num_slots)
    return (num_tokens + (STATIC_SEGMENT_TOKENS - 1) * active) // STATIC_SEGMENT_TOKENS


def _static_tables(
    slots: list[int], ranks: Sequence[int]
) -> tuple[list[list[int]], list[list[int]]]:
    """A static meta's host tables at capacity size: [slots, sorted ids] and [counts,
    starts, active (padded with -1), ranks, segment slots, starts, counts (padded with
    empty segments)]. Plain Python: it runs on every replayed step, and small torch ops
    cost microseconds each."""
    num_slots, num_tokens = len(ranks), len(slots)
    counts, starts, active, sorted_ids = _slot_tables(slots, num_slots)
    capacity = static_segment_capacity(num_tokens, num_slots)
    seg_slots, seg_starts, seg_counts = [], [], []
    for s in active:
        for offset in range(0, counts[s], STATIC_SEGMENT_TOKENS):
            seg_slots.append(s)
            seg_starts.append(starts[s] + offset)
            seg_counts.append(min(STATIC_SEGMENT_TOKENS, counts[s] - offset))
    empty = capacity - len(seg_slots)
    narrow = [
        counts,
        starts,
        active + [-1] * (min(num_tokens, num_slots) - len(active)),
        list(ranks),
        seg_slots + [0] * empty,
        seg_starts + [0] * empty,
        seg_counts + [0] * empty,
    ]
    return [slots, sorted_ids], narrow


def _pack(wide: list, narrow: list) -> torch.Tensor:
    """int64 ``wide`` then int32 ``narrow`` (tensors or int lists), as one uint8 host buffer."""
    wide_bytes = _flat(wide, torch.int64).view(torch.uint8)
    return torch.cat([wide_bytes, _flat(narrow, torch.int32).view(torch.uint8)])


def _flat(parts: list, dtype: torch.dtype) -> torch.Tensor:
    if all(isinstance(t, list) for t in parts):
        return int_tensor([v for t in parts for v in t], dtype)
    return torch.cat([torch.as_tensor(t) for t in parts]).to(dtype)


def _sizes(parts: list) -> list[int]:
    return [t.numel() if isinstance(t, torch.Tensor) else len(t) for t in parts]


def _unpack(
    packed: torch.Tensor, wide: list, narrow: list
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Views of ``packed`` (from ``_pack``) shaped like ``wide`` (int64) and ``narrow`` (int32)."""
    split = sum(_sizes(wide)) * 8
    wide_dev = packed[:split].view(torch.int64).split(_sizes(wide))
    narrow_dev = packed[split:].view(torch.int32).split(_sizes(narrow))
    return wide_dev, narrow_dev


def _contiguous_spans(
    slots: list[int], active: list[int], counts: list[int]
) -> tuple[tuple[int, int] | None, ...]:
    """Per active slot, its (start, end) row range when its tokens are contiguous."""
    first: dict[int, int] = {}
    for i, s in enumerate(slots):
        first.setdefault(s, i)
    spans = []
    for s in active:
        start, end = first[s], first[s] + counts[s]
        contiguous = all(v == s for v in slots[start:end])
        spans.append((start, end) if contiguous else None)
    return tuple(spans)
