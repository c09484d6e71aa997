"""Launchers for the Triton LoRA kernels (imports ``triton``; load through ``dispatch``).

The ``*_triton`` functions always run the Triton kernels: compiled on CUDA tensors,
interpreted on CPU tensors (or anywhere when ``TRITON_INTERPRET=1``). Tests call them
directly to force the kernel path; the engine goes through ``lorafleet.kernels``.

Tile sizes come from ``lorafleet.kernels.tiles`` unless a config is passed; ranks 1 or 8
and hidden sizes like 2049 are handled by masks.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import triton

from lorafleet.kernels import _triton_kernels as _k
from lorafleet.kernels.backend import interpret_requested
from lorafleet.kernels.meta import LoRAMeta
from lorafleet.kernels.reference import default_slice_offsets
from lorafleet.kernels.tiles import (
    ExpandConfig,
    ShrinkConfig,
    default_expand_config,
    default_shrink_config,
    device_sm_count,
    expand_constexprs,
    shrink_constexprs,
)

MAX_SLICES_PER_LAUNCH = 3  # the kernels take up to three base pointers (q/k/v)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------- kernels


@functools.cache
def kernels(interpret: bool) -> tuple[Any, Any]:
    """(shrink, expand) kernels wrapped for the interpreter or for compilation."""
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction as wrap
    else:
        from triton.runtime.jit import JITFunction as wrap
    return wrap(_k.lora_shrink_kernel), wrap(_k.lora_expand_kernel)


def _run_interpreted(device: torch.device) -> bool:
    # CPU tensors can only run interpreted; CUDA tensors compile unless asked otherwise.
    return device.type != "cuda" or interpret_requested()


def _check_meta(meta: LoRAMeta, num_tokens: int, num_slots: int, device: torch.device) -> None:
    if meta.num_tokens != num_tokens:
        raise ValueError(f"meta covers {meta.num_tokens} tokens, tensors have {num_tokens}")
    if num_slots < meta.num_slots:
        raise ValueError(f"meta has {meta.num_slots} slots, weight stacks only {num_slots}")
    if meta.sorted_token_ids.device != device:
        raise ValueError(
            f"LoRAMeta lives on {meta.sorted_token_ids.device} but the tensors on {device}: "
            "build it from token_slots on the compute device"
        )


def _meta_args(meta: LoRAMeta) -> tuple[torch.Tensor, ...]:
    ranks = meta.slot_ranks if meta.slot_ranks is not None else meta.seg_counts
    return meta.sorted_token_ids, meta.seg_slots, meta.seg_starts, meta.seg_counts, ranks


def _chunks(n: int) -> list[range]:
    return [range(i, min(i + MAX_SLICES_PER_LAUNCH, n)) for i in range(0, n, MAX_SLICES_PER_LAUNCH)]


def _pad3(items: list[Any]) -> list[Any]:
    # Unused slice arguments repeat slice 0 (never read: the grid has len(items) slices).
    return items + [items[0]] * (MAX_SLICES_PER_LAUNCH - len(items))


def _as_stacks(stacks: Sequence[torch.Tensor] | torch.Tensor, name: str) -> list[torch.Tensor]:
    stacks = list(stacks.unbind(0)) if isinstance(stacks, torch.Tensor) else list(stacks)
    if not stacks:
        raise ValueError(f"{name} needs at least one slice")
    for t in stacks:
        if t.dim() != 3 or t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name}: expected 3-D fp16/bf16/fp32 stacks, got {t.shape} {t.dtype}")
    return stacks


# --------------------------------------------------------------------------- launch plans


@dataclass(frozen=True)
class _Launch:
    """One kernel launch of a plan: the slices it covers, its grid, its non-tensor
    arguments (in kernel order, after the meta pointers) and its compile-time arguments."""

    part: range
    grid: tuple[int, int, int]
    scalars: tuple
    consts: dict[str, Any]


@dataclass(frozen=True)
class _Plan:
    """Everything about a launch that depends on shapes, strides and the step's meta, not
    on the data: built on a layer's first call and reused by every layer of the step with
    the same shapes (the per-call host cost is what an eager engine pays per op)."""

    launches: tuple[_Launch, ...]
    contiguous: bool  # the slices' strides differ: launch on contiguous copies
    num_partials: int = 1  # a partials shrink's output buffers (its split-K)


def _layout(t: torch.Tensor) -> tuple:
    return (t.device, t.dtype, tuple(t.shape), t.stride())


def _needs_ranks(meta: LoRAMeta, max_rank: int) -> bool:
    """Whether any active slot's rank is below the stack's: only then do the kernels read
    per-slot ranks (the engine always passes them; uniform-rank steps skip the lookup).
    A static meta's ranks change between replays: always read them."""
    if meta.static:
        return True
    ranks = meta.slot_ranks_host
    return ranks is not None and any(ranks[s] < max_rank for s in meta.host.active)


