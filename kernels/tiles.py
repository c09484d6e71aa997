"""Tile sizes and compile-time arguments of the Triton LoRA kernels (imports ``triton``).

Every tile dimension is a power of two and at least ``MIN_TILE`` (16), the smallest
``tl.dot`` shape a GPU compile accepts. The heuristics pick tiles from a launch's shape;
the ``*_constexprs`` functions turn a config into the kernel's compile-time arguments.
Kept apart from the launchers so the ahead-of-time compile check and the benchmarks use the
same choices without launching anything.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from typing import Any

import torch
import triton

MIN_TILE = 16


@dataclass(frozen=True, kw_only=True)
class _Launch:
    """What a kernel's launch takes besides its tiles (keyword-only), and the tiles' rule:
    every ``block_*`` field is a power of two >= ``MIN_TILE``."""

    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.startswith("block_") and (value < MIN_TILE or value & (value - 1)):
                raise ValueError(f"{f.name} must be a power of two >= {MIN_TILE}, got {value}")


@dataclass(frozen=True)
class ShrinkConfig(_Launch):
    """Tiles of the shrink kernel: tokens x rank x hidden, and the hidden-dim split."""

    block_m: int
    block_r: int
    block_k: int
    split_k: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.split_k < 1:
            raise ValueError(f"split_k must be >= 1, got {self.split_k}")


@dataclass(frozen=True)
class ExpandConfig(_Launch):
    """Tiles of the expand kernel: tokens x output columns x rank."""

    block_m: int
    block_n: int
    block_r: int


def _pow2_clamp(n: int, lo: int, hi: int) -> int:
    """Smallest power of two >= n, clamped to [lo, hi]."""
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def _prev_pow2(n: int) -> int:
    """Largest power of two <= n (1 for n < 1)."""
    return 1 << (max(n, 1).bit_length() - 1)


@functools.cache
def _sm_count_of(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device())


def default_shrink_config(
    *,
    max_segment_tokens: int,
    num_segments: int,
    num_slices: int,
    hidden: int,
    rank: int,
    elem_size: int,
    sm_count: int,
    interpret: bool,
    partials: bool = False,
) -> ShrinkConfig:
    """Heuristic shrink tiles.

    Interpreted: as few, as large programs as possible (each tile op costs milliseconds).
    Compiled: about 8K elements of activation plus weight tile per K step (4K for fp32),
    which ahead-of-time compiles for sm_80/sm_90 show to be spill-free, 8 warps once the
    token tile is 64 wide; and a hidden-dim split so that decode batches (one small token
    tile per segment) still put about two programs on each of ``sm_count`` SMs: decode
    shrink is a stream over the adapters' A rows and needs that parallelism. The split is
    off under ``torch.use_deterministic_algorithms(True)`` (its atomics add in any order),
    unless the K splits store ``partials`` that a later kernel adds in a fixed order.
    """
    if interpret:
        return ShrinkConfig(
            block_m=_pow2_clamp(max_segment_tokens, MIN_TILE, 128),
            block_r=_pow2_clamp(rank, MIN_TILE, 128),
            block_k=_pow2_clamp(hidden, MIN_TILE, 4096),
        )
    block_m = _pow2_clamp(max_segment_tokens, MIN_TILE, 64)
    block_r = _pow2_clamp(rank, MIN_TILE, 128)
    elements = 8192 if elem_size <= 2 else 4096
    block_k = min(_prev_pow2(elements // (block_m + block_r)), 256, triton.next_power_of_2(hidden))
    block_k = max(block_k, 32)
    programs = (
        triton.cdiv(max_segment_tokens, block_m)
        * triton.cdiv(rank, block_r)
        * num_slices
        * num_segments
    )
    # A power of two: SPLIT_K is compiled in, and decode batches vary their active-adapter
    # count every step; any integer would compile a new variant mid-serving (about a second).
    split_k = _prev_pow2(min(triton.cdiv(hidden, block_k), 64, triton.cdiv(2 * sm_count, programs)))
    if torch.are_deterministic_algorithms_enabled() and not partials:
        split_k = 1  # split-K partial sums meet in fp32 atomics, in no fixed order
    num_warps = 8 if block_m >= 64 or block_m * block_r >= 4096 else 4
    return ShrinkConfig(block_m, block_r, block_k, split_k, num_warps=num_warps)


def default_expand_config(
    *, max_segment_tokens: int, max_cols: int, rank: int, elem_size: int, interpret: bool
) -> ExpandConfig:
    """Heuristic expand tiles.

    Interpreted: as few, as large programs as possible. Compiled: [block_m x 128] output
    tiles (the output read-modify-write dominates the traffic), rank tiles of at most 32
    (16 for fp32 outputs: the weights sit upcast to fp32 in registers for the dot) and 8
    warps for the larger output tiles, which keeps the sm_80/sm_90 compiles (nearly)
    spill-free.
    """
    if interpret:
        return ExpandConfig(
            block_m=_pow2_clamp(max_segment_tokens, MIN_TILE, 128),
            block_n=_pow2_clamp(max_cols, MIN_TILE, 4096),
            block_r=_pow2_clamp(rank, MIN_TILE, 128),
        )
    block_m = _pow2_clamp(max_segment_tokens, MIN_TILE, 64)
    block_n = _pow2_clamp(max_cols, MIN_TILE, 128)
    num_warps = 8 if block_m * block_n >= 4096 else 4
    block_r = _pow2_clamp(rank, MIN_TILE, 32 if elem_size <= 2 else 16)
    return ExpandConfig(block_m, block_n, block_r, num_warps=num_warps)


def _dot_mode(lhs: torch.dtype, rhs: torch.dtype, interpret: bool) -> tuple[bool, str]:
    """(upcast operands to fp32, tl.dot input precision) for operand dtypes lhs, rhs.

    Same 16-bit dtype on both sides: native tensor-core dot, fp32 accumulation. Anything
    involving fp32 weights: exact fp32 ("ieee"), so fp32 stays within 1e-4. A fp32
    activation against 16-bit weights: tf32, exact for the 16-bit side. The interpreter
    always upcasts: its bf16 dot is wrong.
    """
    if interpret:
        return True, "ieee"
    if lhs == rhs != torch.float32:
        return False, "tf32"  # precision is ignored for 16-bit operands
    if rhs == torch.float32:
        return True, "ieee"
    return True, "tf32"


def _constexprs(
    cfg: ShrinkConfig | ExpandConfig,
    lhs: torch.dtype,
    rhs: torch.dtype,
    interpret: bool,
    flags: dict[str, Any],
) -> dict[str, Any]:
    """A launch's compile-time arguments: the kernel's own ``flags``, its tiles (the kernels
    name the config's ``block_<dim>`` fields ``BLOCK_<DIM>``), the dot mode of its operand
    dtypes ``lhs``, ``rhs``, and the config's launch options."""
    upcast, precision = _dot_mode(lhs, rhs, interpret)
    tiles = {
        f.name.upper(): getattr(cfg, f.name) for f in fields(cfg) if f.name.startswith("block_")
    }
    return {
        **flags,
        **tiles,
        "UPCAST": upcast,
        "PRECISION": precision,
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
    }


def shrink_constexprs(
    cfg: ShrinkConfig,
    x_dtype: torch.dtype,
    a_dtype: torch.dtype,
    *,
    has_ranks: bool,
    interpret: bool,
    partials: bool = False,
) -> dict[str, Any]:
    """Compile-time arguments (and launch options) of one shrink launch; ``partials``: each
    K split stores its own partial sum (for ``add_lora_slices``) instead of adding atomically."""
    flags = {"HAS_RANKS": has_ranks, "SPLIT_K": cfg.split_k, "PARTIALS": partials}
    return _constexprs(cfg, x_dtype, a_dtype, interpret, flags)


def expand_constexprs(
    cfg: ExpandConfig,
    buf_dtype: torch.dtype,
    b_dtype: torch.dtype,
    *,
    has_ranks: bool,
    add: bool,
    interpret: bool,
    num_partials: int = 1,
) -> dict[str, Any]:
    """Compile-time arguments (and launch options) of one expand launch; ``num_partials``
    buffers are summed on load (a partials shrink's split-K sums)."""
    flags = {"HAS_RANKS": has_ranks, "ADD": add, "NUM_PARTIALS": num_partials}
    return _constexprs(cfg, buf_dtype, b_dtype, interpret, flags)
