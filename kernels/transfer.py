"""Host-to-device copies that never make the host wait for the device, and the fast way to
turn host ints into a tensor: what every per-step host path needs (step metadata, the
sampler's tables, adapter weights on their way to a slot)."""

from __future__ import annotations

import array
from collections.abc import Sequence

import torch

_TYPECODES = {torch.int64: "q", torch.int32: "i"}


def int_tensor(values: Sequence[int], dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """A CPU int64/int32 tensor of host ints, through ``array``: about 6x faster than
    ``torch.tensor(list)`` (measured: 0.12 vs 0.75 ms for 6K ints), which matters on the
    per-step host path of a replayed CUDA graph."""
    if not values:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(array.array(_TYPECODES[dtype], values), dtype=dtype)


def to_device(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``host`` copied to ``device``, queued without waiting for the device. On CUDA the copy
    goes through pinned memory (torch's caching host allocator): a copy from pageable
    memory may wait for the stream to drain, which would stall an engine that queues a step
    while the previous one computes."""
    device = torch.device(device)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def copy_to_device(dst: torch.Tensor, host: torch.Tensor) -> None:
    """``dst.copy_(host)`` for a device ``dst``, queued as ``to_device`` queues."""
    if dst.is_cuda:
        dst.copy_(host.pin_memory(), non_blocking=True)
    else:
        dst.copy_(host)
