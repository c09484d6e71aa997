"""Torch reference for the LoRA ops: the CPU path and the ground truth for the kernels.

Three shapes of the same math, accumulating in float32, picked per call by ``_plan``:
  - ``dense``: few active adapters, few tokens: one matmul of every token against every
    active slot's weights (all slices at once), each token keeping its own slot's part. The
    wasted FLOPs cost less than one small matmul per adapter.
  - ``gather``: many active adapters, decode-sized batches: gather each token's weights
    ([T, r, H] per slice) and run one batched matmul, exact FLOPs, one op per slice
    however many adapters are active.
  - ``grouped``: one matmul per active slot over that slot's token run (a slice when the
    engine laid tokens out grouped by slot); for prefill-sized batches, where gathered
    weights would not fit in cache, and for a single adapter.
Per-slot ranks (``meta.slot_ranks_host``) are honoured the same way the Triton kernels
honour them: rank columns past a slot's rank are ignored, so every path agrees even when a
slot's padding is not zero.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lorafleet.kernels.meta import LoRAMeta

#: ``dense`` only with this many active slots at most, and T * A * (weights of a slot)
#: summed over slices at most ``DENSE_LIMIT`` multiply-adds.
DENSE_MAX_ACTIVE = 12
DENSE_LIMIT = 1 << 24
#: ``grouped`` once the active slots average this many tokens (prefill): each matmul is
#: then large enough that one per slot beats gathering weights per token.
GROUPED_MIN_TOKENS_PER_SLOT = 32
#: ``gather`` only while one slice's gathered weights, T * r * H, are at most this many
#: elements (16 MiB in fp32).
GATHER_LIMIT = 1 << 22


def _plan(meta: LoRAMeta, weights: torch.Tensor, num_slices: int = 1) -> str:
    """``dense``, ``gather`` or ``grouped`` for a call on slot stack ``weights`` [S, ...].

    Thresholds measured on CPU (one thread) for decode and prefill batches of 32-512 tokens,
    hidden 64-256, rank 8, 1-64 active adapters: ``dense`` is fastest up to about a dozen
    adapters, ``gather`` beyond that for decode (2-2.5x ``dense`` at 64 adapters, 5-9x
    ``grouped``), ``grouped`` for one adapter or many tokens per adapter.
    """
    active = meta.num_active
    if active == 1:
        return "grouped"  # one exact matmul per slice already
    per_slice = meta.num_tokens * weights[0].numel()
    if active <= DENSE_MAX_ACTIVE and per_slice * active * num_slices <= DENSE_LIMIT:
        return "dense"
    if meta.num_lora_tokens >= GROUPED_MIN_TOKENS_PER_SLOT * active:
        return "grouped"
    if per_slice <= GATHER_LIMIT:
        return "gather"
    return "grouped"


def _active(meta: LoRAMeta, stack: torch.Tensor) -> torch.Tensor:
    """The active slots' rows of a slot stack [S, ...] -> [A, ...] (a view when all are)."""
    if meta.num_active == stack.shape[0]:
        return stack
    return stack.index_select(0, meta.active_slots.to(torch.int64))


def _token_group(meta: LoRAMeta) -> torch.Tensor:
    """[T] position of each token's slot among the active slots (0 for -1 rows)."""
    if "token_group" not in meta.cache:
        position = torch.zeros(meta.num_slots, dtype=torch.int64, device=meta.token_slots.device)
        position[meta.active_slots.to(torch.int64)] = torch.arange(
            meta.num_active, device=position.device
        )
        meta.cache["token_group"] = position.index_select(0, meta.token_slots.clamp(min=0))
    return meta.cache["token_group"]


def _active_rank(meta: LoRAMeta, max_rank: int) -> int:
    """The largest live rank among the active slots: columns past it are zero everywhere."""
    return max(meta.rank_of(slot, max_rank) for slot, _ in meta.groups)


