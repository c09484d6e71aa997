"""Read and validate a PEFT LoRA adapter folder (adapter_config.json + safetensors).

Only safetensors is read: a folder holding just ``adapter_model.bin`` is refused, never
unpickled. Every tensor is checked against the base model's shapes, so an adapter trained
for another model fails here with a message instead of producing wrong outputs later.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from lorafleet.kernels.transfer import to_device
from lorafleet.producer.errors import (
    AdapterInvalidError,
    AdapterNotFoundError,
    AdapterRankTooLargeError,
)
from lorafleet.worker.model.decoder import LORA_TARGETS, ModelArgs

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$"
)
_UNSUPPORTED_CONFIG = {
    "use_dora": "DoRA",
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "modules_to_save": "modules_to_save",
    "fan_in_fan_out": "fan_in_fan_out",
}


@dataclass(frozen=True)
class AdapterWeights:
    """A validated adapter on the CPU. ``weights[(layer, module)] = (A [r, in],
    B [out, r] already multiplied by ``scaling``)`` in the model's dtype, all of them views
    into one 1-D buffer ``flat``, so the adapter reaches a device in one copy (``on``)."""

    rank: int
    scaling: float
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    flat: torch.Tensor

    @classmethod
    def pack(
        cls,
        rank: int,
        scaling: float,
        pairs: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]],
    ) -> AdapterWeights:
        flat = torch.cat([t.flatten() for pair in pairs.values() for t in pair])
        return cls(rank, scaling, _views(flat, pairs), flat)

    @property
    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()

    def on(self, device: torch.device) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
        """``weights`` on ``device``: one copy of ``flat`` (none on the CPU), then views.

        ``flat`` stays in pageable memory: pinning every cached adapter would lock up to
        max_cpu_loras adapters' worth of host RAM. The copy is staged through pinned memory
        (``to_device``), so loading a slot does not wait for the step the GPU is running."""
        return _views(to_device(self.flat, device), self.weights)


def _views(
    flat: torch.Tensor, like: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """Views of ``flat`` shaped as ``like``'s tensors, back to back in its order."""
    shapes = [t.shape for pair in like.values() for t in pair]
    parts = flat.split([s.numel() for s in shapes])
    views = [part.view(shape) for part, shape in zip(parts, shapes, strict=True)]
    return {key: (views[2 * i], views[2 * i + 1]) for i, key in enumerate(like)}


def _read_config(folder: Path, name: str) -> dict:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise AdapterNotFoundError(f"adapter {name!r}: no {CONFIG_FILE} in {folder}")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterInvalidError(
            f"adapter {name!r}: {CONFIG_FILE} is not valid JSON: {e}"
        ) from None
    if not isinstance(cfg, dict):
        raise AdapterInvalidError(f"adapter {name!r}: {CONFIG_FILE} must hold a JSON object")
    return cfg


def _check_config(cfg: dict, name: str, args: ModelArgs, max_rank: int) -> tuple[int, float]:
    """Validate the config; return (rank, scaling)."""
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterInvalidError(
            f"adapter {name!r}: peft_type {cfg.get('peft_type')!r} is not LORA"
        )
    for key, what in _UNSUPPORTED_CONFIG.items():
        if cfg.get(key):
            raise AdapterInvalidError(f"adapter {name!r}: {what} is not supported")
    if cfg.get("bias", "none") != "none":
        raise AdapterInvalidError(
            f"adapter {name!r}: trained biases (bias={cfg['bias']!r}) are not supported"
        )
    rank, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(rank, int) or rank < 1:
        raise AdapterInvalidError(f"adapter {name!r}: r must be a positive int, got {rank!r}")
    if not isinstance(alpha, int | float) or alpha <= 0:
        raise AdapterInvalidError(f"adapter {name!r}: lora_alpha must be positive, got {alpha!r}")
    if rank > max_rank:
        raise AdapterRankTooLargeError(
            f"adapter {name!r} has rank {rank}, above this engine's max_lora_rank of "
            f"{max_rank}: raise --max-lora-rank / LORAFLEET_MAX_LORA_RANK on the worker "
            f"(max_lora_rank for LLM)"
        )
    targets = cfg.get("target_modules")
    if isinstance(targets, list):
        lacking = sorted(set(targets) - set(LORA_TARGETS))
        if lacking:
            raise AdapterInvalidError(
                f"adapter {name!r} targets {lacking}, which the base model "
                f"({args.arch}) lacks or lorafleet cannot adapt; supported: {list(LORA_TARGETS)}"
            )
    scaling = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    return rank, float(scaling)


def _open_weights(folder: Path, name: str, max_bytes: int) -> Path:
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        if (folder / "adapter_model.bin").exists():
            raise AdapterInvalidError(
                f"adapter {name!r} is stored only as a pickle (adapter_model.bin); lorafleet "
                f"loads safetensors only — convert it with safetensors' save_file"
            )
        raise AdapterNotFoundError(f"adapter {name!r}: no {WEIGHTS_FILE} in {folder}")
    size = path.stat().st_size
    if size > max_bytes:
        raise AdapterInvalidError(
            f"adapter {name!r}: {WEIGHTS_FILE} is {size} bytes, above the {max_bytes}-byte limit"
        )
    return path


def load_peft_adapter(
    folder: Path,
    name: str,
    args: ModelArgs,
    max_rank: int,
    dtype: torch.dtype,
    max_bytes: int,
) -> AdapterWeights:
    """Read, validate and scale one adapter. Raises typed ``LoraFleetError``s naming ``name``."""
    cfg = _read_config(folder, name)
    rank, scaling = _check_config(cfg, name, args, max_rank)
    path = _open_weights(folder, name, max_bytes)
    shapes = args.linear_shapes()
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                m = _KEY.match(key)
                if m is None:
                    raise AdapterInvalidError(
                        f"adapter {name!r}: unsupported tensor {key!r} (only LoRA A/B of "
                        f"{list(LORA_TARGETS)} in decoder layers are supported)"
                    )
                layer, module, half = int(m[1]), m[3], m[4]
                if module not in shapes or layer >= args.num_layers:
                    raise AdapterInvalidError(
                        f"adapter {name!r}: tensor {key!r} targets a module the base model lacks"
                    )
                halves.setdefault((layer, module), {})[half] = f.get_tensor(key)
    except SafetensorError as e:
        raise AdapterInvalidError(f"adapter {name!r}: corrupt {WEIGHTS_FILE}: {e}") from None
    if not halves:
        raise AdapterInvalidError(f"adapter {name!r}: {WEIGHTS_FILE} holds no LoRA tensors")
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for (layer, module), pair in sorted(halves.items()):
        if set(pair) != {"A", "B"}:
            raise AdapterInvalidError(
                f"adapter {name!r}: layer {layer} {module} has lora_{''.join(pair)} but not both A and B"
            )
        a, b = pair["A"], pair["B"]
        fan_in, fan_out = shapes[module]
        if a.shape != (rank, fan_in) or b.shape != (fan_out, rank):
            raise AdapterInvalidError(
                f"adapter {name!r}: layer {layer} {module} has A {tuple(a.shape)} and B "
                f"{tuple(b.shape)}, expected A ({rank}, {fan_in}) and B ({fan_out}, {rank}) — "
                f"was it trained for another base model?"
            )
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterInvalidError(f"adapter {name!r}: layer {layer} {module} has NaN or inf")
        a = a.to(dtype).contiguous()
        b = (b.float() * scaling).to(dtype).contiguous()
        weights[(layer, module)] = (a, b)
    return AdapterWeights.pack(rank, scaling, weights)
