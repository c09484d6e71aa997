"""Llama-family decoder (Llama, Mistral, Qwen2) in plain torch, with LoRA-aware linears.

One readable file in the gpt-fast spirit. The batch is a flat list of T tokens from many
sequences (prefill chunks and decode tokens mixed); per-step layout lives in ``StepContext``.
Decode steps attend straight from the paged KV cache (``paged_decode_attention``); steps
with prefill chunks gather each sequence's keys into a padded batch for torch's attention.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorafleet.kernels import add_lora_slices, use_triton
from lorafleet.kernels.attention import KeyGather, key_gather, paged_decode_attention
from lorafleet.kernels.dispatch import step_uses_triton
from lorafleet.kernels.segmented import FusedStacks, HotSlot
from lorafleet.worker.model.context import StepContext

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Hugging Face projection -> (our submodule, fused linear, slice): q/k/v and gate/up are fused.
FUSED = {
    "q_proj": ("self_attn", "qkv_proj", 0),
    "k_proj": ("self_attn", "qkv_proj", 1),
    "v_proj": ("self_attn", "qkv_proj", 2),
    "o_proj": ("self_attn", "o_proj", 0),
    "gate_proj": ("mlp", "gate_up_proj", 0),
    "up_proj": ("mlp", "gate_up_proj", 1),
    "down_proj": ("mlp", "down_proj", 0),
}


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

    The output may be several fused projections side by side (q|k|v, gate|up), given by
    ``out_sizes``; each slice has its own slot stacks: ``lora_as[i]`` [S, R, in] and
    ``lora_bs[i]`` [S, out_sizes[i], R], owned by the ``AdapterManager``. B already carries
    the adapter's scaling; unused rank columns are zero. On the CPU those stacks are views
    of ``fused`` (``FusedStacks``), laid out for the segmented CPU path; elsewhere each is
    its own tensor, B's rank axis innermost, as the Triton kernels load it.

    On the CPU in float32, ``weight`` (and ``bias``) then become views of ``hot``
    (``HotSlot``: W with one slot's A under it), so a step whose rows all sit on one of
    this linear's slots runs the base GEMM and the shrink as one, then the expand (or, in a
    long run of such steps, one GEMM against W merged with the slot's adapter).
    """

    def __init__(self, in_features: int, out_sizes: tuple[int, ...], bias: bool) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_sizes = out_sizes
        self.offsets = [sum(out_sizes[:i]) for i in range(len(out_sizes))]
        out_features = sum(out_sizes)
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.lora_as: Sequence[torch.Tensor] = ()
        self.lora_bs: Sequence[torch.Tensor] = ()
        self.fused: FusedStacks | None = None
        self.hot: HotSlot | None = None
        # Bit s set: the adapter in slot s has weights for this projection. A step whose
        # active slots miss every bit skips the LoRA ops here (adapters on q/k/v/o only
        # leave the MLP alone), and the CPU path skips the tokens of slots whose bit is
        # clear; the AdapterManager keeps it in step with the slots.
        self.slot_mask = 0

    def allocate_slots(self, num_slots: int, rank: int, merge_after: int = 0) -> None:
        """Zeroed slot stacks for ``num_slots`` adapters of rank up to ``rank``;
        ``merge_after``: see ``HotSlot`` (CPU, float32; 0: never merge)."""
        dtype, device = self.weight.dtype, self.weight.device
        if device.type == "cpu":
            self.fused = FusedStacks.allocate(
                num_slots, rank, self.in_features, self.out_sizes, dtype, device
            )
            self.lora_as, self.lora_bs = self.fused.lora_as, self.fused.lora_bs
            if dtype == torch.float32:  # 16-bit stacks accumulate in float32 (add_lora_fused)
                self.hot = HotSlot(self.weight, self.bias, self.fused, merge_after)
                # In place (.data), so the Parameters stay the module's and the loader's.
                self.weight.data = self.hot.weight()
                if self.bias is not None:
                    self.bias.data = self.hot.bias()
            return
        kw = dict(dtype=dtype, device=device)
        self.lora_as = [
            torch.zeros(num_slots, rank, self.in_features, **kw) for _ in self.out_sizes
        ]
        self.lora_bs = [torch.zeros(num_slots, n, rank, **kw) for n in self.out_sizes]

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """x [T, in] -> [T, sum(out_sizes)]; may be a view with a wider row stride."""
        meta = ctx.lora
        if meta is None or not self.slot_mask & meta.active_mask:
            return F.linear(x, self.weight, self.bias)
        hot = self.hot
        if hot is not None:
            # Prepared once per step (and again if a slot was written since: the stacks'
            # version moved); the other calls of the step pay two comparisons.
            if hot.meta is not meta or hot.version != hot.stacks.a_t._version:
                # The weight is hot's memory unless something replaced it since (a cast).
                if (
                    not meta.static
                    and hot.w_ext.data_ptr() == self.weight.data_ptr()
                    and not step_uses_triton(meta, x)
                ):
                    hot.prepare(meta, self.slot_mask)
                else:
                    hot.meta, hot.version, hot.plan = meta, hot.stacks.a_t._version, None
            if hot.plan is not None:
                return hot.forward(x)
        y = F.linear(x, self.weight, self.bias)
        add_lora_slices(
            x,
            self.lora_as,
            self.lora_bs,
            meta,
            y,
            self.offsets,
            slot_mask=self.slot_mask,
            fused=self.fused,
        )
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
        self.num_heads, self.num_kv_heads, self.head_dim = (
            args.num_heads,
            args.num_kv_heads,
            args.head_dim,
        )
        self.sliding_window = args.sliding_window
        self.q_size = args.num_heads * args.head_dim
        self.kv_size = args.num_kv_heads * args.head_dim
        self.qkv_proj = LoRALinear(
            args.hidden_size, (self.q_size, self.kv_size, self.kv_size), bias=args.attention_bias
        )
        self.o_proj = LoRALinear(self.q_size, (args.hidden_size,), bias=args.o_proj_bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        ctx: StepContext,
        gather: KeyGather | None = None,
    ) -> torch.Tensor:
        """x [T, hidden]; caches [num_blocks * block_size, kv_heads, head_dim]; ``gather``:
        a decode step's keys for the torch attention path (``CausalLM.forward``)."""
        t = x.shape[0]
        q, k, v = self.qkv_proj(x, ctx).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(t, self.num_heads, self.head_dim)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k_cache.index_copy_(0, ctx.slot_mapping, k.to(k_cache.dtype))
        v_cache.index_copy_(0, ctx.slot_mapping, v.to(v_cache.dtype))

        b, max_q = ctx.num_seqs, ctx.max_query_len
        if max_q == 1:  # decode: one query per sequence, keys read in place from the cache
            out = paged_decode_attention(
                q,
                k_cache,
                v_cache,
                ctx.block_tables,
                ctx.context_lens,
                ctx.block_size,
                self.sliding_window,
                gather,
            )
            return self.o_proj(out.reshape(t, self.num_heads * self.head_dim), ctx)
        qp = q.new_zeros(b * max_q, self.num_heads, self.head_dim)
        qp.index_copy_(0, ctx.query_pad_index, q)
        qp = qp.view(b, max_q, self.num_heads, self.head_dim).transpose(1, 2)
        gather_shape = (b, -1, self.num_kv_heads, self.head_dim)
        flat_index = ctx.kv_gather_index.view(-1)
        keys = k_cache.index_select(0, flat_index).view(gather_shape).transpose(1, 2)
        values = v_cache.index_select(0, flat_index).view(gather_shape).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            qp, keys, values, attn_mask=ctx.attn_mask, enable_gqa=True
        )  # [B, heads, max_q, d]
        out = out.transpose(1, 2).reshape(b * max_q, self.num_heads * self.head_dim)
        return self.o_proj(out.index_select(0, ctx.query_pad_index), ctx)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        h, i = args.hidden_size, args.intermediate_size
        self.gate_up_proj = LoRALinear(h, (i, i), bias=args.mlp_bias)
        self.down_proj = LoRALinear(i, (h,), bias=args.mlp_bias)

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        gate, up = self.gate_up_proj(x, ctx).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up, ctx)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(
        self, x, cos, sin, k_cache, v_cache, ctx: StepContext, gather: KeyGather | None = None
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, k_cache, v_cache, ctx, gather)
        return x + self.mlp(self.post_attention_layernorm(x), ctx)


