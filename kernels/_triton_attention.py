"""Triton kernel body for decode attention straight from the paged KV cache.

Not decorated, like ``_triton_kernels``: ``triton_attention`` wraps it for compilation or
the interpreter per call. The row reductions use ``tl.reduce`` with combine functions
built here as ``JITFunction`` objects: ``tl.max`` / ``tl.sum`` are jitted helpers bound to
whichever flavour was current when triton was imported, while a ``JITFunction`` combine
works in both (compiled code calls it; the interpreter's reduce runs its ``.fn``).
"""

import triton.language as tl
from triton.runtime.jit import JITFunction


def _maximum(a, b):
    return tl.maximum(a, b)


def _add(a, b):
    return a + b


# Triton's own combines where it has them: the interpreter reduces with numpy for those
# (its generic reduce over a Python combine is ~100x slower); ours otherwise.
_MAX = getattr(tl.standard, "_elementwise_max", None) or JITFunction(_maximum)
_SUM = getattr(tl.standard, "_sum_combine", None) or JITFunction(_add)


def paged_decode_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    tables_ptr,
    lens_ptr,
    scale,
    window,
    group,
    head_dim,
    stride_qb,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ob,
    stride_oh,
    stride_tb,
    BLOCK_SIZE: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """out[b, h] = softmax(scale * q[b, h] . K_b) V_b over sequence b's cached keys.

    q [B, Hq, D]; caches [rows, Hkv, D], key j of sequence b at row
    ``tables[b, j // BLOCK_SIZE] * BLOCK_SIZE + j % BLOCK_SIZE``; lens [B] context lengths
    (>= 1, the new token's key included); window > 0 keeps the last ``window`` keys only.
    Query head h reads KV head h // group (GQA). Unit stride along D everywhere.
    Grid: (B, Hkv): one program per sequence and KV head, its ``group`` query heads as the
    rows of one tile, an online softmax over BLOCK_N keys at a time (flash decoding without
    the split); only the context's own keys are read.
    """
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    ctx_len = tl.load(lens_ptr + b)
    offs_g = tl.arange(0, GROUP_PAD)
    g_mask = offs_g < group
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    heads = kv_head * group + offs_g
    q_mask = g_mask[:, None] & d_mask[None, :]
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=q_mask, other=0.0
    )
    if UPCAST:
        q = q.to(tl.float32)
    first = ctx_len * 0
    if window > 0:
        first = tl.maximum(ctx_len - window, 0)
    m_i = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
    l_i = tl.full((GROUP_PAD,), 0.0, tl.float32)
    acc = tl.full((GROUP_PAD, BLOCK_D), 0.0, tl.float32)
    k_base = k_ptr + kv_head * stride_kh
    v_base = v_ptr + kv_head * stride_vh
    for n0 in range(first - first % BLOCK_N, ctx_len, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = (offs_n < ctx_len) & (offs_n >= first)
        block = tl.load(tables_ptr + b * stride_tb + offs_n // BLOCK_SIZE, mask=n_mask, other=0)
        rows = block.to(tl.int64) * BLOCK_SIZE + offs_n % BLOCK_SIZE
        # K loads transposed, [D, N], so the scores are one plain dot.
        kt = tl.load(
            k_base + rows[None, :] * stride_kt + offs_d[:, None],
            mask=d_mask[:, None] & n_mask[None, :],
            other=0.0,
        )
        v = tl.load(
            v_base + rows[:, None] * stride_vt + offs_d[None, :],
            mask=n_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        if UPCAST:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, kt, input_precision=PRECISION) * scale  # [GROUP_PAD, BLOCK_N]
        s = tl.where(n_mask[None, :], s, float("-inf"))
        # Every tile holds at least one live key (the loop starts at the tile holding
        # ``first`` and stops before ``ctx_len``), so m_new is finite.
        m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.reduce(p, 1, _SUM)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(
        out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=q_mask,
    )
