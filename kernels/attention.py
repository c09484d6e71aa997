"""Decode attention over the paged KV cache: one query token per sequence.

``paged_decode_attention`` runs the Triton kernel on CUDA (and in Triton's interpreter on
CPU when ``TRITON_INTERPRET=1``), else the torch reference, which gathers each sequence's
keys into a padded batch for ``scaled_dot_product_attention``. The kernel reads each
context's keys in place, once: the gather copies every key (padded to the longest context)
before attention reads it again, which is most of a large decode batch's memory traffic.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from lorafleet.kernels.dispatch import use_triton


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    window: int | None = None,
) -> torch.Tensor:
    """Attention of one new token per sequence over its cached keys (its own included).

    q [B, Hq, D]; caches [rows, Hkv, D] (Hq a multiple of Hkv; key j of sequence b at row
    ``block_tables[b, j // block_size] * block_size + j % block_size``); block_tables int
    [B, W] with W blocks covering every context (entries past a context are never used);
    context_lens int [B], each >= 1; ``window``: attend to the last ``window`` keys only.
    Scale 1/sqrt(D). Returns [B, Hq, D] in q's dtype.
    """
    if use_triton(q.device):
        ops = importlib.import_module("lorafleet.kernels.triton_attention")
        return ops.paged_decode_attention_triton(
            q, k_cache, v_cache, block_tables, context_lens, block_size, window
        )
    return paged_decode_attention_ref(
        q, k_cache, v_cache, block_tables, context_lens, block_size, window
    )


def paged_decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    window: int | None = None,
) -> torch.Tensor:
    """The torch form of ``paged_decode_attention`` (same contract)."""
    num_seqs, width = block_tables.shape
    _, kv_heads, head_dim = k_cache.shape
    key_pos = torch.arange(width * block_size, device=q.device)
    tables = block_tables.to(torch.int64)
    rows = (tables[:, key_pos // block_size] * block_size + key_pos % block_size).flatten()
    shape = (num_seqs, -1, kv_heads, head_dim)
    keys = k_cache.index_select(0, rows).view(shape).transpose(1, 2)
    values = v_cache.index_select(0, rows).view(shape).transpose(1, 2)
    lens = context_lens.to(torch.int64)[:, None]
    mask = key_pos[None, :] < lens
    if window is not None:
        mask &= key_pos[None, :] >= lens - window
    out = F.scaled_dot_product_attention(
        q[:, :, None, :], keys, values, attn_mask=mask[:, None, None, :], enable_gqa=True
    )  # [B, Hq, 1, D]
    return out[:, :, 0]
