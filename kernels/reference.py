"""Torch reference for the LoRA ops: the CPU path and the ground truth for the kernels.

One matmul per active slot over that slot's token group (no gather of per-token weights),
accumulating in float32. Per-slot ranks (``meta.slot_ranks_host``) are honoured the same
way the Triton kernels honour them: rank columns past a slot's rank are ignored, so the
two paths agree even when a slot's padding is not zero.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lorafleet.kernels.meta import LoRAMeta


def lora_shrink_ref(
    x: torch.Tensor, lora_a: torch.Tensor, meta: LoRAMeta, scale: float = 1.0
) -> torch.Tensor:
    """``buf[t] = scale * x[t] @ lora_a[slot[t]].T``; x [T, H], lora_a [S, R, H] -> [T, R] fp32.

    Rows whose slot is -1, and rank columns past a slot's rank, are zero.
    """
    num_tokens, max_rank = x.shape[0], lora_a.shape[1]
    buf = torch.zeros(num_tokens, max_rank, dtype=torch.float32, device=x.device)
    for g, (slot, idx) in enumerate(meta.groups):
        rank = meta.rank_of(slot, max_rank)
        span = meta.span_of(g)
        rows = x[span[0] : span[1]] if span else x.index_select(0, idx)
        part = rows.float() @ lora_a[slot, :rank].float().T
        if scale != 1.0:
            part = part * scale
        if span:
            buf[span[0] : span[1], :rank] = part
        else:
            buf[idx, :rank] = part
    return buf


def lora_expand_ref(
    buf: torch.Tensor,
    lora_b: torch.Tensor,
    meta: LoRAMeta,
    out: torch.Tensor,
    add: bool = True,
) -> torch.Tensor:
    """``out[t] (+)= buf[t] @ lora_b[slot[t]].T`` for rows with a slot; others untouched.

    buf [T, R], lora_b [S, N, R], out [T, N] (any float dtype; accumulation in fp32, one
    cast on write). ``add=False`` overwrites the adapter rows instead. Returns ``out``.
    """
    max_rank = lora_b.shape[2]
    for g, (slot, idx) in enumerate(meta.groups):
        rank = meta.rank_of(slot, max_rank)
        span = meta.span_of(g)
        rows = buf[span[0] : span[1]] if span else buf.index_select(0, idx)
        weight = lora_b[slot, :, :rank].float().T
        if span and add and out.dtype == torch.float32:
            out[span[0] : span[1]].addmm_(rows[:, :rank].float(), weight)
            continue
        part = rows[:, :rank].float() @ weight
        if span:
            dest = out[span[0] : span[1]]
            dest.copy_(dest.float() + part if add else part)  # copy_ casts to out.dtype
            continue
        if add:
            part = out.index_select(0, idx).float() + part
        out.index_copy_(0, idx, part.to(out.dtype))
    return out


def default_slice_offsets(lora_bs: Sequence[torch.Tensor]) -> list[int]:
    """Column offsets of back-to-back slices: ``[0, N_0, N_0 + N_1, ...]`` (one per slice)."""
    offsets, col = [], 0
    for b in lora_bs:
        offsets.append(col)
        col += b.shape[1]
    return offsets


def lora_shrink_slices_ref(
    x: torch.Tensor, lora_as: Sequence[torch.Tensor], meta: LoRAMeta, scale: float = 1.0
) -> torch.Tensor:
    """Shrink against several A stacks at once (fused q/k/v or gate/up projections).

    x [T, H], each ``lora_as[i]`` [S, R, H] (same shape) -> fp32 [n_slices, T, R].
    """
    return torch.stack([lora_shrink_ref(x, a, meta, scale) for a in lora_as])


def lora_expand_slices_ref(
    buf: torch.Tensor,
    lora_bs: Sequence[torch.Tensor],
    meta: LoRAMeta,
    out: torch.Tensor,
    slice_offsets: Sequence[int] | None = None,
    add: bool = True,
) -> torch.Tensor:
    """Expand each slice into its own column range of a fused output.

    buf [n_slices, T, R]; ``lora_bs[i]`` [S, N_i, R]; out [T, N_total]. Slice i writes
    ``out[:, slice_offsets[i] : slice_offsets[i] + N_i]`` (offsets default to back to back).
    Rows whose slot is -1, and columns outside every slice, are untouched. Returns ``out``.
    """
    offsets = default_slice_offsets(lora_bs) if slice_offsets is None else list(slice_offsets)
    for i, (b, col) in enumerate(zip(lora_bs, offsets, strict=True)):
        lora_expand_ref(buf[i], b, meta, out[:, col : col + b.shape[1]], add=add)
    return out
