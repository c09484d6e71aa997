"""Synthetic models and adapters: random weights, built offline from config classes.

Used by tests, benchmarks, ``lorafleet make-adapters`` and load tests. Nothing here touches
a model hub. Models are saved as Hugging Face folders (config.json, safetensors, a byte-level
tokenizer); adapters in PEFT's on-disk format (adapter_config.json +
adapter_model.safetensors), written directly so ``peft`` is not needed at run time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file

Arch = Literal["llama", "qwen2", "mistral"]

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>")


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values (ByteLevel's alphabet)."""
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


#: A minimal chat template in the Llama 3 manner: it writes the BOS itself.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def build_tokenizer(out_dir: str | Path, add_bos: bool = False) -> int:
    """Save a byte-level tokenizer (256 byte tokens + bos/eos/pad) usable by AutoTokenizer,
    with ``CHAT_TEMPLATE``. ``add_bos``: encoding with special tokens prepends the BOS (as
    Llama 3's tokenizer does).

    Every string round-trips exactly. Returns the vocabulary size (259).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(_byte_alphabet())}
    for tok in SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    bos = SPECIAL_TOKENS[0]
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token="<|eos|>",
        pad_token="<|pad|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return len(vocab)


def _config(arch: Arch, tokenizer_vocab: int, **overrides: object):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    # Special ids are the tokenizer's (its last three tokens), whatever the model's vocab.
    common: dict[str, object] = {
        "vocab_size": tokenizer_vocab,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "bos_token_id": tokenizer_vocab - 3,
        "eos_token_id": tokenizer_vocab - 2,
        "pad_token_id": tokenizer_vocab - 1,
        "tie_word_embeddings": False,
    }
    common.update(overrides)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[arch]
    if arch == "mistral":
        common.setdefault(
            "head_dim", int(common["hidden_size"]) // int(common["num_attention_heads"])
        )
    return cls(**common)


def build_random_model(
    out_dir: str | Path,
    arch: Arch = "llama",
    *,
    seed: int = 0,
    init_std: float = 0.08,
    dtype: torch.dtype = torch.float32,
    **config_overrides: object,
) -> Path:
    """Build a tiny random ``{Llama,Qwen2,Mistral}ForCausalLM`` folder with a tokenizer.

    ``init_std`` above transformers' 0.02 keeps greedy logits well separated, so
    token-for-token comparisons are not decided by float rounding.
    ``config_overrides`` go to the config class (e.g. ``num_hidden_layers=4``,
    ``rope_parameters={...}``, ``tie_word_embeddings=True``). ``vocab_size`` may exceed the
    tokenizer's 259 tokens (a real model's embedding size); ids past the tokenizer's decode
    to nothing.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_vocab = build_tokenizer(out)
    if int(config_overrides.get("vocab_size", tokenizer_vocab)) < tokenizer_vocab:
        raise ValueError(f"vocab_size must be at least the tokenizer's {tokenizer_vocab}")
    config = _config(arch, tokenizer_vocab, initializer_range=init_std, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    model.save_pretrained(str(out))
    return out


def _linear_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each LoRA-targetable projection."""
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv = config.get("num_key_value_heads") or heads
    inter = config["intermediate_size"]
    return {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv * head_dim),
        "v_proj": (hidden, kv * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


def _module_prefix(name: str) -> str:
    return "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"


def build_random_adapter(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    rank: int = 8,
    alpha: float = 16.0,
    target_modules: tuple[str, ...] | list[str] = ALL_TARGETS,
    use_rslora: bool = False,
    seed: int = 0,
    std: float = 0.1,
    base_model_name: str | None = None,
) -> Path:
    """Write a random PEFT LoRA adapter that fits the model in ``model_dir``.

    Both A and B are random (PEFT initialises B to zero, which would make every adapter
    equal to the base model and prove nothing).
    """
    config = json.loads((Path(model_dir) / "config.json").read_text())
    shapes = _linear_shapes(config)
    unknown = sorted(set(target_modules) - set(shapes))
    if unknown:
        raise ValueError(f"unknown target modules {unknown}; choose from {sorted(shapes)}")
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(config["num_hidden_layers"]):
        for name in target_modules:
            fan_in, fan_out = shapes[name]
            key = f"base_model.model.model.layers.{layer}.{_module_prefix(name)}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) * std
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * std
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name or str(model_dir),
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(target_modules),
        "use_rslora": use_rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    return out
