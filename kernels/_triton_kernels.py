"""Triton kernel bodies for segmented (SGMV-style) LoRA shrink and expand.

The functions here are deliberately *not* decorated with ``@triton.jit``: the decorator
decides between compiled and interpreted execution from ``TRITON_INTERPRET`` once, at import
time, while lorafleet decides per call. ``triton_ops`` wraps them in a ``JITFunction`` or an
``InterpretedFunction`` on demand. For the same reason the kernels call no jitted helper,
ours or triton's own (``tl.cdiv``, ``tl.zeros`` are jitted in ``triton.language.standard``
and were wrapped in whichever flavour was current when triton was imported); they use
builtins only (``tl.full``, integer arithmetic).

Layout shared by both kernels (see ``LoRAMeta``): tokens are grouped by adapter slot in
``sorted_ids``, and the work list is a list of segments, runs of that order sharing one
slot: segment ``g`` is slot ``seg_slots[g]``'s tokens
``sorted_ids[seg_starts[g] : seg_starts[g] + seg_counts[g]]``. The grid is (token tile x
output tile [x K split], slice, segment): one program multiplies one tile of one segment's
tokens by its slot's weights, so a batch mixing 64 adapters is one launch and no Python
loop. Programs past their segment's length or their slot's rank exit at once (a captured
CUDA graph's grid covers the most segments a step can have; the unused ones are empty).

Up to three slices (fused q/k/v, gate/up) share one launch; their base pointers arrive as
separate arguments and are picked by ``program_id(1)`` (no device pointer table to build or
cache per call).
"""

import triton.language as tl


