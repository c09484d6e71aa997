"""Launcher for the paged decode attention kernel (imports ``triton``; load through
``lorafleet.kernels.attention``). CUDA tensors compile; CPU tensors run interpreted."""

from __future__ import annotations

import functools
from typing import Any

import torch
import triton

from lorafleet.kernels import _triton_attention as _k
from lorafleet.kernels.backend import interpret_requested

MIN_TILE = 16  # the smallest tl.dot shape a GPU compile accepts


@functools.cache
def kernel(interpret: bool) -> Any:
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction as wrap
    else:
        from triton.runtime.jit import JITFunction as wrap
    return wrap(_k.paged_decode_attention_kernel)


def attention_constexprs(
    dtype: torch.dtype, group: int, head_dim: int, block_size: int, interpret: bool
) -> dict[str, Any]:
    """Compile-time arguments and launch options of one launch.

    Compiled: 64 keys per step with 4 warps (K and V tiles of 64 x D, 8 KB each in 16 bit
    for D = 64), native 16-bit dots; fp32 caches dot exactly ("ieee"). Interpreted: 128 keys
    per step (fewer, larger tile ops) and fp32 dots (the interpreter's bf16 dot is wrong).
    """
    upcast = interpret or dtype == torch.float32
    return dict(
        BLOCK_SIZE=block_size,
        GROUP_PAD=max(MIN_TILE, triton.next_power_of_2(group)),
        BLOCK_D=max(MIN_TILE, triton.next_power_of_2(head_dim)),
        BLOCK_N=128 if interpret else 64,
        UPCAST=upcast,
        PRECISION="ieee" if upcast else "tf32",
        num_warps=4,
        num_stages=2,
    )


def paged_decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    window: int | None = None,
) -> torch.Tensor:
    """``paged_decode_attention`` with the Triton kernel (same contract)."""
    num_seqs, heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    if heads % kv_heads or k_cache.shape != v_cache.shape or k_cache.shape[2] != head_dim:
        raise ValueError(
            f"q {tuple(q.shape)} and caches {tuple(k_cache.shape)} / {tuple(v_cache.shape)} "
            "disagree (need [B, Hq, D] and [rows, Hkv, D] with Hq a multiple of Hkv)"
        )
    if any(t.stride(-1) != 1 for t in (q, k_cache, v_cache)) or block_tables.stride(-1) != 1:
        raise ValueError("q, the caches and block_tables need unit stride on their last axis")
    if block_tables.shape[0] != num_seqs or context_lens.shape != (num_seqs,):
        raise ValueError(
            f"{num_seqs} queries but block_tables {tuple(block_tables.shape)} and "
            f"context_lens {tuple(context_lens.shape)}"
        )
    out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    interpret = q.device.type != "cuda" or interpret_requested()
    consts = attention_constexprs(k_cache.dtype, heads // kv_heads, head_dim, block_size, interpret)
    kernel(interpret)[(num_seqs, kv_heads)](
        q,
        k_cache,
        v_cache,
        out,
        block_tables,
        context_lens,
        head_dim**-0.5,
        window or 0,
        heads // kv_heads,
        head_dim,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        **consts,
    )
    return out