def _shrink_dense(
    x: torch.Tensor, lora_as: Sequence[torch.Tensor], meta: LoRAMeta, scale: float
) -> torch.Tensor:
    """All slices against all active slots in one matmul; each token keeps its slot's part.
    -> fp32 [n, T, R]."""
    n, max_rank, slots = len(lora_as), lora_as[0].shape[1], meta.num_active
    num_tokens, rank = x.shape[0], _active_rank(meta, max_rank)
    live = [_active(meta, a)[:, :rank] for a in lora_as]
    stacked = torch.stack(live, dim=1) if n > 1 else live[0]  # [A, n, r, H]
    every = x.float() @ stacked.reshape(slots * n * rank, -1).float().T  # [T, A*n*r]
    mine = every.view(num_tokens, slots, n * rank).gather(1, _group_index(meta, n * rank))
    mine = mine.view(num_tokens, n, rank) * _row_scale(meta, rank, scale)
    buf = x.new_zeros(n, num_tokens, max_rank, dtype=torch.float32)
    buf[:, :, :rank] = mine.transpose(0, 1)
    return buf


def _expand_dense(
    buf: torch.Tensor,
    lora_bs: Sequence[torch.Tensor],
    meta: LoRAMeta,
    out: torch.Tensor,
    offsets: Sequence[int],
    add: bool,
) -> torch.Tensor:
    """Every token's rank vectors placed in its slot's block of a [T, A*n*r] row, times a
    block weight [A*n*r, N] whose slice i rows feed slice i's columns: one matmul."""
    n, num_tokens = len(lora_bs), out.shape[0]
    slots, rank = meta.num_active, _active_rank(meta, lora_bs[0].shape[2])
    rows = buf[..., :rank].float().transpose(0, 1) * _row_scale(meta, rank, 1.0)  # [T, n, r]
    wide = rows.new_zeros(num_tokens, slots, n * rank)
    wide.scatter_(1, _group_index(meta, n * rank), rows.reshape(num_tokens, 1, n * rank))
    weight = out.new_zeros(slots, n * rank, out.shape[1], dtype=torch.float32)
    for i, (b, col) in enumerate(zip(lora_bs, offsets, strict=True)):
        weight[:, i * rank : (i + 1) * rank, col : col + b.shape[1]] = (
            _active(meta, b)[:, :, :rank].float().transpose(1, 2)
        )
    wide, weight = wide.view(num_tokens, -1), weight.view(slots * n * rank, -1)
    if add and out.dtype == torch.float32:  # -1 rows and other columns add exact zeros
        return out.addmm_(wide, weight)
    part = wide @ weight
    for b, col in zip(lora_bs, offsets, strict=True):
        _write(out[:, col : col + b.shape[1]], part[:, col : col + b.shape[1]], meta, add)
    return out


def _token_slots(meta: LoRAMeta) -> torch.Tensor:
    """[T] each token's slot, 0 for -1 rows (masked by ``_row_scale``), for gathers."""
    if "token_slots" not in meta.cache:
        meta.cache["token_slots"] = meta.token_slots.clamp(min=0)
    return meta.cache["token_slots"]


def _shrink_gather(
    x: torch.Tensor, lora_as: Sequence[torch.Tensor], meta: LoRAMeta, scale: float
) -> torch.Tensor:
    """Each token against its own slot's A, gathered: one bmm per slice. -> fp32 [n, T, R]."""
    max_rank = lora_as[0].shape[1]
    rank = _active_rank(meta, max_rank)
    slots, cols = _token_slots(meta), x.float().unsqueeze(2)  # [T, H, 1]
    row_scale = _row_scale_2d(meta, rank, scale)
    buf = x.new_zeros(len(lora_as), x.shape[0], max_rank, dtype=torch.float32)
    for i, a in enumerate(lora_as):
        mine = torch.bmm(a[:, :rank].index_select(0, slots).float(), cols).squeeze(2)
        buf[i, :, :rank] = mine * row_scale
    return buf


def _expand_gather(
    buf: torch.Tensor,
    lora_bs: Sequence[torch.Tensor],
    meta: LoRAMeta,
    out: torch.Tensor,
    offsets: Sequence[int],
    add: bool,
) -> torch.Tensor:
    """Each token's rank vector times its own slot's B, gathered: one bmm per slice."""
    rank = _active_rank(meta, lora_bs[0].shape[2])
    slots, row_scale = _token_slots(meta), _row_scale_2d(meta, rank, 1.0)
    for i, (b, col) in enumerate(zip(lora_bs, offsets, strict=True)):
        rows = buf[i, :, :rank].float() * row_scale
        weight = b[:, :, :rank].index_select(0, slots).float()  # [T, N_i, r]
        part = torch.bmm(weight, rows.unsqueeze(2)).squeeze(2)
        _write(out[:, col : col + b.shape[1]], part, meta, add)
    return out


