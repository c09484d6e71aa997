"""Compile the LoRA kernels to CUDA binaries without a GPU (ahead of time, for checking).

Triton's interpreter accepts programs that a GPU compile rejects (``tl.dot`` tiles under
16, operand dtype mixes), so CPU-only CI lowers the compiled flavour for real GPU targets
here; ``ptxas`` ships inside the triton wheel. Run ``python -m
lorafleet.kernels.triton_compile_check`` to print shared memory, spill counts and the widths
of the async copies per variant.
"""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile

from lorafleet.kernels.tiles import (
    ExpandConfig,
    ShrinkConfig,
    default_expand_config,
    default_shrink_config,
    expand_constexprs,
    shrink_constexprs,
)
from lorafleet.kernels.triton_ops import kernels

_META_PTRS = {
    "sorted_ids_ptr": "*i64",
    "seg_slots_ptr": "*i32",
    "seg_starts_ptr": "*i32",
    "seg_counts_ptr": "*i32",
    "slot_ranks_ptr": "*i32",
}
_DIVISIBLE_INTS = {
    "hidden", "max_rank", "n0", "n1", "n2",
    "stride_xt", "stride_as", "stride_ar", "stride_os", "stride_ot",
    "stride_bs0", "stride_bs1", "stride_bs2", "stride_bn", "stride_ws", "stride_wt",
    "stride_ok", "stride_wk",
}  # fmt: skip
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_SHAPES = {"decode": (4, 64), "prefill": (512, 4)}  # (tokens per segment, segments)


@dataclass(frozen=True)
class Variant:
    """One specialisation of a kernel as a launch on a GPU would produce it."""

    name: str
    kernel: str  # "shrink" | "expand"
    dtype: str  # activations and weights: "fp16" | "bf16" | "fp32"
    buf_dtype: str  # shrink output / expand input
    config: ShrinkConfig | ExpandConfig
    num_partials: int = 1  # the engine's add_lora_slices: split-K partial buffers


def heuristic_variants(
    dtypes: Sequence[str] = ("fp16", "bf16", "fp32"),
    ranks: Sequence[int] = (16, 64, 128),
    hidden: int = 4096,
    sm_count: int = 132,
) -> list[Variant]:
    """The tiles the default heuristics pick for decode and prefill batches on an H100."""
    out: list[Variant] = []
    for dt, rank, (shape, (tokens, segments)) in product(dtypes, ranks, _SHAPES.items()):
        elem = _DTYPES[dt].itemsize
        sc = default_shrink_config(
            max_segment_tokens=tokens,
            num_segments=segments,
            num_slices=1,
            hidden=hidden,
            rank=rank,
            elem_size=elem,
            sm_count=sm_count,
            interpret=False,
        )
        ec = default_expand_config(
            max_segment_tokens=tokens, max_cols=hidden, rank=rank, elem_size=elem, interpret=False
        )
        k = sc.split_k
        out.append(Variant(f"shrink-{shape}-r{rank}-{dt}", "shrink", dt, "fp32", sc, k))
        out.append(Variant(f"expand-{shape}-r{rank}-{dt}", "expand", dt, "fp32", ec, k))
        if dt != "fp32" and shape == "decode":  # 16-bit buffer: the native-dot path
            out.append(Variant(f"expand-{shape}-r{rank}-{dt}-{dt}buf", "expand", dt, dt, ec))
    return out


def _signature(fn: Any, ptr_types: dict[str, str], constexprs: dict[str, Any]) -> dict[str, str]:
    sig = {}
    for name in inspect.signature(fn).parameters:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ptr_types:
            sig[name] = ptr_types[name]
        else:
            sig[name] = "fp32" if name == "scale" else "i32"
    return sig


