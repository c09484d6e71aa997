"""Decode attention from the paged KV cache: the Triton kernel against the torch path it
replaced (gather each context's keys into a padded batch, then ``scaled_dot_product_attention``),
on one GPU, in one run.

    python benchmarks/bench_attention.py                 # Llama-3.2-1B heads, bf16
    python benchmarks/bench_attention.py --interpret-smoke   # CPU + Triton interpreter

Per shape (sequences x context length): CUDA-graph-replayed time of both, the kernel's
speed-up, and the bytes it must read at least (each context's keys and values once, plus
q and out) as GB/s and as a share of the measured device-to-device copy bandwidth. Both
are checked against each other before timing.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import DTYPES, bench, copy_bandwidth

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 64, 16  # Llama-3.2-1B
SHAPES = [(1, 512), (16, 512), (64, 512), (256, 256), (256, 512), (256, 2048)]
SMOKE = [(2, 40), (3, 130)]


def inputs(num_seqs: int, context: int, dtype: torch.dtype, device: str):
    blocks = -(-context // BLOCK_SIZE)
    rows = num_seqs * blocks * BLOCK_SIZE
    k = torch.randn(rows, KV_HEADS, HEAD_DIM, dtype=dtype, device=device)
    v = torch.randn_like(k)
    tables = torch.randperm(num_seqs * blocks, device=device).view(num_seqs, blocks)
    # Contexts spread from half to the full length, as a decode batch's are.
    lens = torch.linspace(context // 2, context, num_seqs, device=device).round().long()
    q = torch.randn(num_seqs, HEADS, HEAD_DIM, dtype=dtype, device=device)
    return q, k, v, tables, lens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--interpret-smoke", action="store_true", help="CPU, tiny shapes")
    args = parser.parse_args(argv)
    if args.interpret_smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        device, shapes = "cpu", SMOKE
    elif torch.cuda.is_available():
        device, shapes = "cuda", SHAPES
    else:
        raise SystemExit("bench_attention.py needs a CUDA GPU (or --interpret-smoke)")
    from lorafleet.kernels.attention import paged_decode_attention_ref
    from lorafleet.kernels.triton_attention import paged_decode_attention_triton

    dtype = DTYPES[args.dtype]
    copy_bw = copy_bandwidth(device)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (interpreter; meaningless)"
    print(
        f"# paged decode attention on {name}, {args.dtype}, {HEADS} heads / {KV_HEADS} KV "
        f"heads x {HEAD_DIM}, block {BLOCK_SIZE}; copy bandwidth {copy_bw / 1e9:,.0f} GB/s"
    )
    print(f"# command: python benchmarks/bench_attention.py {' '.join(argv or sys.argv[1:])}")
    print("| seqs x context | kernel us | gather + sdpa us | speed-up | GB/s | % of copy bw |")
    print("|---|---|---|---|---|---|")
    for num_seqs, context in shapes:
        q, k, v, tables, lens = inputs(num_seqs, context, dtype, device)
        call = (q, k, v, tables, lens, BLOCK_SIZE)
        got = paged_decode_attention_triton(*call).float()
        want = paged_decode_attention_ref(*call).float()
        err = float((got - want).abs().max() / want.abs().max())
        if err > (1e-4 if dtype == torch.float32 else 2e-2):
            raise SystemExit(
                f"{num_seqs} x {context}: kernel differs from the torch path ({err:.1e})"
            )
        ours = bench(lambda c=call: paged_decode_attention_triton(*c), device, graph=True)
        torch_s = bench(lambda c=call: paged_decode_attention_ref(*c), device, graph=True)
        moved = 2 * int(lens.sum()) * KV_HEADS * HEAD_DIM * k.element_size() + 2 * q.nbytes
        print(
            f"| {num_seqs} x {context} | {ours * 1e6:,.1f} | {torch_s * 1e6:,.1f} | "
            f"{torch_s / ours:.1f}x | {moved / ours / 1e9:,.0f} | {100 * moved / ours / copy_bw:.0f}% |"
        )
        del q, k, v
        if device == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