def _cached_plan(meta: LoRAMeta, key: tuple, build) -> _Plan:
    plan = meta.cache.get(key)
    if plan is None:
        plan = meta.cache[key] = build()
    return plan


def _launch(
    plan: _Plan,
    inp: torch.Tensor,
    stacks: list[torch.Tensor],
    meta: LoRAMeta,
    out: torch.Tensor,
    interpret: bool,
    op: Literal["shrink", "expand"],
) -> None:
    """Run every launch of a shrink plan (``inp`` the input [T, H], ``out`` fp32 [n, T, R]
    or [k, n, T, R] partials) or of an expand plan (``inp`` that buffer, ``out`` the
    output). A launch covers slices ``part`` of the weight stacks and of the buffer (the
    shrink's output, the expand's input): which side is sliced is all that differs."""
    expand = op == "expand"
    kernel = kernels(interpret)[1 if expand else 0]
    if plan.contiguous:
        stacks = [t.contiguous() for t in stacks]
    meta_args = _meta_args(meta)
    for launch in plan.launches:
        part = launch.part
        weights = _pad3([stacks[i] for i in part])
        if expand:
            operands = (inp[..., part.start : part.stop, :, :], *weights, out)
        else:
            operands = (inp, *weights, out[..., part.start : part.stop, :, :])
        kernel[launch.grid](*operands, *meta_args, *launch.scalars, **launch.consts)


# --------------------------------------------------------------------------- shrink


def _shrink_plan(
    x: torch.Tensor,
    stacks: list[torch.Tensor],
    meta: LoRAMeta,
    scale: float,
    config: ShrinkConfig | None,
    interpret: bool,
    partials: bool = False,
) -> _Plan:
    if x.dim() != 2 or x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be 2-D fp16/bf16/fp32, got {tuple(x.shape)} {x.dtype}")
    num_tokens, hidden = x.shape
    num_slots, max_rank, a_hidden = stacks[0].shape
    if any(a.shape != stacks[0].shape or a.dtype != stacks[0].dtype for a in stacks):
        raise ValueError("all lora_as slices must share shape and dtype")
    if a_hidden != hidden:
        raise ValueError(f"x has H={hidden} but lora_a has H={a_hidden}")
    _check_meta(meta, num_tokens, num_slots, x.device)
    contiguous = len({t.stride() for t in stacks}) > 1
    if meta.num_lora_tokens == 0 or max_rank == 0 or hidden == 0:
        return _Plan((), contiguous)
    cfg = config or default_shrink_config(
        max_segment_tokens=meta.max_segment_tokens,
        num_segments=meta.num_segments,
        num_slices=min(len(stacks), MAX_SLICES_PER_LAUNCH),
        hidden=hidden,
        rank=max_rank,
        elem_size=x.element_size(),
        sm_count=0 if interpret else device_sm_count(x.device),
        interpret=interpret,
        partials=partials,
    )
    m_tiles = triton.cdiv(meta.max_segment_tokens, cfg.block_m)
    r_tiles = triton.cdiv(max_rank, cfg.block_r)
    consts = shrink_constexprs(
        cfg,
        x.dtype,
        stacks[0].dtype,
        has_ranks=_needs_ranks(meta, max_rank),
        interpret=interpret,
        partials=partials,
    )
    a_strides = stacks[0].contiguous().stride() if contiguous else stacks[0].stride()
    out_strides = (num_tokens * max_rank, max_rank, 1)  # the fp32 [n, T, R] result
    partial_stride = len(stacks) * num_tokens * max_rank if partials else 0
    scalars = (
        hidden,
        max_rank,
        float(scale),
        *x.stride(),
        *a_strides,
        *out_strides,
        partial_stride,
    )
    launches = tuple(
        _Launch(
            part, (m_tiles * r_tiles * cfg.split_k, len(part), meta.num_segments), scalars, consts
        )
        for part in _chunks(len(stacks))
    )
    return _Plan(launches, contiguous, cfg.split_k if partials else 1)