def compile_variant(variant: Variant, arch: int) -> Any:
    """Compile one variant for ``sm_{arch}``; unit strides specialised as a launch does."""
    shrink, expand = kernels(interpret=False)
    dtype, buf_dtype = _DTYPES[variant.dtype], _DTYPES[variant.buf_dtype]
    ptrs = dict(_META_PTRS)
    if variant.kernel == "shrink":
        kernel = shrink
        consts = shrink_constexprs(
            variant.config,
            dtype,
            dtype,
            has_ranks=True,
            interpret=False,
            partials=variant.num_partials > 1,
        )
        ptrs.update({p: "*" + variant.dtype for p in ("x_ptr", "a0_ptr", "a1_ptr", "a2_ptr")})
        ptrs["out_ptr"] = "*" + variant.buf_dtype
        consts.update(stride_xh=1, stride_ah=1, stride_or=1)
    else:
        kernel = expand
        consts = expand_constexprs(
            variant.config,
            buf_dtype,
            dtype,
            has_ranks=True,
            add=True,
            interpret=False,
            num_partials=variant.num_partials,
        )
        ptrs.update({p: "*" + variant.dtype for p in ("b0_ptr", "b1_ptr", "b2_ptr", "out_ptr")})
        ptrs["buf_ptr"] = "*" + variant.buf_dtype
        consts.update(stride_br=1, stride_wr=1, stride_on=1)
    options = {
        "num_warps": consts.pop("num_warps"),
        "num_stages": consts.pop("num_stages"),
        "enable_fp_fusion": True,  # triton 3.9 default, stated to silence its warning
    }
    signature = _signature(kernel.fn, ptrs, consts)
    # As a launch specialises them: torch's allocations are 16-byte aligned, and the
    # heuristic shapes' sizes and strides (H = N = 4096, R in 16/64/128) divide by 16.
    names = list(signature)
    attrs = {
        (names.index(name),): [["tt.divisibility", 16]]
        for name, kind in signature.items()
        if kind.startswith("*") or (kind == "i32" and name in _DIVISIBLE_INTS)
    }
    src = ASTSource(kernel, signature=signature, constexprs=consts, attrs=attrs)
    return compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def compile_attention(dtype: str, head_dim: int, group: int, block_size: int, arch: int) -> Any:
    """Compile the paged decode attention kernel for ``sm_{arch}`` as a launch specialises
    it: pointers and the caches' row strides 16-byte aligned, unit strides along D."""
    from lorafleet.kernels import triton_attention

    fn = triton_attention.kernel(interpret=False)
    consts = triton_attention.attention_constexprs(
        _DTYPES[dtype], group, head_dim, block_size, interpret=False
    )
    options = {
        "num_warps": consts.pop("num_warps"),
        "num_stages": consts.pop("num_stages"),
        "enable_fp_fusion": True,
    }
    ptrs = {p: "*" + dtype for p in ("q_ptr", "k_ptr", "v_ptr", "out_ptr")}
    ptrs.update(tables_ptr="*i64", lens_ptr="*i64")
    signature = _signature(fn.fn, ptrs, consts)
    aligned = {"stride_qb", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh"}
    aligned |= {"stride_ob", "stride_oh"}
    names = list(signature)
    attrs = {
        (names.index(name),): [["tt.divisibility", 16]]
        for name, kind in signature.items()
        if kind.startswith("*") or name in aligned
    }
    src = ASTSource(fn, signature=signature, constexprs=consts, attrs=attrs)
    return compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def async_copy_bytes(kernel: Any) -> dict[int, int]:
    """How many ``cp.async`` global-to-shared copies of each width (bytes) the PTX holds.
    The pipelined K/rank loops load through these: 16-byte copies are the fast path."""
    widths = re.findall(
        r"cp\.async\.\S+ \[[^]]*\], \[[^]]*\], (0x[0-9a-f]+|\d+)", kernel.asm["ptx"]
    )
    counts: dict[int, int] = {}
    for w in widths:
        counts[int(w, 0)] = counts.get(int(w, 0), 0) + 1
    return dict(sorted(counts.items(), reverse=True))


def compile_variants(
    variants: Sequence[Variant] | None = None, archs: Sequence[int] = (90,)
) -> list[tuple[Variant, int, Any]]:
    """Compile every variant for every arch; raises on the first compile error."""
    chosen = heuristic_variants() if variants is None else variants
    return [(v, a, compile_variant(v, a)) for v in chosen for a in archs]


def _resource_usage(cubin: bytes) -> str:
    """Registers / spills as ``cuobjdump -res-usage`` reports them (best effort)."""
    tool = Path(sys.modules["triton"].__file__).parent / "backends/nvidia/bin/cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True)
    match = re.search(r"REG:(\d+).*?STACK:(\d+)", res.stdout)
    return f"regs {match[1]:>3} stack {match[2]:>4}" if match else "regs ?"


def main() -> None:
    for dtype, arch in product(_DTYPES, (80, 90)):
        kernel = compile_attention(dtype, head_dim=64, group=4, block_size=16, arch=arch)
        usage = _resource_usage(kernel.asm["cubin"])
        print(
            f"sm_{arch} attention-decode-d64-g4-{dtype:5s}  shared {kernel.metadata.shared:6d} B"
            f"  {usage}"
        )
    for variant, arch, kernel in compile_variants(archs=(80, 90)):
        usage = _resource_usage(kernel.asm["cubin"])
        copies = " ".join(f"{n}x{b}B" for b, n in async_copy_bytes(kernel).items())
        print(
            f"sm_{arch} {variant.name:32s} {variant.config}  shared {kernel.metadata.shared:6d} B"
            f"  {usage}  cp.async {copies or '-'}"
        )


if __name__ == "__main__":
    main()
