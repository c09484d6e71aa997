"""What the demo training scripts (``train_demo.py``, ``train_chat_demo.py``) share: the
padded batch of a causal-LM fine-tune and the learning-rate schedule.

Imported by those scripts as a sibling module (``python scripts/train_demo.py`` puts
``scripts/`` on ``sys.path``); not part of the ``lorafleet`` package.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def pad_batch(
    rows: Sequence[Sequence[int]], label_rows: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``(ids, attention mask, labels)`` as ``long`` tensors [batch, longest
    row]: ``ids`` padded with ``pad_id``, ``labels`` with -100 (ignored by the loss), the
    mask 1 on each row's own tokens. ``label_rows[i]`` is no longer than ``rows[i]``."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, lr) in enumerate(zip(rows, label_rows, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        labels[i, : len(lr)] = torch.tensor(lr)
        mask[i, : len(r)] = 1
    return ids, mask, labels


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to 5% of peak (the low tail
    sharpens greedy accuracy)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))
