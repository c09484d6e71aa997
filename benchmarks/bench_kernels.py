"""Benchmark the Triton LoRA kernels against torch baselines on one GPU, in one run.

    python benchmarks/bench_kernels.py                  # default shapes, bf16, table to stdout
    python benchmarks/bench_kernels.py --dtype fp16 --only decode
    python benchmarks/bench_kernels.py --sweep          # also try a few tile configs per shape
    python benchmarks/bench_kernels.py --interpret-smoke   # CPU, Triton interpreter, tiny shapes

Per shape and op (shrink, expand, both = ``add_lora_slices``, the engine's op, and for
decode shapes *both static*: the same op on the static metadata a CUDA-graph decode step
uses, whose grid covers any adapter mix) it reports the time with eager launches and with
CUDA-graph replays (kernel time without launch overhead, which is what kernels of a few
microseconds are judged by); the bytes the op must move at least (activations and output
once, each active adapter's weights once up to its rank) as GB/s and as a share of the
measured device-to-device copy bandwidth; and the speed-up over a torch gather + bmm
baseline (per-token weight gather, the naive mixed-adapter LoRA) and over the per-slot
loop of the torch reference. Every shape is checked against the reference before timing.

Mixed-rank shapes run twice: with per-slot ranks (S-LoRA: an adapter costs its own rank)
and padded (every adapter run at rank R; its bytes counted at R), so comparing their
times shows what the per-slot rank saves.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lorafleet.kernels import LoRAMeta, lora_expand_ref, lora_shrink_ref

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
GATHER_LIMIT_BYTES = 8 << 30  # the gather baseline materialises [T, N, R] weights


@dataclass(frozen=True)
class Shape:
    """One benchmark batch: ``num_tokens`` tokens spread round-robin over ``num_adapters``
    adapters (``base_frac`` of the tokens use no adapter); per-adapter ranks cycle
    through ``ranks`` (default: all ``rank``)."""

    name: str
    num_tokens: int
    num_adapters: int
    hidden: int
    out_cols: int
    rank: int
    ranks: tuple[int, ...] = ()
    base_frac: float = 0.0
    per_slot_ranks: bool = True
    prefill: bool = False

    def adapter_ranks(self) -> list[int]:
        cycle = self.ranks or (self.rank,)
        return [cycle[i % len(cycle)] for i in range(self.num_adapters)]


def default_shapes() -> list[Shape]:
    """Decode (one token per sequence, T <= 256, H = 4096, r = 16, 1-64 adapters), prefill
    (long runs of tokens per adapter) and mixed ranks with and without per-slot ranks."""
    shapes = []
    for tokens, adapters in [
        (16, 1),
        (16, 16),
        (64, 1),
        (64, 8),
        (64, 64),
        (256, 1),
        (256, 8),
        (256, 64),
    ]:
        shapes.append(Shape(f"decode T={tokens} A={adapters}", tokens, adapters, 4096, 4096, 16))
    shapes.append(Shape("decode T=256 A=64 half base", 256, 64, 4096, 4096, 16, base_frac=0.5))
    mixed = (8, 16, 32, 64)
    shapes.append(Shape("decode T=256 A=64 r<=64 per-slot", 256, 64, 4096, 4096, 64, mixed))
    shapes.append(
        Shape(
            "decode T=256 A=64 r<=64 padded", 256, 64, 4096, 4096, 64, mixed, per_slot_ranks=False
        )
    )
    shapes.append(Shape("decode T=256 A=64 r=64", 256, 64, 4096, 4096, 64))
    for tokens, adapters, rank in [(2048, 4, 16), (2048, 4, 64), (8192, 8, 16)]:
        shapes.append(
            Shape(
                f"prefill T={tokens} A={adapters} r={rank}",
                tokens,
                adapters,
                4096,
                4096,
                rank,
                prefill=True,
            )
        )
    shapes.append(
        Shape("prefill T=2048 A=4 qkv-width N=6144", 2048, 4, 4096, 6144, 16, prefill=True)
    )
    return shapes


def smoke_shapes() -> list[Shape]:
    """Tiny shapes for the interpreter: every code path, meaningless timings."""
    return [
        Shape("smoke decode", 8, 3, 64, 32, 8, base_frac=0.25),
        Shape("smoke mixed per-slot", 8, 4, 64, 32, 16, (1, 8, 16)),
        Shape("smoke mixed padded", 8, 4, 64, 32, 16, (1, 8, 16), per_slot_ranks=False),
        Shape("smoke prefill", 24, 2, 96, 48, 16, prefill=True),
    ]


# --------------------------------------------------------------------------- inputs


@dataclass
class Inputs:
    shape: Shape
    x: torch.Tensor
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    token_slots: torch.Tensor
    meta: LoRAMeta
    buf: torch.Tensor
    out: torch.Tensor
    ranks: list[int] = field(default_factory=list)


def token_slots_for(shape: Shape) -> torch.Tensor:
    """Slot per token: decode round-robin (one token per sequence), prefill in long runs."""
    num_base = int(shape.num_tokens * shape.base_frac)
    lora_tokens = shape.num_tokens - num_base
    if shape.prefill:
        slots = torch.arange(lora_tokens) * shape.num_adapters // max(lora_tokens, 1)
    else:
        slots = torch.arange(lora_tokens) % shape.num_adapters
    slots = torch.cat([slots, torch.full((num_base,), -1)])
    if not shape.prefill:
        slots = slots[torch.randperm(shape.num_tokens, generator=torch.Generator().manual_seed(0))]
    return slots


def make_inputs(shape: Shape, dtype: torch.dtype, device: str) -> Inputs:
    gen = torch.Generator(device=device).manual_seed(0)
    ranks = shape.adapter_ranks()
    s, r, h, n = shape.num_adapters, shape.rank, shape.hidden, shape.out_cols
    x = torch.randn(shape.num_tokens, h, device=device, dtype=dtype, generator=gen)
    lora_a = torch.randn(s, r, h, device=device, dtype=dtype, generator=gen) * h**-0.5
    lora_b = torch.randn(s, n, r, device=device, dtype=dtype, generator=gen) * r**-0.5
    for slot, rank in enumerate(ranks):  # zero padding past each adapter's rank
        lora_a[slot, rank:] = 0
        lora_b[slot, :, rank:] = 0
    token_slots = token_slots_for(shape).to(device)
    slot_ranks = torch.tensor(ranks) if shape.per_slot_ranks and shape.ranks else None
    meta = LoRAMeta.from_token_slots(token_slots, s, slot_ranks=slot_ranks)
    buf = torch.randn(shape.num_tokens, r, device=device, generator=gen)
    out = torch.randn(shape.num_tokens, n, device=device, dtype=dtype, generator=gen)
    return Inputs(shape, x, lora_a, lora_b, token_slots, meta, buf, out, ranks)


# --------------------------------------------------------------------------- traffic model


def min_bytes(inp: Inputs, op: str) -> int:
    """Bytes the op must move at least: each needed byte once, adapters at their rank."""
    shape, meta, e = inp.shape, inp.meta, inp.x.element_size()
    ranks = inp.ranks if shape.per_slot_ranks else [shape.rank] * shape.num_adapters
    active = [s for s, _ in meta.groups]
    lora_tokens = meta.num_lora_tokens
    shrink = (
        lora_tokens * shape.hidden * e  # x rows of adapter tokens
        + sum(ranks[s] for s in active) * shape.hidden * e  # A rows up to each rank
        + shape.num_tokens * shape.rank * 4  # fp32 buffer written
    )
    expand = (
        lora_tokens * shape.rank * 4  # buffer read
        + sum(ranks[s] for s in active) * shape.out_cols * e  # B columns up to each rank
        + 2 * lora_tokens * shape.out_cols * e  # output rows read and written
    )
    return {"shrink": shrink, "expand": expand}.get(op, shrink + expand)


# --------------------------------------------------------------------------- baselines


def gather_bmm_shrink(
    x: torch.Tensor, lora_a: torch.Tensor, token_slots: torch.Tensor
) -> torch.Tensor:
    """Naive mixed-adapter shrink: gather every token's A [T, R, H], then one bmm."""
    idx = token_slots.clamp_min(0)
    buf = torch.bmm(lora_a[idx], x.unsqueeze(2)).squeeze(2).float()
    return buf.masked_fill_((token_slots < 0).unsqueeze(1), 0.0)


