"""What the demo training scripts (``train_demo.py``, ``train_chat_demo.py``) share: the
padded batch of a causal-LM fine-tune and the learning-rate schedule.

Imported by those scripts as a sibling module (``python scripts/train_demo.py`` puts
``scripts/`` on ``sys.path``); not part of the ``lorafleet`` package.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

import torch


def training_parser(
    doc: str, *, out: Path, batch_size: int, threads_help: str
) -> argparse.ArgumentParser:
    """A trainer's parser (described by the first paragraph of its ``doc``) with the flags
    every trainer has: ``--out``, ``--batch-size`` and ``--threads`` (torch threads, 1 by
    default; ``threads_help`` says why)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=out)
    ap.add_argument("--batch-size", type=int, default=batch_size)
    ap.add_argument("--threads", type=int, default=1, help=threads_help)
    return ap


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