def lora_shrink_kernel(
    x_ptr,
    a0_ptr,
    a1_ptr,
    a2_ptr,
    out_ptr,
    sorted_ids_ptr,
    seg_slots_ptr,
    seg_starts_ptr,
    seg_counts_ptr,
    slot_ranks_ptr,
    hidden,
    max_rank,
    scale,
    stride_xt,
    stride_xh,
    stride_as,
    stride_ar,
    stride_ah,
    stride_os,
    stride_ot,
    stride_or,
    stride_ok,
    HAS_RANKS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    PARTIALS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """out[slice, t, r] (+)= scale * sum_h x[t, h] * A_slice[slot(t), r, h].

    x [T, H] fp16/bf16/fp32; A [S, R, H] per slice. Two forms of the fp32 output:
      - ``PARTIALS`` off: out [n_slices, T, R], zeroed by the caller (split-K programs
        accumulate with atomics, and skipped rank tiles stay zero);
      - ``PARTIALS`` on: out [SPLIT_K, n_slices, T, R] (``stride_ok`` apart), each K split
        storing its partial sum, unzeroed: rows off the segments and columns past a slot's
        rank are left as they were, for an expand that sums the partials and reads neither.
    Grid: (m_tiles * r_tiles * SPLIT_K, n_slices, num_segments).
    """
    pid = tl.program_id(0)
    slice_id = tl.program_id(1)
    seg = tl.program_id(2)
    num_r_tiles = (max_rank + BLOCK_R - 1) // BLOCK_R
    pid_k = pid % SPLIT_K
    pid_r = (pid // SPLIT_K) % num_r_tiles
    pid_m = pid // (SPLIT_K * num_r_tiles)

    count = tl.load(seg_counts_ptr + seg)
    if pid_m * BLOCK_M >= count:
        return
    slot = tl.load(seg_slots_ptr + seg).to(tl.int64)
    rank = max_rank
    if HAS_RANKS:
        rank = tl.minimum(tl.load(slot_ranks_ptr + slot), max_rank)
    # S-LoRA: rank tiles past this adapter's rank cost nothing (output already zero).
    if pid_r * BLOCK_R >= rank:
        return

    a_ptr = a0_ptr
    if slice_id == 1:
        a_ptr = a1_ptr
    if slice_id == 2:
        a_ptr = a2_ptr

    start = tl.load(seg_starts_ptr + seg)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < count
    tok = tl.load(sorted_ids_ptr + start + offs_m, mask=m_mask, other=0)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    # Masked rows past the rank are never fetched: a rank-8 adapter reads 8 rows of A.
    r_mask = offs_r < rank
    offs_k = tl.arange(0, BLOCK_K)

    x_rows = x_ptr + tok[:, None] * stride_xt
    a_cols = a_ptr + slot * stride_as + offs_r[None, :] * stride_ar
    acc = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
    for k0 in range(pid_k * BLOCK_K, hidden, SPLIT_K * BLOCK_K):
        kk = k0 + offs_k
        k_mask = kk < hidden
        xt = tl.load(
            x_rows + kk[None, :] * stride_xh, mask=m_mask[:, None] & k_mask[None, :], other=0.0
        )
        at = tl.load(
            a_cols + kk[:, None] * stride_ah, mask=k_mask[:, None] & r_mask[None, :], other=0.0
        )
        if UPCAST:
            # The interpreter's bf16 dot is wrong, and mixed dtypes need a common one.
            xt = xt.to(tl.float32)
            at = at.to(tl.float32)
        acc = tl.dot(xt, at, acc, input_precision=PRECISION)
    acc = acc * scale

    out_tile = (
        out_ptr + slice_id * stride_os + tok[:, None] * stride_ot + offs_r[None, :] * stride_or
    )
    mask = m_mask[:, None] & r_mask[None, :]
    if PARTIALS:
        tl.store(out_tile + pid_k * stride_ok, acc, mask=mask)
    elif SPLIT_K == 1:
        tl.store(out_tile, acc, mask=mask)
    else:
        tl.atomic_add(out_tile, acc, mask=mask, sem="relaxed")


def lora_expand_kernel(
    buf_ptr,
    b0_ptr,
    b1_ptr,
    b2_ptr,
    out_ptr,
    sorted_ids_ptr,
    seg_slots_ptr,
    seg_starts_ptr,
    seg_counts_ptr,
    slot_ranks_ptr,
    max_rank,
    num_n_tiles,
    n0,
    n1,
    n2,
    col0,
    col1,
    col2,
    stride_bs0,
    stride_bs1,
    stride_bs2,
    stride_bn,
    stride_br,
    stride_ws,
    stride_wt,
    stride_wr,
    stride_wk,
    stride_ot,
    stride_on,
    HAS_RANKS: tl.constexpr,
    ADD: tl.constexpr,
    NUM_PARTIALS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """out[t, col_i + n] (+)= sum_r buf[i, t, r] * B_i[slot(t), n, r] for each slice i.

    buf [n_slices, T, R] (fp32 from the shrink, or the weights' dtype), or with
    ``NUM_PARTIALS`` > 1 that many such buffers ``stride_wk`` apart, summed on load (the
    shrink's split-K partials); B_i [S, N_i, R];
    out [T, N_total] any float dtype, fp32 accumulation, one cast on write. Only rows of
    adapter tokens are touched. Grid: (m_tiles * num_n_tiles, n_slices, num_segments).
    """
    pid = tl.program_id(0)
    slice_id = tl.program_id(1)
    seg = tl.program_id(2)
    pid_n = pid % num_n_tiles
    pid_m = pid // num_n_tiles

    count = tl.load(seg_counts_ptr + seg)
    if pid_m * BLOCK_M >= count:
        return
    slot = tl.load(seg_slots_ptr + seg).to(tl.int64)

    b_ptr = b0_ptr
    n_cols = n0
    col = col0
    stride_bs = stride_bs0
    if slice_id == 1:
        b_ptr = b1_ptr
        n_cols = n1
        col = col1
        stride_bs = stride_bs1
    if slice_id == 2:
        b_ptr = b2_ptr
        n_cols = n2
        col = col2
        stride_bs = stride_bs2
    # The grid covers the widest slice; narrower slices (k/v next to q) stop early.
    if pid_n * BLOCK_N >= n_cols:
        return
    rank = max_rank
    if HAS_RANKS:
        rank = tl.minimum(tl.load(slot_ranks_ptr + slot), max_rank)

    start = tl.load(seg_starts_ptr + seg)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < count
    tok = tl.load(sorted_ids_ptr + start + offs_m, mask=m_mask, other=0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n_cols
    offs_r = tl.arange(0, BLOCK_R)

    buf_rows = buf_ptr + slice_id * stride_ws + tok[:, None] * stride_wt
    b_cols = b_ptr + slot * stride_bs + offs_n[None, :] * stride_bn
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    # Runtime trip count: a rank-8 adapter in a rank-64 stack runs one rank tile, not four.
    # Whole rank tiles load without a rank mask: B's rank axis is its contiguous one, and a
    # mask against a per-slot rank read from memory (no known divisibility) compiles to
    # scalar 2-byte loads (twice the time of the padded kernel, measured on an H100). Only
    # a last, partial tile is masked.
    full_end = rank - rank % BLOCK_R
    for r0 in range(0, full_end, BLOCK_R):
        rr = r0 + offs_r
        bt = tl.load(buf_rows + rr[None, :] * stride_wr, mask=m_mask[:, None], other=0.0)
        for k in tl.static_range(1, NUM_PARTIALS):
            bt += tl.load(
                buf_rows + k * stride_wk + rr[None, :] * stride_wr, mask=m_mask[:, None], other=0.0
            )
        wt = tl.load(b_cols + rr[:, None] * stride_br, mask=n_mask[None, :], other=0.0)
        if UPCAST:
            bt = bt.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(bt, wt, acc, input_precision=PRECISION)
    if full_end < rank:
        rr = full_end + offs_r
        r_mask = rr < rank
        bt_mask = m_mask[:, None] & r_mask[None, :]
        bt = tl.load(buf_rows + rr[None, :] * stride_wr, mask=bt_mask, other=0.0)
        for k in tl.static_range(1, NUM_PARTIALS):
            bt += tl.load(
                buf_rows + k * stride_wk + rr[None, :] * stride_wr, mask=bt_mask, other=0.0
            )
        wt = tl.load(
            b_cols + rr[:, None] * stride_br, mask=r_mask[:, None] & n_mask[None, :], other=0.0
        )
        if UPCAST:
            bt = bt.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(bt, wt, acc, input_precision=PRECISION)

    out_tile = out_ptr + tok[:, None] * stride_ot + (col + offs_n)[None, :] * stride_on
    mask = m_mask[:, None] & n_mask[None, :]
    if ADD:
        acc += tl.load(out_tile, mask=mask).to(tl.float32)
    tl.store(out_tile, acc.to(out_ptr.dtype.element_ty), mask=mask)
