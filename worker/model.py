"""Llama-family decoder (Llama, Mistral, Qwen2) in plain torch, with LoRA-aware linears.

One readable file in the gpt-fast spirit. The batch is a flat list of T tokens from many
sequences (prefill chunks and decode tokens mixed); per-step layout lives in ``StepContext``.
Attention reads keys and values back from the paged KV cache by gathering each sequence's
blocks, so prefill, chunked prefill and decode share one code path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorafleet.kernels import lora_expand, lora_shrink
from lorafleet.worker.context import StepContext

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelArgs:
    """The shape of a model, read from a Hugging Face ``config.json``."""

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    o_proj_bias: bool
    mlp_bias: bool
    sliding_window: int | None
    eos_token_ids: tuple[int, ...]

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each LoRA-targetable projection."""
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }


class LoRALinear(nn.Module):
    """``y = x W^T + b`` plus, per token, ``(x A_s^T) B_s^T`` for the token's adapter slot s.

    ``lora_a`` [S, R, in] and ``lora_b`` [S, out, R] are slot stacks owned by the
    ``AdapterManager``; B already carries the adapter's scaling. Unused rank columns are zero.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.lora_a: torch.Tensor | None = None
        self.lora_b: torch.Tensor | None = None

    def allocate_slots(self, num_slots: int, rank: int) -> None:
        kw = dict(dtype=self.weight.dtype, device=self.weight.device)
        self.lora_a = torch.zeros(num_slots, rank, self.in_features, **kw)
        self.lora_b = torch.zeros(num_slots, self.out_features, rank, **kw)

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        meta = ctx.lora
        if self.lora_a is not None and meta is not None and meta.num_lora_tokens:
            buf = lora_shrink(x, self.lora_a, meta)
            lora_expand(buf, self.lora_b, meta, y, add=True)
        return y


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] for ``default``, ``linear`` and ``llama3`` RoPE."""
    dim = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = args.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq.float()
    if kind == "linear":
        return (inv_freq / float(scaling["factor"])).float()
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled).float()
    raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: default, linear, llama3)")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        shapes = args.linear_shapes()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            args.num_heads,
            args.num_kv_heads,
            args.head_dim,
        )
        self.q_proj = LoRALinear(*shapes["q_proj"], bias=args.attention_bias)
        self.k_proj = LoRALinear(*shapes["k_proj"], bias=args.attention_bias)
        self.v_proj = LoRALinear(*shapes["v_proj"], bias=args.attention_bias)
        self.o_proj = LoRALinear(*shapes["o_proj"], bias=args.o_proj_bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        ctx: StepContext,
    ) -> torch.Tensor:
        """x [T, hidden]; caches [num_blocks * block_size, kv_heads, head_dim]."""
        t = x.shape[0]
        q = self.q_proj(x, ctx).view(t, self.num_heads, self.head_dim)
        k = self.k_proj(x, ctx).view(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x, ctx).view(t, self.num_kv_heads, self.head_dim)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k_cache.index_copy_(0, ctx.slot_mapping, k.to(k_cache.dtype))
        v_cache.index_copy_(0, ctx.slot_mapping, v.to(v_cache.dtype))

        b, max_q = ctx.num_seqs, ctx.max_query_len
        decode_only = max_q == 1  # one token per sequence: already in padded layout
        if decode_only:
            qp = q
        else:
            qp = q.new_zeros(b * max_q, self.num_heads, self.head_dim)
            qp.index_copy_(0, ctx.query_pad_index, q)
        qp = qp.view(b, max_q, self.num_heads, self.head_dim).transpose(1, 2)
        keys = k_cache[ctx.kv_gather_index].to(q.dtype).transpose(1, 2)  # [B, kvh, C, d]
        values = v_cache[ctx.kv_gather_index].to(q.dtype).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            qp, keys, values, attn_mask=ctx.attn_mask, enable_gqa=True
        )  # [B, heads, max_q, d]
        out = out.transpose(1, 2).reshape(b * max_q, self.num_heads * self.head_dim)
        if not decode_only:
            out = out.index_select(0, ctx.query_pad_index)
        return self.o_proj(out, ctx)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        shapes = args.linear_shapes()
        self.gate_proj = LoRALinear(*shapes["gate_proj"], bias=args.mlp_bias)
        self.up_proj = LoRALinear(*shapes["up_proj"], bias=args.mlp_bias)
        self.down_proj = LoRALinear(*shapes["down_proj"], bias=args.mlp_bias)

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x, ctx)) * self.up_proj(x, ctx), ctx)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x, cos, sin, k_cache, v_cache, ctx: StepContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, k_cache, v_cache, ctx)
        return x + self.mlp(self.post_attention_layernorm(x), ctx)


class CausalLM(nn.Module):
    """Parameter names match Hugging Face's (``model.layers.0.self_attn.q_proj.weight``...)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.model.embed_tokens.weight.requires_grad_(False)
        self.model.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.num_layers))
        self.model.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.lm_head.weight.requires_grad_(False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    def lora_linears(self) -> dict[tuple[int, str], LoRALinear]:
        """(layer index, module name) -> the LoRA-capable projection."""
        found: dict[tuple[int, str], LoRALinear] = {}
        for i, layer in enumerate(self.model.layers):
            for name in LORA_TARGETS:
                parent = (
                    layer.self_attn
                    if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))
                    else layer.mlp
                )
                found[(i, name)] = getattr(parent, name)
        return found

    def forward(
        self,
        input_ids: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        ctx: StepContext,
    ) -> torch.Tensor:
        """input_ids [T] -> final hidden states of the tokens in ``ctx.logits_indices``."""
        x = self.model.embed_tokens(input_ids)
        freqs = ctx.positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos().to(x.dtype)[:, None, :]
        sin = emb.sin().to(x.dtype)[:, None, :]
        for layer, (k_cache, v_cache) in zip(self.model.layers, kv_caches, strict=True):
            x = layer(x, cos, sin, k_cache, v_cache, ctx)
        return self.model.norm(x.index_select(0, ctx.logits_indices))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
