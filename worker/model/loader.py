"""Read a Hugging Face model folder (config.json + safetensors, sharded or not)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from lorafleet.worker.model.decoder import FUSED, CausalLM, ModelArgs, fused_slot, rope_inv_freq

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def read_model_args(model_dir: Path) -> tuple[ModelArgs, dict]:
    """Parse ``config.json`` into ``ModelArgs``; returns the raw dict too."""
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{model_dir} is not a Hugging Face model folder (no config.json)")
    cfg = json.loads(config_path.read_text())
    archs = cfg.get("architectures") or []
    arch = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise ValueError(
            f"unsupported architecture {archs} in {config_path}; "
            f"supported: {sorted(SUPPORTED_ARCHITECTURES)}"
        )
    heads = cfg["num_attention_heads"]
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    use_window = cfg.get("use_sliding_window", arch == "mistral")
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    args = ModelArgs(
        arch=arch,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=rope_theta,
        rope_scaling=rope
        if rope.get("rope_type", rope.get("type", "default")) != "default"
        else None,
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        attention_bias=arch == "qwen2" or cfg.get("attention_bias", False),
        o_proj_bias=arch != "qwen2" and cfg.get("attention_bias", False),
        mlp_bias=cfg.get("mlp_bias", False),
        sliding_window=cfg.get("sliding_window") if use_window else None,
        eos_token_ids=eos_ids,
    )
    return args, cfg


def weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / s for s in shards]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(
        f"no safetensors weights in {model_dir} (pickle .bin checkpoints are not loaded)"
    )


def resolve_dtype(name: str, cfg: dict) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    stored = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return DTYPES.get(stored, torch.float32)


_LAYER_PARAM = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(weight|bias)$")


def _destination(model: CausalLM, name: str) -> torch.Tensor | None:
    """The parameter (or fused-row view of one) that checkpoint tensor ``name`` fills."""
    m = _LAYER_PARAM.match(name)
    if m is None or m[3] not in FUSED:
        param = dict(model.named_parameters()).get(name)
        return None if param is None else param.data
    layer, kind = int(m[1]), m[4]
    if layer >= model.args.num_layers:
        return None
    linear, index = fused_slot(model.layers[layer], m[3])
    param = linear.weight if kind == "weight" else linear.bias
    if param is None:
        return None
    start = linear.offsets[index]
    return param.data[start : start + linear.out_sizes[index]]


def checkpoint_names(model: CausalLM) -> set[str]:
    """Every tensor name a complete checkpoint for ``model`` holds."""
    names = set()
    for name, _ in model.named_parameters():
        m = re.match(r"^(model\.layers\.\d+)\.(self_attn|mlp)\.(\w+)\.(weight|bias)$", name)
        fused = m is not None and m[3] in ("qkv_proj", "gate_up_proj")
        if not fused:
            names.add(name)
            continue
        for hf_name, (parent, linear, _) in FUSED.items():
            if parent == m[2] and linear == m[3]:
                names.add(f"{m[1]}.{parent}.{hf_name}.{m[4]}")
    return names


def load_model(model_dir: str | Path, dtype: torch.dtype, device: torch.device) -> CausalLM:
    """Build ``CausalLM`` and fill every parameter from the folder's safetensors."""
    model_dir = Path(model_dir)
    args, _ = read_model_args(model_dir)
    with torch.device("meta"):
        model = CausalLM(args)
    model = model.to_empty(device=device).to(dtype)
    if args.tie_word_embeddings:  # to_empty gives each module its own storage
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(args).to(device)
    missing = checkpoint_names(model)
    for path in weight_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                dest = _destination(model, name)
                if dest is None:
                    if "rotary_emb" in name:
                        continue
                    raise ValueError(f"unexpected weight {name!r} in {path.name}")
                tensor = f.get_tensor(name)
                if tensor.shape != dest.shape:
                    raise ValueError(
                        f"weight {name!r} has shape {tuple(tensor.shape)}, "
                        f"expected {tuple(dest.shape)}"
                    )
                dest.copy_(tensor.to(dtype))
                missing.discard(name)
    if args.tie_word_embeddings:
        missing.discard("lm_head.weight")
    if missing:
        raise ValueError(f"weights missing from {model_dir}: {sorted(missing)[:5]}")
    return model.eval()
