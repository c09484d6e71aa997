"""Compile the LoRA kernels to CUDA binaries without a GPU (ahead of time, for checking).

Triton's interpreter accepts programs that a GPU compile rejects (``tl.dot`` tiles under
16, operand dtype mixes), so CPU-only CI lowers the compiled flavour for real GPU targets
here; ``ptxas`` ships inside the triton wheel. Run ``python -m
lorafleet.kernels.triton_compile_check`` to print shared memory and spill counts per variant.
"""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile

from lorafleet.kernels.triton_ops import kernels

_META_PTRS = {
    "sorted_ids_ptr": "*i64",
    "slot_counts_ptr": "*i32",
    "slot_starts_ptr": "*i32",
    "active_slots_ptr": "*i32",
    "slot_ranks_ptr": "*i32",
}


@dataclass(frozen=True)
class Variant:
    """One specialisation of a kernel as a launch would produce it."""

    name: str
    kernel: str  # "shrink" | "expand"
    dtype: str  # weights / activations: "fp16" | "bf16" | "fp32"
    buf_dtype: str  # shrink output / expand input
    constexprs: tuple[tuple[str, Any], ...]
    num_warps: int = 4
    num_stages: int = 2


def _shrink(name: str, dtype: str, bm: int, br: int, bk: int, split_k: int) -> Variant:
    upcast, precision = (True, "ieee") if dtype == "fp32" else (False, "tf32")
    consts = dict(
        HAS_RANKS=True,
        SPLIT_K=split_k,
        BLOCK_M=bm,
        BLOCK_R=br,
        BLOCK_K=bk,
        UPCAST=upcast,
        PRECISION=precision,
    )
    return Variant(name, "shrink", dtype, "fp32", tuple(consts.items()))


def _expand(
    name: str, dtype: str, buf: str, bm: int, bn: int, br: int, add: bool = True
) -> Variant:
    upcast = buf != dtype or dtype == "fp32"
    precision = "ieee" if dtype == "fp32" else "tf32"
    consts = dict(
        HAS_RANKS=True,
        ADD=add,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_R=br,
        UPCAST=upcast,
        PRECISION=precision,
    )
    return Variant(name, "expand", dtype, buf, tuple(consts.items()))


def default_variants() -> list[Variant]:
    """Decode and prefill tiles of the default heuristics, every dtype, both dot modes."""
    out: list[Variant] = []
    for dt in ("fp16", "bf16", "fp32"):
        out.append(_shrink(f"shrink-decode-{dt}", dt, 16, 16, 256 if dt != "fp32" else 128, 8))
        out.append(_shrink(f"shrink-prefill-r128-{dt}", dt, 64, 128, 64 if dt != "fp32" else 32, 1))
        out.append(_expand(f"expand-decode-{dt}", dt, "fp32", 16, 128, 16))
        out.append(_expand(f"expand-prefill-{dt}", dt, "fp32", 64, 128, 32, add=False))
    out.append(_expand("expand-native-bf16-buf", "bf16", "bf16", 16, 128, 32))
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
    consts = dict(variant.constexprs)
    ptrs = dict(_META_PTRS)
    if variant.kernel == "shrink":
        kernel = shrink
        ptrs.update({p: "*" + variant.dtype for p in ("x_ptr", "a0_ptr", "a1_ptr", "a2_ptr")})
        ptrs["out_ptr"] = "*" + variant.buf_dtype
        consts.update(stride_xh=1, stride_ah=1, stride_or=1)
    else:
        kernel = expand
        ptrs.update({p: "*" + variant.dtype for p in ("b0_ptr", "b1_ptr", "b2_ptr", "out_ptr")})
        ptrs["buf_ptr"] = "*" + variant.buf_dtype
        consts.update(stride_br=1, stride_wr=1, stride_on=1)
    src = ASTSource(kernel, signature=_signature(kernel.fn, ptrs, consts), constexprs=consts)
    options = {"num_warps": variant.num_warps, "num_stages": variant.num_stages}
    return compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def compile_variants(
    variants: list[Variant] | None = None, archs: tuple[int, ...] = (90,)
) -> list[tuple[Variant, int, Any]]:
    """Compile every variant for every arch; raises on the first compile error."""
    return [(v, a, compile_variant(v, a)) for v in variants or default_variants() for a in archs]


def _resource_usage(cubin: bytes) -> str:
    """Registers / spills as ``cuobjdump -res-usage`` reports them (best effort)."""
    tool = Path(sys.modules["triton"].__file__).parent / "backends/nvidia/bin/cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True)
    match = re.search(r"REG:(\d+).*?STACK:(\d+).*?SHARED:(\d+)", res.stdout)
    return f"regs {match[1]} stack {match[2]}" if match else "regs ?"


def main() -> None:
    for variant, arch, kernel in compile_variants(archs=(80, 90)):
        usage = _resource_usage(kernel.asm["cubin"])
        print(f"sm_{arch} {variant.name:28s} shared {kernel.metadata.shared:6d} B  {usage}")


if __name__ == "__main__":
    main()
