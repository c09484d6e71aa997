"""Which implementation runs where: compiled Triton on CUDA, Triton's interpreter on CPU when
``TRITON_INTERPRET=1``, the torch reference otherwise. Imports neither ``triton`` nor any
other module of the package, so the dispatcher and the launchers both ask it without a cycle.
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

_TRUTHY = {"1", "true", "yes", "on"}


def interpret_requested() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's CPU interpreter (read on every call)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUTHY


@functools.cache
def triton_available() -> bool:
    """Whether ``triton`` imports. Probed once; a broken install counts as absent."""
    try:
        importlib.import_module("triton")
    except Exception:  # optional dependency: any import failure means "use the reference"
        return False
    return True


def use_triton(device: torch.device) -> bool:
    """Whether an op on tensors living on ``device`` runs the Triton kernels."""
    if not triton_available():
        return False
    return device.type == "cuda" or interpret_requested()