def lora_shrink_slices_triton(
    x: torch.Tensor,
    lora_as: Sequence[torch.Tensor] | torch.Tensor,
    meta: LoRAMeta,
    scale: float = 1.0,
    *,
    config: ShrinkConfig | None = None,
) -> torch.Tensor:
    """``out[i, t] = scale * x[t] @ lora_as[i][slot[t]].T`` with the Triton kernel.

    x [T, H] fp16/bf16/fp32 (any strides; unit stride along H is fastest); ``lora_as`` is a
    list of n same-shaped [S, R, H] stacks (or one [n, S, R, H] tensor). Returns fp32
    [n, T, R]; rows with slot -1 and rank columns past a slot's rank are zero.
    """
    stacks = _as_stacks(lora_as, "lora_as")
    interpret = _run_interpreted(x.device)
    key = ("triton_shrink", _layout(x), *map(_layout, stacks), scale, config, interpret)
    plan = _cached_plan(meta, key, lambda: _shrink_plan(x, stacks, meta, scale, config, interpret))
    max_rank = stacks[0].shape[1]
    out = torch.zeros(len(stacks), x.shape[0], max_rank, dtype=torch.float32, device=x.device)
    _launch(plan, x, stacks, meta, out, interpret, "shrink")
    return out


def lora_shrink_triton(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    meta: LoRAMeta,
    scale: float = 1.0,
    *,
    config: ShrinkConfig | None = None,
) -> torch.Tensor:
    """Single-slice shrink: x [T, H], lora_a [S, R, H] -> fp32 [T, R] (see the slices form)."""
    return lora_shrink_slices_triton(x, [lora_a], meta, scale, config=config)[0]


# --------------------------------------------------------------------------- expand


def _expand_plan(
    buf: torch.Tensor,
    stacks: list[torch.Tensor],
    meta: LoRAMeta,
    out: torch.Tensor,
    offsets: list[int],
    add: bool,
    config: ExpandConfig | None,
    interpret: bool,
) -> _Plan:
    num_slots, _, max_rank = stacks[0].shape
    if any(
        b.shape[0] != num_slots or b.shape[2] != max_rank or b.dtype != stacks[0].dtype
        for b in stacks
    ):
        raise ValueError("all lora_bs slices must share S, R and dtype")
    if len(offsets) != len(stacks):
        raise ValueError(f"{len(stacks)} slices but {len(offsets)} slice_offsets")
    if out.dim() != 2 or out.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"out must be 2-D fp16/bf16/fp32, got {tuple(out.shape)} {out.dtype}")
    num_tokens = out.shape[0]
    # [n, T, R], or [k, n, T, R]: k partial sums of a split-K shrink, summed on load.
    num_partials = buf.shape[0] if buf.dim() == 4 else 1
    if buf.shape[-3:] != (len(stacks), num_tokens, max_rank) or buf.dim() not in (3, 4):
        raise ValueError(
            f"buf must be [{len(stacks)}, {num_tokens}, {max_rank}] (or k partial sums of "
            f"that), got {tuple(buf.shape)}"
        )
    for b, col in zip(stacks, offsets, strict=True):
        if col < 0 or col + b.shape[1] > out.shape[1]:
            raise ValueError(
                f"slice at column {col} of width {b.shape[1]} overflows out [.., {out.shape[1]}]"
            )
    _check_meta(meta, num_tokens, num_slots, out.device)
    contiguous = len({t.stride()[1:3] for t in stacks}) > 1
    if meta.num_lora_tokens == 0:
        return _Plan((), contiguous)
    if contiguous:
        stacks = [t.contiguous() for t in stacks]
    launches = []
    for part in _chunks(len(stacks)):
        chunk = [stacks[i] for i in part]
        max_cols = max(b.shape[1] for b in chunk)
        cfg = config or default_expand_config(
            max_segment_tokens=meta.max_segment_tokens,
            max_cols=max_cols,
            rank=max_rank,
            elem_size=out.element_size(),
            interpret=interpret,
        )
        n_tiles = triton.cdiv(max_cols, cfg.block_n)
        grid = (
            triton.cdiv(meta.max_segment_tokens, cfg.block_m) * n_tiles,
            len(part),
            meta.num_segments,
        )
        src_strides = buf.stride()[-3:]
        scalars = (
            max_rank,
            n_tiles,
            *_pad3([b.shape[1] for b in chunk]),
            *_pad3([offsets[i] for i in part]),
            *_pad3([b.stride(0) for b in chunk]),
            *chunk[0].stride()[1:],
            *src_strides,
            buf.stride(0) if num_partials > 1 else 0,
            *out.stride(),
        )
        consts = expand_constexprs(
            cfg,
            buf.dtype,
            chunk[0].dtype,
            has_ranks=_needs_ranks(meta, max_rank),
            add=add,
            interpret=interpret,
            num_partials=num_partials,
        )
        launches.append(_Launch(part, grid, scalars, consts))
    return _Plan(tuple(launches), contiguous)


