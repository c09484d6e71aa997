"""Pick the implementation of each LoRA op per call: Triton kernels or the torch reference.

Rules (read at call time, so a test may flip ``TRITON_INTERPRET`` after import; the
engine's ``add_lora_slices`` reads them once per step, on the step's ``LoRAMeta``):
  - CUDA tensors run the compiled Triton kernels;
  - CPU tensors run the torch reference, unless ``TRITON_INTERPRET=1``, in which case the
    real kernels run in Triton's interpreter (slow; for tests);
  - without an importable ``triton`` everything runs the torch reference.
``triton`` is imported lazily, so ``import lorafleet.kernels`` works without it.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType

import torch

from lorafleet.kernels.backend import use_triton
from lorafleet.kernels.meta import LoRAMeta
from lorafleet.kernels.reference import (
    lora_expand_ref,
    lora_expand_slices_ref,
    lora_shrink_ref,
    lora_shrink_slices_ref,
)
from lorafleet.kernels.segmented import FusedStacks, add_lora_fused


def _triton_ops() -> ModuleType:
    # Imported only once triton is known to import, and not guarded: a bug in our own
    # launcher module must surface, not silently fall back to the reference.
    return importlib.import_module("lorafleet.kernels.triton_ops")


def step_uses_triton(meta: LoRAMeta, tensor: torch.Tensor) -> bool:
    """``use_triton`` for a step's tensors (``tensor`` is one of them), decided on the
    step's first LoRA op and kept in its metadata, which every layer shares: the engine
    runs ``add_lora_slices`` on every projection (120 times a step on a 30-layer model),
    and reading the environment costs microseconds (a missing variable raises a KeyError
    inside ``os.environ.get``)."""
    found = meta.cache.get("use_triton")
    if found is None:
        found = meta.cache["use_triton"] = use_triton(tensor.device)
    return found


def lora_shrink(
    x: torch.Tensor, lora_a: torch.Tensor, meta: LoRAMeta, scale: float = 1.0
) -> torch.Tensor:
    """``scale * x[t] @ lora_a[slot[t]].T``: x [T, H], lora_a [S, R, H] -> fp32 [T, R].

    Rows whose slot is -1, and rank columns past a slot's rank, are zero.
    """
    if use_triton(x.device):
        return _triton_ops().lora_shrink_triton(x, lora_a, meta, scale)
    return lora_shrink_ref(x, lora_a, meta.concrete(), scale)


def lora_expand(
    buf: torch.Tensor,
    lora_b: torch.Tensor,
    meta: LoRAMeta,
    out: torch.Tensor,
    add: bool = True,
) -> torch.Tensor:
    """``out[t] (+)= buf[t] @ lora_b[slot[t]].T``: buf [T, R], lora_b [S, N, R], out [T, N].

    Rows whose slot is -1 are untouched; fp32 accumulation, one cast on write. Returns out.
    """
    if use_triton(out.device):
        return _triton_ops().lora_expand_triton(buf, lora_b, meta, out, add)
    return lora_expand_ref(buf, lora_b, meta.concrete(), out, add)


def lora_shrink_slices(
    x: torch.Tensor, lora_as: Sequence[torch.Tensor], meta: LoRAMeta, scale: float = 1.0
) -> torch.Tensor:
    """Shrink for fused projections: x [T, H], ``lora_as[i]`` [S, R, H] -> fp32 [n, T, R]."""
    if use_triton(x.device):
        return _triton_ops().lora_shrink_slices_triton(x, lora_as, meta, scale)
    return lora_shrink_slices_ref(x, lora_as, meta.concrete(), scale)


def lora_expand_slices(
    buf: torch.Tensor,
    lora_bs: Sequence[torch.Tensor],
    meta: LoRAMeta,
    out: torch.Tensor,
    slice_offsets: Sequence[int] | None = None,
    add: bool = True,
) -> torch.Tensor:
    """Expand for fused projections: buf [n, T, R], ``lora_bs[i]`` [S, N_i, R], out [T, N].

    Slice i writes columns ``[slice_offsets[i], slice_offsets[i] + N_i)`` of ``out``
    (offsets default to back to back). Returns ``out``.
    """
    if use_triton(out.device):
        return _triton_ops().lora_expand_slices_triton(buf, lora_bs, meta, out, slice_offsets, add)
    return lora_expand_slices_ref(buf, lora_bs, meta.concrete(), out, slice_offsets, add)


def add_lora_slices(
    x: torch.Tensor,
    lora_as: Sequence[torch.Tensor],
    lora_bs: Sequence[torch.Tensor],
    meta: LoRAMeta,
    out: torch.Tensor,
    slice_offsets: Sequence[int] | None = None,
    scale: float = 1.0,
    *,
    slot_mask: int = -1,
    fused: FusedStacks | None = None,
) -> torch.Tensor:
    """A LoRA linear's update in one call: ``out[t, off_i:off_i+N_i] += scale * x[t] @
    lora_as[i][slot].T @ lora_bs[i][slot].T`` (shapes as the shrink and expand slices ops).

    The same result as ``lora_expand_slices(lora_shrink_slices(...), ...)``; on the Triton
    path the intermediate rank buffer is private, which saves its zeroing. ``slot_mask``:
    bit s clear says slot s holds zeros in these stacks, so its tokens may be skipped.
    ``fused``: the same stacks as ``FusedStacks`` (``lora_as``/``lora_bs`` its views, slices
    back to back), for the CPU's segmented path. Returns ``out``.
    """
    if step_uses_triton(meta, out):
        return _triton_ops().add_lora_slices_triton(
            x, lora_as, lora_bs, meta, out, slice_offsets, scale
        )
    meta = meta.concrete()
    if fused is not None:
        if fused.lora_as is not lora_as or fused.lora_bs is not lora_bs:
            raise ValueError("lora_as / lora_bs must be the fused stacks' own views")
        return add_lora_fused(x, fused, meta, out, slot_mask, scale)
    buf = lora_shrink_slices_ref(x, lora_as, meta, scale)
    return lora_expand_slices_ref(buf, lora_bs, meta, out, slice_offsets, add=True)
