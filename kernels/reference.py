"""Torch reference for the LoRA ops: the CPU path and the ground truth for the kernels.

One matmul per active slot over that slot's token group (no gather of per-token weights),
accumulating in float32.
"""

from __future__ import annotations

import torch

from lorafleet.kernels.meta import LoRAMeta


def lora_shrink_ref(
    x: torch.Tensor, lora_a: torch.Tensor, meta: LoRAMeta, scale: float = 1.0
) -> torch.Tensor:
    """``buf[t] = scale * x[t] @ lora_a[slot[t]].T``; x [T, H], lora_a [S, R, H] -> [T, R] fp32.

    Rows whose slot is -1 are zero.
    """
    num_tokens, rank = x.shape[0], lora_a.shape[1]
    buf = torch.zeros(num_tokens, rank, dtype=torch.float32, device=x.device)
    for slot, idx in meta.groups:
        if len(meta.groups) == 1 and idx.numel() == num_tokens:
            rows = x.float()
        else:
            rows = x.index_select(0, idx).float()
        part = rows @ lora_a[slot].float().T
        if scale != 1.0:
            part = part * scale
        if idx.numel() == num_tokens:
            buf = part
        else:
            buf.index_copy_(0, idx, part)
    return buf


def lora_expand_ref(
    buf: torch.Tensor,
    lora_b: torch.Tensor,
    meta: LoRAMeta,
    out: torch.Tensor,
    add: bool = True,
) -> torch.Tensor:
    """``out[t] (+)= buf[t] @ lora_b[slot[t]].T`` for rows with a slot; others untouched.

    buf [T, R], lora_b [S, N, R], out [T, N] (any float dtype; accumulation in fp32).
    """
    num_tokens = out.shape[0]
    for slot, idx in meta.groups:
        whole = idx.numel() == num_tokens
        rows = buf if whole else buf.index_select(0, idx)
        part = rows.float() @ lora_b[slot].float().T
        if whole:
            if add:
                out.add_(part.to(out.dtype)) if out.dtype == torch.float32 else out.copy_(
                    (out.float() + part).to(out.dtype)
                )
            else:
                out.copy_(part.to(out.dtype))
        elif add:
            cur = out.index_select(0, idx).float()
            out.index_copy_(0, idx, (cur + part).to(out.dtype))
        else:
            out.index_copy_(0, idx, part.to(out.dtype))
    return out