def _write(dest: torch.Tensor, part: torch.Tensor, meta: LoRAMeta, add: bool) -> None:
    """``dest (+)= part`` on adapter rows, -1 rows untouched; ``part`` is fp32 and zero on
    -1 rows, one cast on write."""
    if add and dest.dtype == torch.float32:
        dest.add_(part)  # -1 rows add exact zeros
        return
    new = dest.float() + part if add else part
    if meta.num_lora_tokens < meta.num_tokens:
        new = torch.where((meta.token_slots >= 0)[:, None], new, dest.float())
    dest.copy_(new)


def _group_index(meta: LoRAMeta, width: int) -> torch.Tensor:
    """[T, 1, width] ``_token_group`` expanded for gather/scatter over active slots."""
    return _token_group(meta).view(-1, 1, 1).expand(-1, 1, width)


def _row_scale(meta: LoRAMeta, rank: int, scale: float) -> torch.Tensor | float:
    """Per token and rank column: ``scale`` where the column is live for the token's slot,
    0 past the slot's rank and on -1 rows. A plain float when nothing is masked. Cached on
    the step's metadata, which every layer shares."""
    key = ("row_scale", rank, scale)
    if key not in meta.cache:
        mask = _rank_mask(meta, rank)
        if meta.num_lora_tokens < meta.num_tokens:
            rows = (meta.token_slots >= 0)[:, None]
            mask = rows if mask is None else mask & rows
        meta.cache[key] = scale if mask is None else mask[:, None, :].float() * scale
    return meta.cache[key]


def _row_scale_2d(meta: LoRAMeta, rank: int, scale: float) -> torch.Tensor | float:
    """``_row_scale`` as [T, rank] (or a float), for per-slice [T, rank] rows."""
    row_scale = _row_scale(meta, rank, scale)
    return row_scale if isinstance(row_scale, float) else row_scale[:, 0]


def _rank_mask(meta: LoRAMeta, rank: int) -> torch.Tensor | None:
    """[T, rank] mask of each token's slot's live rank columns; None when all are live."""
    ranks = meta.slot_ranks_host
    if ranks is None or min(meta.rank_of(s, rank) for s, _ in meta.groups) >= rank:
        return None
    per_token = meta.slot_ranks.to(torch.int64).index_select(0, meta.token_slots.clamp(min=0))
    return torch.arange(rank, device=per_token.device)[None, :] < per_token[:, None]


_SHRINK = {"dense": _shrink_dense, "gather": _shrink_gather}
_EXPAND = {"dense": _expand_dense, "gather": _expand_gather}


def lora_shrink_ref(
    x: torch.Tensor, lora_a: torch.Tensor, meta: LoRAMeta, scale: float = 1.0
) -> torch.Tensor:
    """``buf[t] = scale * x[t] @ lora_a[slot[t]].T``; x [T, H], lora_a [S, R, H] -> [T, R] fp32.

    Rows whose slot is -1, and rank columns past a slot's rank, are zero.
    """
    num_tokens, max_rank = x.shape[0], lora_a.shape[1]
    plan = _plan(meta, lora_a)
    if plan != "grouped":
        return _SHRINK[plan](x, [lora_a], meta, scale)[0]
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
    plan = _plan(meta, lora_b)
    if plan != "grouped":
        return _EXPAND[plan](buf.unsqueeze(0), [lora_b], meta, out, [0], add)
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
    plan = _plan(meta, lora_as[0], len(lora_as))
    if plan != "grouped":
        return _SHRINK[plan](x, lora_as, meta, scale)
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
    plan = _plan(meta, lora_bs[0], len(lora_bs))
    if plan != "grouped":
        return _EXPAND[plan](buf, lora_bs, meta, out, offsets, add)
    for i, (b, col) in enumerate(zip(lora_bs, offsets, strict=True)):
        lora_expand_ref(buf[i], b, meta, out[:, col : col + b.shape[1]], add=add)
    return out
