"""Per-step batch layout, built once by the model runner and read by every layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorafleet.kernels import LoRAMeta


@dataclass(frozen=True)
class StepContext:
    """Where the T tokens of a step sit, in the cache and in the padded attention batch.

    - ``positions``       int64 [T]   position of each token in its sequence
    - ``slot_mapping``    int64 [T]   flat KV-cache row each token's K/V is written to
    - ``logits_indices``  int64 [N]   tokens whose next-token logits are needed this step
    - ``lora``            LoRAMeta over the tokens, or None when no token uses an adapter
    Decode steps (``max_query_len == 1``) attend straight from the paged cache:
    - ``block_tables``    int64 [B, W] each sequence's cache blocks (W covers every context)
    - ``context_lens``    int64 [B]   keys per sequence, the new token's included
    Other steps gather keys into a padded batch:
    - ``query_pad_index`` int64 [T]   row of each token in the padded [B * max_query_len] queries
    - ``kv_gather_index`` int64 [B, C] flat cache row of key j of sequence b (C = max context)
    - ``attn_mask``       bool  [B, 1, max_query_len, C]  causal + length (+ sliding window)
    """

    positions: torch.Tensor
    slot_mapping: torch.Tensor
    logits_indices: torch.Tensor
    num_seqs: int
    max_query_len: int
    block_size: int
    lora: LoRAMeta | None
    block_tables: torch.Tensor | None = None
    context_lens: torch.Tensor | None = None
    query_pad_index: torch.Tensor | None = None
    kv_gather_index: torch.Tensor | None = None
    attn_mask: torch.Tensor | None = None