def gather_bmm_expand(
    buf: torch.Tensor, lora_b: torch.Tensor, token_slots: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """Naive mixed-adapter expand: gather every token's B [T, N, R], bmm, masked add."""
    idx = token_slots.clamp_min(0)
    delta = torch.bmm(lora_b[idx], buf.to(lora_b.dtype).unsqueeze(2)).squeeze(2)
    keep = (token_slots >= 0).unsqueeze(1)
    return out.add_(
        torch.where(keep, delta, torch.zeros((), dtype=delta.dtype, device=delta.device))
    )


# --------------------------------------------------------------------------- timing


def bench(fn: Callable[[], object], device: str, graph: bool = False) -> float:
    """Median seconds per call.

    CUDA: ``triton.testing.do_bench`` (eager launches; L2 flushed between calls) or, with
    ``graph``, ``do_bench_cudagraph`` (CUDA-graph replays: kernel time without the Python
    and launch overhead that dominates microsecond-scale decode kernels; falls back to eager
    if capture fails). CPU: a plain wall clock (interpreter smoke runs; meaningless).
    """
    if device == "cuda":
        import triton.testing

        if graph:
            try:
                return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e-3
            except Exception as exc:  # e.g. an op that syncs with the host cannot be captured
                print(
                    f"  graph capture failed ({type(exc).__name__}); timing eagerly",
                    file=sys.stderr,
                )
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3
    fn()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def host_time(fn: Callable[[], object], device: str, calls: int = 200) -> float | None:
    """Host seconds per call when calls are issued back to back without waiting: the launch
    overhead that an eager engine pays per op (CUDA only; None elsewhere)."""
    if device != "cuda":
        return None
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls


def same_bytes_copy(num_bytes: int, device: str) -> float:
    """Graph-replayed time of a device copy moving ``num_bytes`` (read + write): the floor
    for an op that must move that many bytes, launch latency included."""
    src = torch.empty(max(num_bytes // 2, 16), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return bench(lambda: dst.copy_(src), device, graph=True)


def copy_bandwidth(device: str) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), from a large tensor copy."""
    numel = (1 << 28) if device == "cuda" else (1 << 20)  # 1 GiB of fp32 on the GPU
    src = torch.empty(numel, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = bench(lambda: dst.copy_(src), device)
    return 2 * src.numel() * src.element_size() / seconds


# --------------------------------------------------------------------------- runs


@dataclass
class Row:
    """One table line; times in seconds, None where not measured."""

    shape: str
    op: str
    eager_s: float | None
    graph_s: float
    bytes: int
    gather_s: float | None = None
    loop_s: float | None = None
    host_s: float | None = None
    copy_s: float | None = None
    config: str = ""


def ops_for(
    inp: Inputs, ops_mod, shrink_cfg=None, expand_cfg=None
) -> dict[str, Callable[[], object]]:
    """The three measured callables for the Triton path on ``inp``."""
    x, a, b, meta, buf, out = inp.x, inp.lora_a, inp.lora_b, inp.meta, inp.buf, inp.out

    def both() -> object:  # the engine's op: shrink and expand through a private buffer
        return ops_mod.add_lora_slices_triton(
            x, [a], [b], meta, out, shrink_config=shrink_cfg, expand_config=expand_cfg
        )

    ops = {
        "shrink": lambda: ops_mod.lora_shrink_triton(x, a, meta, config=shrink_cfg),
        "expand": lambda: ops_mod.lora_expand_triton(buf, b, meta, out, config=expand_cfg),
        "both": both,
    }
    if not inp.shape.prefill:  # decode steps replayed from CUDA graphs use a static meta
        static = LoRAMeta.for_capture(x.shape[0], a.shape[0], x.device)
        static.write(inp.token_slots.tolist(), inp.ranks)
        ops["both static"] = lambda: ops_mod.add_lora_slices_triton(x, [a], [b], static, out)
    return ops


def check_against_reference(inp: Inputs, ops_mod) -> None:
    """Fail loudly before timing anything that computes the wrong thing."""
    tol = 1e-4 if inp.x.dtype == torch.float32 else 2e-2
    got = ops_mod.lora_shrink_triton(inp.x, inp.lora_a, inp.meta)
    want = lora_shrink_ref(inp.x, inp.lora_a, inp.meta)
    err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))
    if err > tol:
        raise SystemExit(f"{inp.shape.name}: shrink differs from the reference (rel err {err:.2e})")
    out_k, out_r = inp.out.clone(), inp.out.clone()
    ops_mod.lora_expand_triton(inp.buf, inp.lora_b, inp.meta, out_k)
    lora_expand_ref(inp.buf, inp.lora_b, inp.meta, out_r)
    err = float((out_k.float() - out_r.float()).abs().max() / out_r.float().abs().max())
    if err > tol:
        raise SystemExit(f"{inp.shape.name}: expand differs from the reference (rel err {err:.2e})")
    want = lora_expand_ref(
        lora_shrink_ref(inp.x, inp.lora_a, inp.meta), inp.lora_b, inp.meta, inp.out.clone()
    )
    for op, fn in ops_for(inp, ops_mod).items():
        if op.startswith("both"):
            saved = inp.out.clone()
            fn()  # adds into inp.out
            got, inp.out[:] = inp.out.clone(), saved
            err = float((got.float() - want.float()).abs().max() / want.float().abs().max())
            if err > tol:
                raise SystemExit(f"{inp.shape.name}: {op} differs from the reference ({err:.2e})")


def gather_fits(inp: Inputs) -> bool:
    s = inp.shape
    return (
        s.num_tokens * max(s.hidden, s.out_cols) * s.rank * inp.x.element_size()
        <= GATHER_LIMIT_BYTES
    )


def run_shape(inp: Inputs, ops_mod, device: str) -> list[Row]:
    """Kernel (eager and graph), gather + bmm (graph) and loop reference (eager) per op."""
    x, a, b, meta, buf, out = inp.x, inp.lora_a, inp.lora_b, inp.meta, inp.buf, inp.out
    slots = inp.token_slots
    gather = {
        "shrink": lambda: gather_bmm_shrink(x, a, slots),
        "expand": lambda: gather_bmm_expand(buf, b, slots, out),
        "both": lambda: gather_bmm_expand(gather_bmm_shrink(x, a, slots), b, slots, out),
    }
    loop = {
        "shrink": lambda: lora_shrink_ref(x, a, meta),
        "expand": lambda: lora_expand_ref(buf, b, meta, out),
        "both": lambda: lora_expand_ref(lora_shrink_ref(x, a, meta), b, meta, out),
    }
    rows = []
    for op, fn in ops_for(inp, ops_mod).items():
        base = op.split()[0]  # "both static" has the baselines of "both"
        rows.append(
            Row(
                inp.shape.name,
                op,
                eager_s=bench(fn, device),
                graph_s=bench(fn, device, graph=True),
                bytes=min_bytes(inp, op),
                gather_s=bench(gather[base], device, graph=True) if gather_fits(inp) else None,
                loop_s=bench(loop[base], device),
                host_s=host_time(fn, device),
                copy_s=same_bytes_copy(min_bytes(inp, op), device),
            )
        )
    return rows


def sweep_shape(inp: Inputs, ops_mod, device: str) -> list[Row]:
    """Try a few tile configs per op (graph timing); one row per op with the fastest."""
    rank_tile = max(16, min(triton_next_pow2(inp.shape.rank), 128))
    shrink_cfgs = [
        ops_mod.ShrinkConfig(bm, rank_tile, bk, sk, num_warps=w)
        for bm in (16, 64)
        for bk in (64, 128, 256)
        for sk in (1, 4, 8, 16)
        for w in (4, 8)
        if not (bm == 64 and bk == 256)
    ]
    expand_cfgs = [
        ops_mod.ExpandConfig(bm, bn, br, num_warps=w)
        for bm in (16, 32, 64)
        for bn in (64, 128, 256)
        for br in (16, 32)
        for w in (4, 8)
    ]
    rows = []
    for op, cfgs, key in (
        ("shrink", shrink_cfgs, "shrink_cfg"),
        ("expand", expand_cfgs, "expand_cfg"),
    ):
        best: tuple[float, object] | None = None
        for cfg in cfgs:
            try:
                seconds = bench(ops_for(inp, ops_mod, **{key: cfg})[op], device, graph=True)
            except Exception as exc:  # out of resources for this tile: skip it
                print(f"  skip {cfg}: {type(exc).__name__}", file=sys.stderr)
                continue
            if best is None or seconds < best[0]:
                best = (seconds, cfg)
        if best is not None:
            rows.append(
                Row(
                    inp.shape.name,
                    f"{op} best",
                    None,
                    best[0],
                    min_bytes(inp, op),
                    config=str(best[1]),
                )
            )
    return rows


def triton_next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def fmt_us(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e6:.1f}"


def print_table(rows: list[Row], copy_bw: float, header: str) -> None:
    """Markdown table; GB/s, bandwidth share and speed-ups use the graph (kernel) times.

    ``copy us``: a graph-replayed device copy of the op's minimum bytes, the floor at that
    size (small decode ops are bound by launch latency, not bandwidth). ``host us``: host
    time per eager call issued back to back (launch overhead)."""
    print(header)
    print(f"Measured device-to-device copy bandwidth: {copy_bw / 1e9:.0f} GB/s\n")
    print(
        "| shape | op | eager us | graph us | GB/s | % copy BW | copy us | gather+bmm us "
        "| vs gather | loop-ref us | vs loop | host us | config |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        gbps = r.bytes / r.graph_s
        vs_gather = "-" if r.gather_s is None else f"{r.gather_s / r.graph_s:.1f}x"
        vs_loop = "-" if r.loop_s is None else f"{r.loop_s / r.graph_s:.1f}x"
        print(
            f"| {r.shape} | {r.op} | {fmt_us(r.eager_s)} | {fmt_us(r.graph_s)} | {gbps / 1e9:.0f} "
            f"| {100 * gbps / copy_bw:.0f}% | {fmt_us(r.copy_s)} | {fmt_us(r.gather_s)} "
            f"| {vs_gather} | {fmt_us(r.loop_s)} | {vs_loop} | {fmt_us(r.host_s)} | {r.config} |"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument(
        "--sweep", action="store_true", help="also search a few tile configs per shape"
    )
    parser.add_argument("--only", default="", help="run shapes whose name contains this text")
    parser.add_argument(
        "--interpret-smoke", action="store_true", help="CPU + Triton interpreter, tiny shapes"
    )
    args = parser.parse_args(argv)

    if args.interpret_smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        device, shapes = "cpu", smoke_shapes()
    else:
        if not torch.cuda.is_available():
            raise SystemExit(
                "bench_kernels.py needs a CUDA GPU (torch.cuda.is_available() is False). "
                "Use --interpret-smoke to exercise the script on CPU."
            )
        device, shapes = "cuda", default_shapes()
    try:
        from lorafleet.kernels import triton_ops
    except ImportError as exc:
        raise SystemExit(f"bench_kernels.py needs triton: {exc}") from exc

    dtype = DTYPES[args.dtype]
    shapes = [s for s in shapes if args.only in s.name]
    copy_bw = copy_bandwidth(device)
    rows: list[Row] = []
    for shape in shapes:
        inp = make_inputs(shape, dtype, device)
        check_against_reference(inp, triton_ops)
        rows += run_shape(inp, triton_ops, device)
        if args.sweep:
            rows += sweep_shape(inp, triton_ops, device)
        del inp
        if device == "cuda":
            torch.cuda.empty_cache()
    name = (
        torch.cuda.get_device_name()
        if device == "cuda"
        else "CPU (Triton interpreter; timings meaningless)"
    )
    import triton

    header = (
        f"# LoRA kernels on {name}, dtype {args.dtype}, torch {torch.__version__}, "
        f"triton {triton.__version__}\n"
        f"# command: python benchmarks/bench_kernels.py {' '.join(argv if argv is not None else sys.argv[1:])}"
    )
    print_table(rows, copy_bw, header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