def fused_slot(layer: nn.Module, hf_name: str) -> tuple[LoRALinear, int]:
    """The fused linear of ``layer`` holding Hugging Face projection ``hf_name``, and its slice."""
    parent, linear, index = FUSED[hf_name]
    return getattr(getattr(layer, parent), linear), index


class CausalLM(nn.Module):
    """Parameter names follow Hugging Face's, except that q/k/v and gate/up projections are
    fused (``qkv_proj``, ``gate_up_proj``; see ``FUSED``): the loader places their rows."""

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

    def lora_linears(self) -> dict[tuple[int, str], tuple[LoRALinear, int]]:
        """(layer index, Hugging Face module name) -> (fused projection, slice index)."""
        found: dict[tuple[int, str], tuple[LoRALinear, int]] = {}
        for i, layer in enumerate(self.model.layers):
            for name in LORA_TARGETS:
                found[(i, name)] = fused_slot(layer, name)
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
        gather = self._key_gather(ctx, x.device)
        for layer, (k_cache, v_cache) in zip(self.model.layers, kv_caches, strict=True):
            x = layer(x, cos, sin, k_cache, v_cache, ctx, gather)
        return self.model.norm(x.index_select(0, ctx.logits_indices))

    def _key_gather(self, ctx: StepContext, device: torch.device) -> KeyGather | None:
        """Where a decode step's keys sit in the cache, for the torch attention path, once
        for every layer; None where the kernel runs (or the step has prefill chunks)."""
        if ctx.max_query_len != 1 or use_triton(device):
            return None
        window = self.args.sliding_window
        return key_gather(ctx.block_tables, ctx.context_lens, ctx.block_size, window)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
