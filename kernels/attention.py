"""Decode attention over the paged KV cache: one query token per sequence.

``paged_decode_attention`` runs the Triton kernel on CUDA (and in Triton's interpreter on
CPU when ``TRITON_INTERPRET=1``), else the torch reference, which gathers each sequence's
keys into a padded batch for ``scaled_dot_product_attention`` (where those keys sit,
``key_gather``, is the same for every layer of a step: a caller builds it once). The kernel
reads each context's keys in place, once: the gather copies every key (padded to the
longest context) before attention reads it again, which is most of a large decode batch's
memory traffic.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lorafleet.kernels.backend import use_triton


@dataclass(frozen=True)
class KeyGather:
    """Where the torch path reads a decode step's keys, the same for every layer.

    ``rows`` int64 [B * W * block_size]: the cache row of key j of sequence b, at
    ``b * W * block_size + j`` (past a context, whatever rows its table's padding names,
    masked); ``mask`` bool [B, 1, 1, W * block_size]: the keys each query sees.
    """

    rows: torch.Tensor
    mask: torch.Tensor


def key_gather(
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    window: int | None = None,
) -> KeyGather:
    """The ``KeyGather`` of a decode step (arguments as ``paged_decode_attention``'s). Build
    it once per step: every layer reads the same cache rows, and the dozen small ops that
    find them cost more than one layer's attention for a short batch."""
    width = block_tables.shape[1]
    key_pos = torch.arange(width * block_size, device=block_tables.device)
    tables = block_tables.to(torch.int64)
    rows = (tables[:, key_pos // block_size] * block_size + key_pos % block_size).flatten()
    lens = context_lens.to(torch.int64)[:, None]
    mask = key_pos[None, :] < lens
    if window is not None:
        mask &= key_pos[None, :] >= lens - window
    return KeyGather(rows, mask[:, None, None, :])


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    window: int | None = None,
    gather: KeyGather | None = None,
) -> torch.Tensor:
    """Attention of one new token per sequence over its cached keys (its own included).

    q [B, Hq, D]; caches [rows, Hkv, D] (Hq a multiple of Hkv; key j of sequence b at row
    ``block_tables[b, j // block_size] * block_size + j % block_size``); block_tables int
    [B, W] with W blocks covering every context (entries past a context are never used);
    context_lens int [B], each >= 1; ``window``: attend to the last ``window`` keys only.
    Scale 1/sqrt(D). Returns [B, Hq, D] in q's dtype. ``gather``: the step's ``key_gather``,
    for a caller that chose the torch path once per step (the kernel needs none): with it,
    the torch path runs at once, without the per-call dispatch and row arithmetic.
    """
    if gather is not None:
        return _attend(q, k_cache, v_cache, gather)
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
    gather = key_gather(block_tables, context_lens, block_size, window)
    return _attend(q, k_cache, v_cache, gather)


def _attend(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, gather: KeyGather
) -> torch.Tensor:
    """Gather each sequence's keys into a padded batch for ``scaled_dot_product_attention``."""
    _, kv_heads, head_dim = k_cache.shape
    shape = (q.shape[0], -1, kv_heads, head_dim)
    keys = k_cache.index_select(0, gather.rows).view(shape).transpose(1, 2)
    values = v_cache.index_select(0, gather.rows).view(shape).transpose(1, 2)
    out = F.scaled_dot_product_attention(
        q[:, :, None, :], keys, values, attn_mask=gather.mask, enable_gqa=True
    )  # [B, Hq, 1, D]
    return out[:, :, 0]
