"""What an ``AdapterManager`` may do: the engine's adapter settings, as it hands them down.

The settings themselves (their defaults, rules and documentation) are ``EngineConfig``'s;
this is the part of them the adapters read, under the same names
(``EngineConfig.adapter_policy()``), so the adapters need not know the engine.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AdapterPolicy:
    """``EngineConfig``'s fields of the same names (see there)."""

    model: str
    enable_lora: bool
    max_loras: int
    max_lora_rank: int
    max_cpu_loras: int
    adapter_roots: tuple[str, ...] | None
    max_adapter_bytes: int
    adapter_failure_ttl: float
    hub: str
    hub_cache_dir: str | None
    merge_after_steps: int
