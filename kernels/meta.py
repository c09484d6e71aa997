"""Per-step LoRA batch metadata, built once per step and shared by every layer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


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
    ``slot_ranks_host`` is the same per-slot rank as a host tuple (for the torch path).
    Host ints (``num_active``, ``max_slot_tokens``, ``num_lora_tokens``, ``active_mask``)
    size kernel grids and skip untouched layers without a device sync per layer.
    ``groups`` holds (slot, token index tensor) pairs for the torch reference path.
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
    max_slot_tokens: int
    groups: tuple[tuple[int, torch.Tensor], ...]
    slot_ranks_host: tuple[int, ...] | None = None
    active_mask: int = 0  # bit s set for each active slot s (host-side set test per layer)
    spans: tuple[tuple[int, int] | None, ...] = ()
    # Derived tensors the torch path reuses across layers (built lazily, per step).
    cache: dict = field(default_factory=dict, compare=False, repr=False)

    def span_of(self, group: int) -> tuple[int, int] | None:
        """(start, end) if group ``group``'s tokens are one contiguous run of rows, else None.

        The engine lays tokens out grouped by slot, so the torch path can use slices."""
        return self.spans[group] if self.spans else None

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
        if isinstance(token_slots, torch.Tensor):
            if token_slots.dim() != 1:
                raise ValueError(f"token_slots must be 1-D, got shape {tuple(token_slots.shape)}")
            device = token_slots.device if device is None else device
            slots_host = token_slots.to("cpu", torch.int64)
        else:
            slots_host = torch.tensor(list(token_slots), dtype=torch.int64)
        device = torch.device("cpu" if device is None else device)
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        if slots_host.numel():
            lo, hi = int(slots_host.min()), int(slots_host.max())
            if lo < -1 or hi >= num_slots:
                raise ValueError(
                    f"token_slots values must be in [-1, {num_slots}), got [{lo}, {hi}]"
                )
        ranks_host = None
        if slot_ranks is not None:
            ranks_host = tuple(int(r) for r in torch.as_tensor(slot_ranks).tolist())
            if len(ranks_host) != num_slots:
                raise ValueError(f"slot_ranks must have shape ({num_slots},)")
            if min(ranks_host) < 0:
                raise ValueError(f"slot_ranks must be >= 0, got {ranks_host}")
        # Sort key puts -1 tokens last while keeping slot order for the rest.
        key = torch.where(slots_host < 0, num_slots, slots_host)
        sorted_ids = torch.sort(key, stable=True).indices
        counts = torch.bincount(key, minlength=num_slots + 1)[:num_slots]
        starts = torch.cumsum(counts, 0) - counts
        active = torch.nonzero(counts, as_tuple=False).flatten()
        # One host buffer, one copy: int64 [slots | sorted ids], then int32 [counts | starts |
        # active | ranks], as raw bytes; the device tensors are views into the copy.
        wide = [slots_host, sorted_ids]
        narrow = [counts, starts, active]
        if ranks_host is not None:
            narrow.append(torch.tensor(ranks_host))
        wide_bytes = torch.cat(wide).view(torch.uint8)
        packed = torch.cat([wide_bytes, torch.cat(narrow).to(torch.int32).view(torch.uint8)])
        packed = packed.to(device)
        wide_dev = packed[: wide_bytes.numel()].view(torch.int64).split([t.numel() for t in wide])
        narrow_dev = (
            packed[wide_bytes.numel() :].view(torch.int32).split([t.numel() for t in narrow])
        )
        slots, sorted_token_ids = wide_dev
        counts_host, starts_host, active_host = counts.tolist(), starts.tolist(), active.tolist()
        groups = tuple(
            (s, sorted_token_ids[starts_host[s] : starts_host[s] + counts_host[s]])
            for s in active_host
        )
        return cls(
            token_slots=slots,
            num_slots=num_slots,
            sorted_token_ids=sorted_token_ids,
            slot_counts=narrow_dev[0],
            slot_starts=narrow_dev[1],
            active_slots=narrow_dev[2],
            slot_ranks=narrow_dev[3] if ranks_host is not None else None,
            num_tokens=int(slots_host.numel()),
            num_active=len(active_host),
            num_lora_tokens=int(sum(counts_host)),
            max_slot_tokens=max(counts_host, default=0),
            groups=groups,
            slot_ranks_host=ranks_host,
            active_mask=sum(1 << s for s in active_host),
            spans=_contiguous_spans(slots_host.tolist(), active_host, counts_host),
        )


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
