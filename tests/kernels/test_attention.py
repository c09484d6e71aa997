"""Paged decode attention: the Triton kernel and the torch reference against float64.

The kernel runs in Triton's interpreter on CPU tensors (the launcher is called directly,
as in ``test_kernels``) and compiled on CUDA (``gpu``). Block tables are shuffled, so a
context's keys sit in scattered cache rows; entries past a context hold other sequences'
blocks, which must not leak in; the cache rows no table names hold garbage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from lorafleet.kernels import attention, triton_available
from lorafleet.kernels.attention import (
    key_gather,
    paged_decode_attention,
    paged_decode_attention_ref,
)

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


@dataclass(frozen=True)
class Case:
    name: str
    dtype: str
    heads: int
    kv_heads: int
    head_dim: int
    block_size: int
    context_lens: tuple[int, ...]
    window: int | None = None

    def __str__(self) -> str:
        return self.name


CASES = [
    Case("mha-fp32", "fp32", 4, 4, 16, 16, (1, 16, 17, 40)),
    Case("gqa2-fp32-window", "fp32", 4, 2, 16, 4, (1, 5, 33, 200), window=7),
    Case("gqa4-bf16-d64", "bf16", 8, 2, 64, 16, (300, 1, 129, 64)),
    Case("gqa8-fp16-d80", "fp16", 8, 1, 80, 16, (90, 257, 3)),
    Case("mqa-bf16-window-long", "bf16", 4, 1, 32, 16, (400, 12), window=100),
    Case("gqa4-fp16-bs8", "fp16", 16, 4, 64, 8, (1, 2, 3, 200, 511)),
]


@dataclass
class Batch:
    case: Case
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    tables: torch.Tensor
    lens: torch.Tensor

    def truth(self) -> torch.Tensor:
        """float64 [B, Hq, D], sequence by sequence and head by head."""
        c = self.case
        group = c.heads // c.kv_heads
        out = torch.zeros(self.q.shape, dtype=torch.float64)
        for b, n in enumerate(c.context_lens):
            first = 0 if c.window is None else max(0, n - c.window)
            pos = torch.arange(first, n)
            rows = self.tables[b, pos // c.block_size].cpu() * c.block_size + pos % c.block_size
            for h in range(c.heads):
                keys = self.k_cache.cpu()[rows, h // group].double()
                values = self.v_cache.cpu()[rows, h // group].double()
                scores = keys @ self.q[b, h].cpu().double() / math.sqrt(c.head_dim)
                out[b, h] = torch.softmax(scores, 0) @ values
        return out


def make_batch(case: Case, device: str = "cpu", seed: int = 0) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    dtype = DTYPES[case.dtype]
    width = max(-(-n // case.block_size) for n in case.context_lens) + 2
    num_blocks = width * len(case.context_lens) + 3
    rows = num_blocks * case.block_size
    k = torch.randn(rows, case.kv_heads, case.head_dim, generator=gen)
    v = torch.randn(rows, case.kv_heads, case.head_dim, generator=gen)
    # Every sequence's blocks come from one shuffled pool; entries past a context name
    # blocks of other sequences (live data the kernel must not read).
    perm = torch.randperm(num_blocks, generator=gen)
    tables = perm[: width * len(case.context_lens)].view(len(case.context_lens), width)
    tables = tables.roll(1, dims=0).clone()
    q = torch.randn(len(case.context_lens), case.heads, case.head_dim, generator=gen)
    return Batch(
        case,
        q.to(dtype).to(device),
        k.to(dtype).to(device),
        v.to(dtype).to(device),
        tables.to(device),
        torch.tensor(case.context_lens).to(device),
    )


def check(batch: Batch, fn) -> None:
    c = batch.case
    out = fn(
        batch.q, batch.k_cache, batch.v_cache, batch.tables, batch.lens, c.block_size, c.window
    )
    assert out.shape == batch.q.shape and out.dtype == batch.q.dtype
    truth = batch.truth()
    err = float((out.cpu().double() - truth).abs().max() / truth.abs().max())
    assert torch.isfinite(out).all() and err <= TOLERANCE[batch.q.dtype], (c.name, err)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_reference_matches_float64(case: Case) -> None:
    check(make_batch(case), paged_decode_attention_ref)


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=str)
def test_kernel_interpreted_matches_float64(case: Case) -> None:
    from lorafleet.kernels.triton_attention import paged_decode_attention_triton

    check(make_batch(case), paged_decode_attention_triton)


def test_dispatch_runs_the_reference_on_cpu(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    check(make_batch(CASES[1]), paged_decode_attention)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_step_key_gather_serves_every_layer(case: Case, monkeypatch) -> None:
    """A decode step builds its ``key_gather`` once; every layer passes it and runs the
    torch path straight away, without consulting the dispatch."""
    batch = make_batch(case)
    gather = key_gather(batch.tables, batch.lens, case.block_size, case.window)

    def no_dispatch(device):
        raise AssertionError("the dispatch ran although the step's gather was given")

    monkeypatch.setattr(attention, "use_triton", no_dispatch)

    def with_gather(q, k_cache, v_cache, tables, lens, block_size, window):
        return paged_decode_attention(q, k_cache, v_cache, tables, lens, block_size, window, gather)

    check(batch, with_gather)


@needs_triton
def test_kernel_rejects_mismatched_shapes() -> None:
    from lorafleet.kernels.triton_attention import paged_decode_attention_triton

    b = make_batch(CASES[0])
    with pytest.raises(ValueError, match="multiple of Hkv"):
        paged_decode_attention_triton(b.q[:, :3], b.k_cache, b.v_cache, b.tables, b.lens, 16)
    with pytest.raises(ValueError, match="context_lens"):
        paged_decode_attention_triton(b.q, b.k_cache, b.v_cache, b.tables, b.lens[:2], 16)


@needs_triton
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_kernel_compiles_for_cuda_without_a_gpu(dtype: str) -> None:
    from lorafleet.kernels.triton_compile_check import compile_attention

    kernel = compile_attention(dtype, head_dim=64, group=4, block_size=16, arch=90)
    assert kernel.asm["cubin"]


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("case", CASES, ids=str)
def test_kernel_compiled_cuda_matches_float64(case: Case) -> None:
    check(make_batch(case, "cuda"), paged_decode_attention)