def lora_expand_slices_triton(
    buf: torch.Tensor,
    lora_bs: Sequence[torch.Tensor] | torch.Tensor,
    meta: LoRAMeta,
    out: torch.Tensor,
    slice_offsets: Sequence[int] | None = None,
    add: bool = True,
    *,
    config: ExpandConfig | None = None,
) -> torch.Tensor:
    """``out[t, off_i:off_i+N_i] (+)= buf[i, t] @ lora_bs[i][slot[t]].T`` with the Triton kernel.

    buf [n, T, R] (fp32 as the shrink returns it, or the weights' dtype; or [k, n, T, R],
    k partial sums added on load); ``lora_bs[i]`` [S, N_i, R], same dtype and R; out [T, N_total] fp16/bf16/fp32, written in place.
    Slices may differ in width (q/k/v); offsets default to back to back. Rows with slot -1
    and columns outside every slice are untouched. Returns ``out``.
    """
    stacks = _as_stacks(lora_bs, "lora_bs")
    offsets = default_slice_offsets(stacks) if slice_offsets is None else list(slice_offsets)
    interpret = _run_interpreted(out.device)
    key = (
        "triton_expand",
        _layout(buf),
        *map(_layout, stacks),
        _layout(out),
        tuple(offsets),
        add,
        config,
        interpret,
    )
    plan = _cached_plan(
        meta, key, lambda: _expand_plan(buf, stacks, meta, out, offsets, add, config, interpret)
    )
    _launch(plan, buf, stacks, meta, out, interpret, "expand")
    return out


def lora_expand_triton(
    buf: torch.Tensor,
    lora_b: torch.Tensor,
    meta: LoRAMeta,
    out: torch.Tensor,
    add: bool = True,
    *,
    config: ExpandConfig | None = None,
) -> torch.Tensor:
    """Single-slice expand: buf [T, R], lora_b [S, N, R], out [T, N] (see the slices form)."""
    if lora_b.dim() != 3 or out.dim() != 2 or lora_b.shape[1] != out.shape[1]:
        raise ValueError(
            f"lora_b [S, N, R] and out [T, N] disagree: {tuple(lora_b.shape)}, {tuple(out.shape)}"
        )
    return lora_expand_slices_triton(buf.unsqueeze(0), [lora_b], meta, out, [0], add, config=config)


# --------------------------------------------------------------------------- shrink + expand


def add_lora_slices_triton(
    x: torch.Tensor,
    lora_as: Sequence[torch.Tensor] | torch.Tensor,
    lora_bs: Sequence[torch.Tensor] | torch.Tensor,
    meta: LoRAMeta,
    out: torch.Tensor,
    slice_offsets: Sequence[int] | None = None,
    scale: float = 1.0,
    *,
    shrink_config: ShrinkConfig | None = None,
    expand_config: ExpandConfig | None = None,
) -> torch.Tensor:
    """``out[t, off_i:off_i+N_i] += scale * x[t] @ A_i[slot].T @ B_i[slot].T``: a LoRA
    linear's whole update, shrink then expand, with the Triton kernels.

    Shapes as ``lora_shrink_slices_triton`` and ``lora_expand_slices_triton``. The rank
    buffer between them is private, so it is neither zeroed nor summed atomically: each
    K split of the shrink stores its partial sum and the expand adds the partials as it
    loads them. One kernel (the memset) fewer per call than the two ops, and split-K
    becomes deterministic. Rows with slot -1 are untouched. Returns ``out``.
    """
    a_stacks = _as_stacks(lora_as, "lora_as")
    b_stacks = _as_stacks(lora_bs, "lora_bs")
    offsets = default_slice_offsets(b_stacks) if slice_offsets is None else list(slice_offsets)
    if len(a_stacks) != len(b_stacks):
        raise ValueError(f"{len(a_stacks)} lora_as slices but {len(b_stacks)} lora_bs slices")
    interpret = _run_interpreted(x.device)
    shrink_key = ("triton_add_shrink", _layout(x), *map(_layout, a_stacks), scale, shrink_config)
    shrink = _cached_plan(
        meta,
        (*shrink_key, interpret),
        lambda: _shrink_plan(x, a_stacks, meta, scale, shrink_config, interpret, partials=True),
    )
    max_rank = a_stacks[0].shape[1]
    if b_stacks[0].shape[2] != max_rank:
        raise ValueError(f"lora_as have rank {max_rank}, lora_bs {b_stacks[0].shape[2]}")
    shape = (shrink.num_partials, len(a_stacks), x.shape[0], max_rank)
    buf = torch.empty(shape, dtype=torch.float32, device=x.device)
    expand_key = (
        "triton_add_expand",
        _layout(buf),
        *map(_layout, b_stacks),
        _layout(out),
        tuple(offsets),
        expand_config,
        interpret,
    )
    expand = _cached_plan(
        meta,
        expand_key,
        lambda: _expand_plan(buf, b_stacks, meta, out, offsets, True, expand_config, interpret),
    )
    _launch(shrink, x, a_stacks, meta, buf, interpret, "shrink")
    _launch(expand, buf, b_stacks, meta, out, interpret, "expand")
    return out
