"""LoRA shrink / expand: Triton kernels and torch reference against a float64 computation.

On CPU the kernels run in Triton's interpreter. The tests call the ``*_triton`` launchers
directly (CPU tensors always run interpreted there), so they force the kernel path without
setting ``TRITON_INTERPRET`` for the whole pytest process, which would slow every other
suite down. The interpreter costs milliseconds per tile op, so most runs use the
interpreter's default config (few, large programs) and the ``small_tiles`` / odd-seed
random runs force 16-wide tiles to exercise the K, rank, token and column tile loops.
``gpu`` tests rerun the cases compiled on CUDA with the production tile heuristics;
``test_kernels_compile_for_cuda_without_a_gpu`` compiles those for sm_80/sm_90 here.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import pytest
import torch

from lorafleet.kernels import (
    LoRAMeta,
    add_lora_slices,
    dispatch,
    lora_expand,
    lora_expand_ref,
    lora_expand_slices,
    lora_expand_slices_ref,
    lora_shrink,
    lora_shrink_ref,
    lora_shrink_slices,
    lora_shrink_slices_ref,
    reference,
    segmented,
    triton_available,
)
from lorafleet.kernels.meta import static_segment_capacity
from lorafleet.kernels.segmented import FusedStacks, add_lora_fused

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def compiled_cuda(test):
    """Marks a test of the compiled kernels: ``gpu``, skipped without CUDA or Triton."""
    return pytest.mark.gpu(needs_cuda(needs_triton(test)))


TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
T = TypeVar("T")


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One mixed-adapter batch: ``seq_lens`` tokens per sequence, sequence i on slot
    ``seq_slots[i]`` (-1 = base model), ``widths`` output columns per slice."""

    name: str
    dtype: str
    rank: int
    hidden: int
    num_slots: int
    seq_slots: tuple[int, ...]
    seq_lens: tuple[int, ...]
    widths: tuple[int, ...] = (48,)
    slot_ranks: tuple[int, ...] | None = None
    gap: int = 0  # spare columns between slices and around them, which must stay untouched
    scale: float = 1.0

    def __str__(self) -> str:
        return self.name


def _decode(n: int, num_slots: int, seed: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """n one-token sequences on random slots, about a quarter without adapter."""
    gen = torch.Generator().manual_seed(seed)
    slots = torch.randint(-1, num_slots, (n,), generator=gen)
    slots[::4] = -1
    return tuple(slots.tolist()), (1,) * n


CASES = [
    Case("r1-fp32-1slot", "fp32", 1, 64, 1, (0, -1, 0), (3, 2, 1)),
    Case("r1-bf16-decode", "bf16", 1, 2049, 4, *_decode(12, 4, 1), widths=(40,)),
    Case("r1-fp16-2slices", "fp16", 1, 256, 2, (1, -1, 0), (2, 1, 5), widths=(32, 32)),
    Case("r8-fp16-qkv", "fp16", 8, 2049, 3, (0, 2, -1, 1), (5, 3, 2, 4), widths=(64, 32, 32)),
    Case("r8-fp32-decode", "fp32", 8, 512, 16, *_decode(24, 16, 2), widths=(24, 24), gap=8),
    Case("r8-bf16-prefill", "bf16", 8, 128, 2, (0, 1, -1), (37, 21, 9), scale=0.5),
    Case("r16-bf16-16slots", "bf16", 16, 256, 16, *_decode(32, 16, 3), widths=(32, 16, 16)),
    Case("r16-fp32-h2049", "fp32", 16, 2049, 5, (4, -1, 2, 0), (3, 2, 6, 1), scale=2.0),
    Case("r16-fp16-gateup", "fp16", 16, 384, 4, (3, 1, -1, 3), (9, 8, 3, 2), widths=(80, 80)),
    Case(
        "r64-bf16-mixed",
        "bf16",
        64,
        2049,
        4,
        (0, 1, 2, 3, -1),
        (2, 3, 1, 2, 2),
        widths=(48, 24),
        slot_ranks=(64, 8, 1, 0),
    ),
    Case("r64-fp32-3slices", "fp32", 64, 320, 3, (2, 0, -1), (4, 7, 3), widths=(32, 16, 16)),
    Case("r64-fp16-decode", "fp16", 64, 192, 8, *_decode(16, 8, 4), slot_ranks=(64, 16, 8, 1) * 2),
    Case("r128-fp16-h2049", "fp16", 128, 2049, 2, (1, -1, 0), (2, 1, 3), widths=(64,)),
    Case(
        "r128-bf16-mixed-qkv",
        "bf16",
        128,
        512,
        6,
        (5, 0, -1, 3),
        (2, 4, 2, 3),
        widths=(64, 32, 32),
        slot_ranks=(128, 8, 16, 33, 1, 64),
        gap=16,
    ),
    Case("r128-fp32-mixed", "fp32", 128, 2049, 3, (0, 2, 1), (2, 2, 3), slot_ranks=(16, 128, 70)),
]

CASE_BY_NAME = {c.name: c for c in CASES}


@dataclass
class Batch:
    """Tensors of one case, plus a float64 ground truth computed token by token."""

    case: Case
    x: torch.Tensor  # [T, H]
    lora_as: list[torch.Tensor]  # n x [S, R, H]
    lora_bs: list[torch.Tensor]  # n x [S, N_i, R]
    token_slots: torch.Tensor  # [T] int64
    meta: LoRAMeta
    offsets: list[int]
    out_cols: int

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.case.dtype]

    def ranks(self) -> list[int]:
        full = [self.case.rank] * self.case.num_slots
        return full if self.case.slot_ranks is None else list(self.case.slot_ranks)

    def shrink_truth(self) -> torch.Tensor:
        """float64 [n, T, R]; zero for slot -1 rows and past each slot's rank."""
        num_tokens, ranks = self.x.shape[0], self.ranks()
        truth = torch.zeros(len(self.lora_as), num_tokens, self.case.rank, dtype=torch.float64)
        for t, s in enumerate(self.token_slots.tolist()):
            if s < 0:
                continue
            r = ranks[s]
            for i, a in enumerate(self.lora_as):
                truth[i, t, :r] = self.case.scale * (
                    a[s, :r].double().cpu() @ self.x[t].double().cpu()
                )
        return truth

    def expand_truth(self, buf: torch.Tensor, out0: torch.Tensor, add: bool) -> torch.Tensor:
        """float64 [T, out_cols] of ``out0`` after the expand of fp32/16-bit ``buf``."""
        truth, ranks = out0.double().cpu().clone(), self.ranks()
        for t, s in enumerate(self.token_slots.tolist()):
            if s < 0:
                continue
            r = ranks[s]
            for i, (b, col) in enumerate(zip(self.lora_bs, self.offsets, strict=True)):
                delta = b[s, :, :r].double().cpu() @ buf[i, t, :r].double().cpu()
                cols = slice(col, col + b.shape[1])
                truth[t, cols] = truth[t, cols] + delta if add else delta
        return truth


def make_batch(case: Case, device: str = "cpu", seed: int = 0) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    dtype = DTYPES[case.dtype]
    slots = [s for s, n in zip(case.seq_slots, case.seq_lens, strict=True) for _ in range(n)]
    token_slots = torch.tensor(slots, dtype=torch.int64)
    num_tokens, num_slices = len(slots), len(case.widths)

    def randn(*shape: int, std: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(dtype).to(device)

    x = randn(num_tokens, case.hidden, std=1.0)
    lora_as = [
        randn(case.num_slots, case.rank, case.hidden, std=case.hidden**-0.5) for _ in case.widths
    ]
    lora_bs = [randn(case.num_slots, n, case.rank, std=case.rank**-0.5) for n in case.widths]
    offsets, col = [], case.gap
    for n in case.widths:
        offsets.append(col)
        col += n + case.gap
    ranks = None if case.slot_ranks is None else torch.tensor(case.slot_ranks)
    meta = LoRAMeta.from_token_slots(token_slots.to(device), case.num_slots, slot_ranks=ranks)
    assert num_slices == len(lora_as)
    return Batch(case, x, lora_as, lora_bs, token_slots, meta, offsets, col)


def rel_err(got: torch.Tensor, truth: torch.Tensor) -> float:
    """max |got - truth| / max |truth| (norm-wise, so near-zero entries do not blow up)."""
    got64 = got.double().cpu()
    assert torch.isfinite(got64).all(), "non-finite values (unwritten poison?)"
    if truth.numel() == 0:
        return 0.0
    return float((got64 - truth).abs().max() / truth.abs().max().clamp_min(1e-30))


def poisoned_out(batch: Batch, add: bool, device: str) -> torch.Tensor:
    """Output prefilled so that missed or stray writes show: adapter rows NaN when
    overwriting (any unwritten element stays NaN), random where the kernel must add or
    must not touch at all."""
    gen = torch.Generator().manual_seed(123)
    out = torch.randn(batch.x.shape[0], batch.out_cols, generator=gen).to(batch.dtype)
    if not add:
        lora_rows = batch.token_slots >= 0
        for b, col in zip(batch.lora_bs, batch.offsets, strict=True):
            out[lora_rows, col : col + b.shape[1]] = float("nan")
    return out.to(device)


def untouched_mask(batch: Batch) -> torch.Tensor:
    """[T, out_cols] bool: elements no expand may write (slot -1 rows, gap columns)."""
    mask = (batch.token_slots < 0)[:, None].expand(-1, batch.out_cols).clone()
    covered = torch.zeros(batch.out_cols, dtype=torch.bool)
    for b, col in zip(batch.lora_bs, batch.offsets, strict=True):
        covered[col : col + b.shape[1]] = True
    return mask | ~covered[None, :]


def check_shrink(batch: Batch, buf: torch.Tensor) -> None:
    truth = batch.shrink_truth()
    assert buf.dtype == torch.float32 and buf.shape == truth.shape
    assert rel_err(buf, truth) <= TOLERANCE[batch.dtype], batch.case.name
    zero_rows = buf.cpu()[:, batch.token_slots < 0]
    assert torch.count_nonzero(zero_rows) == 0, "slot -1 rows must be zero"
    for s, r in enumerate(batch.ranks()):
        rows = buf.cpu()[:, batch.token_slots == s, r:]
        assert torch.count_nonzero(rows) == 0, f"slot {s}: columns past rank {r} must be zero"


def check_expand(
    batch: Batch, buf: torch.Tensor, out0: torch.Tensor, out: torch.Tensor, add: bool
) -> None:
    truth = batch.expand_truth(buf, out0.cpu(), add)
    keep = untouched_mask(batch)
    assert torch.equal(out.cpu()[keep], out0.cpu()[keep]), "wrote rows/columns it must not touch"
    written = ~keep
    assert rel_err(out.cpu()[written], truth[written]) <= TOLERANCE[batch.dtype], batch.case.name


def run_slices(batch: Batch, device: str, shrink_fn, expand_fn, add: bool, **cfg) -> None:
    """Shrink then expand (on a fp32 copy of the true buffer, so each op is judged alone)."""
    x = batch.x.to(device)
    lora_as = [a.to(device) for a in batch.lora_as]
    lora_bs = [b.to(device) for b in batch.lora_bs]
    buf = shrink_fn(x, lora_as, batch.meta, batch.case.scale, **cfg.get("shrink", {}))
    check_shrink(batch, buf)
    exact_buf = batch.shrink_truth().float().to(device)
    out0 = poisoned_out(batch, add, device)
    out = out0.clone()
    ret = expand_fn(
        exact_buf, lora_bs, batch.meta, out, batch.offsets, add, **cfg.get("expand", {})
    )
    assert ret is out
    check_expand(batch, exact_buf, out0, out, add)


# --------------------------------------------------------------------------- reference


@pytest.mark.parametrize("case", CASES, ids=str)
def test_reference_matches_float64(case: Case) -> None:
    batch = make_batch(case)
    for add in (True, False):
        run_slices(batch, "cpu", lora_shrink_slices_ref, lora_expand_slices_ref, add)


@pytest.mark.parametrize("plan", ["dense", "gather", "grouped"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_reference_every_plan_matches_float64(
    case: Case, plan: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each CPU plan, forced on every case (the cost model alone would pick one per case)."""
    monkeypatch.setattr(reference, "_plan", lambda *args: plan)
    batch = make_batch(case)
    for add in (True, False):
        run_slices(batch, "cpu", lora_shrink_slices_ref, lora_expand_slices_ref, add)
        run_single_slice(batch, add)


def run_single_slice(batch: Batch, add: bool) -> None:
    """The single-stack ops on the first slice (cases with one slice and no gaps)."""
    if len(batch.lora_as) != 1 or batch.case.gap:
        return
    buf = lora_shrink_ref(batch.x, batch.lora_as[0], batch.meta, batch.case.scale)
    check_shrink(batch, buf[None])
    exact_buf = batch.shrink_truth().float()
    out0 = poisoned_out(batch, add, "cpu")
    out = out0.clone()
    assert lora_expand_ref(exact_buf[0], batch.lora_bs[0], batch.meta, out, add=add) is out
    check_expand(batch, exact_buf, out0, out, add)


def test_reference_single_slice_and_whole_batch() -> None:
    """Whole-batch fast path (one slot owns every token) agrees with the grouped path."""
    case = Case("whole", "bf16", 8, 96, 2, (1,), (7,), widths=(40,))
    batch = make_batch(case)
    buf = lora_shrink_ref(batch.x, batch.lora_as[0], batch.meta)
    assert rel_err(buf, batch.shrink_truth()[0]) <= 1e-2
    for add in (True, False):
        out0 = poisoned_out(batch, add, "cpu")
        out = out0.clone()
        assert lora_expand_ref(buf, batch.lora_bs[0], batch.meta, out, add=add) is out
        check_expand(batch, buf[None], out0, out, add)


# --------------------------------------------------------------------------- triton (interpreted)


def _triton_ops():
    from lorafleet.kernels import triton_ops

    return triton_ops


def _tiles():
    from lorafleet.kernels import tiles

    return tiles


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=str)
def test_triton_interpreted(case: Case) -> None:
    ops = _triton_ops()
    add = CASES.index(case) % 2 == 0
    run_slices(
        make_batch(case), "cpu", ops.lora_shrink_slices_triton, ops.lora_expand_slices_triton, add
    )


def random_case(seed: int) -> Case:
    """A random mixed batch: 1-16 slots, 1-3 slices, -1 rows, mixed ranks, odd sizes."""
    gen = torch.Generator().manual_seed(1000 + seed)

    def pick(options: Sequence[T]) -> T:
        return options[int(torch.randint(len(options), (1,), generator=gen))]

    def rand(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    rank, num_slots = pick([1, 8, 16, 64, 128]), rand(1, 16)
    num_seqs = rand(1, 10)
    ranks = None
    if rank > 1 and rand(0, 1):
        ranks = tuple(rand(0, rank) for _ in range(num_slots))
    return Case(
        name=f"random{seed}",
        dtype=pick(list(DTYPES)),
        rank=rank,
        hidden=pick([16, 100, 257, 2049]),
        num_slots=num_slots,
        seq_slots=tuple(rand(-1, num_slots - 1) for _ in range(num_seqs)),
        seq_lens=tuple(pick([1, 1, 2, 5, 17]) for _ in range(num_seqs)),
        widths=tuple(pick([16, 24, 96]) for _ in range(rand(1, 3))),
        slot_ranks=ranks,
        gap=pick([0, 3]),
        scale=pick([1.0, 0.25]),
    )


@needs_triton
@pytest.mark.parametrize("seed", range(12))
def test_triton_interpreted_random(seed: int) -> None:
    """Random batches, alternately with the interpreter default and with 16-wide tiles."""
    ops = _triton_ops()
    tiles = _tiles()
    case = random_case(seed)
    cfg = {}
    if seed % 2:
        cfg = {
            "shrink": {"config": tiles.ShrinkConfig(16, 16, 64, split_k=1 + seed % 3)},
            "expand": {"config": tiles.ExpandConfig(16, 16, 16)},
        }
    batch = make_batch(case, seed=seed)
    run_slices(
        batch,
        "cpu",
        ops.lora_shrink_slices_triton,
        ops.lora_expand_slices_triton,
        seed % 4 < 2,
        **cfg,
    )


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=str)
def test_triton_interpreted_small_tiles(case: Case) -> None:
    """16-wide tiles: multi-iteration K and rank loops, several token and column tiles."""
    ops = _triton_ops()
    tiles = _tiles()
    shrink_cfg = tiles.ShrinkConfig(
        block_m=16, block_r=16, block_k=256 if case.hidden > 1024 else 32
    )
    expand_cfg = tiles.ExpandConfig(block_m=16, block_n=16, block_r=16)
    cfg = {"shrink": {"config": shrink_cfg}, "expand": {"config": expand_cfg}}
    add = CASES.index(case) % 2 == 1
    run_slices(
        make_batch(case),
        "cpu",
        ops.lora_shrink_slices_triton,
        ops.lora_expand_slices_triton,
        add,
        **cfg,
    )


@needs_triton
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_triton_split_k_atomics(dtype: str) -> None:
    """The GPU decode config splits H across programs that accumulate with atomics."""
    ops = _triton_ops()
    tiles = _tiles()
    case = Case(f"splitk-{dtype}", dtype, 16, 2049, 3, (0, -1, 2, 1), (2, 1, 3, 1))
    batch = make_batch(case)
    cfg = tiles.ShrinkConfig(block_m=16, block_r=16, block_k=512, split_k=3)
    buf = ops.lora_shrink_slices_triton(batch.x, batch.lora_as, batch.meta, config=cfg)
    check_shrink(batch, buf)


def check_add_lora(batch: Batch, device: str, fn, **config) -> None:
    """``fn`` (an add_lora_slices form) against float64: x A^T B^T added to adapter rows,
    slot -1 rows and gap columns untouched."""
    out0 = poisoned_out(batch, True, device)
    out = out0.clone()
    lora_as = [a.to(device) for a in batch.lora_as]
    lora_bs = [b.to(device) for b in batch.lora_bs]
    x, meta, scale = batch.x.to(device), batch.meta, batch.case.scale
    assert fn(x, lora_as, lora_bs, meta, out, batch.offsets, scale, **config) is out
    check_expand(batch, batch.shrink_truth(), out0, out, True)


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=str)
def test_add_lora_interpreted(case: Case) -> None:
    """Shrink and expand in one call through a private, unzeroed rank buffer; odd cases
    split K into 2 or 3 partial sums that the expand adds on load, on a static meta for
    every third case."""
    ops = _triton_ops()
    tiles = _tiles()
    batch = make_batch(case)
    if CASES.index(case) % 3 == 0:
        batch = static_batch(batch, "cpu")
    config = {}
    if CASES.index(case) % 2:
        k = 2 + CASES.index(case) % 4 // 2
        block_k = 256 if case.hidden > 1024 else 32
        config["shrink_config"] = tiles.ShrinkConfig(16, 16, block_k, split_k=k)
    check_add_lora(batch, "cpu", ops.add_lora_slices_triton, **config)


@pytest.mark.parametrize("case", CASES[:6], ids=str)
def test_add_lora_reference(case: Case) -> None:
    check_add_lora(make_batch(case), "cpu", add_lora_slices)


@compiled_cuda
@pytest.mark.parametrize("case", CASES, ids=str)
def test_add_lora_compiled_cuda(case: Case) -> None:
    ops = _triton_ops()
    batch = make_batch(case, "cuda")
    if CASES.index(case) % 2:
        batch = static_batch(batch, "cuda")
    check_add_lora(batch, "cuda", ops.add_lora_slices_triton)


ON_CPU_AND_CUDA = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda], id="cuda"),
]


@needs_triton
@pytest.mark.parametrize("device", ON_CPU_AND_CUDA)
def test_triton_single_slice_16bit_buffer_and_views(device: str) -> None:
    """Single-slice API, a bf16 buffer (native dot on GPU), strided x and a column view of out."""
    ops = _triton_ops()
    case = Case("views", "bf16", 16, 200, 3, (2, -1, 0), (3, 2, 4), widths=(64,))
    batch = make_batch(case, device)
    wide = torch.zeros(batch.x.shape[0], 2 * case.hidden, dtype=batch.dtype, device=device)
    wide[:, ::2] = batch.x.to(device)
    buf = ops.lora_shrink_triton(wide[:, ::2], batch.lora_as[0].to(device), batch.meta)
    check_shrink(batch, buf[None])
    buf16 = batch.shrink_truth()[0].to(torch.bfloat16).to(device)
    big0 = torch.randn(batch.x.shape[0], 100).to(batch.dtype).to(device)
    big = big0.clone()
    out = big[:, 20:84]
    ops.lora_expand_triton(buf16, batch.lora_bs[0].to(device), batch.meta, out, add=True)
    check_expand(batch, buf16[None], big0[:, 20:84], out, add=True)
    assert torch.equal(big[:, :20], big0[:, :20]) and torch.equal(big[:, 84:], big0[:, 84:])


@needs_triton
def test_triton_more_slices_than_one_launch() -> None:
    """Four slices run as two launches (the kernels take three base pointers)."""
    ops = _triton_ops()
    case = Case("4slices", "fp32", 8, 64, 2, (1, 0, -1), (2, 3, 1), widths=(16, 32, 16, 24), gap=4)
    run_slices(
        make_batch(case), "cpu", ops.lora_shrink_slices_triton, ops.lora_expand_slices_triton, True
    )


@needs_triton
def test_triton_no_adapter_tokens_is_a_no_op() -> None:
    ops = _triton_ops()
    case = Case("none", "fp16", 8, 64, 2, (-1,), (5,))
    batch = make_batch(case)
    buf = ops.lora_shrink_triton(batch.x, batch.lora_as[0], batch.meta)
    assert buf.shape == (5, 8) and torch.count_nonzero(buf) == 0
    out = torch.randn(5, 48).half()
    before = out.clone()
    ops.lora_expand_triton(buf, batch.lora_bs[0], batch.meta, out)
    assert torch.equal(out, before)


@needs_triton
def test_triton_rejects_bad_shapes_and_tiles() -> None:
    ops = _triton_ops()
    tiles = _tiles()
    batch = make_batch(CASES[0])
    with pytest.raises(ValueError, match="H="):
        ops.lora_shrink_triton(batch.x[:, :10], batch.lora_as[0], batch.meta)
    with pytest.raises(ValueError, match="overflows"):
        out = torch.zeros(batch.x.shape[0], 48)
        ops.lora_expand_slices_triton(torch.zeros(1, 6, 1), batch.lora_bs, batch.meta, out, [10])
    with pytest.raises(ValueError, match="tokens"):
        ops.lora_shrink_triton(batch.x[:2], batch.lora_as[0], batch.meta)
    with pytest.raises(ValueError, match="power of two"):
        tiles.ShrinkConfig(block_m=8, block_r=16, block_k=32)


# --------------------------------------------------------------------------- segmented CPU path


def fused_copy(batch: Batch, skipped: Sequence[int] = ()) -> FusedStacks:
    """The batch's stacks in a ``FusedStacks`` (slices back to back). Slots in ``skipped``
    stand for adapters without this projection: 1e30 in the copy, so a path that adds what
    they give fails (weights are finite: a batched step may read them, times zero), and
    zero in the batch, so the float64 truth leaves their rows alone."""
    case = batch.case
    fused = FusedStacks.allocate(case.num_slots, case.rank, case.hidden, case.widths, batch.dtype)
    kept = [s for s in range(case.num_slots) if s not in skipped]
    for mine, theirs in zip(
        fused.lora_as + fused.lora_bs, batch.lora_as + batch.lora_bs, strict=True
    ):
        theirs[list(skipped)] = 0.0
        mine[list(skipped)] = 1e30
        mine[kept] = theirs[kept]
    return fused


def check_fused(batch: Batch, skipped: Sequence[int] = ()) -> None:
    """``add_lora_fused`` against float64, every other row poisoned where it must not write."""
    fused = fused_copy(batch, skipped)
    mask = sum(1 << s for s in range(batch.case.num_slots) if s not in skipped)

    def fn(x, lora_as, lora_bs, meta, out, offsets, scale):
        return add_lora_fused(x, fused, meta, out, mask, scale)

    check_add_lora(batch, "cpu", fn)


def back_to_back(case: Case) -> Case:
    """``case`` with its slices side by side from column 0, as ``FusedStacks`` lays them."""
    return dataclasses.replace(case, gap=0)


# Short segments on consecutive slots (``Batched``): rows slot after slot, as many each;
# padded to the longest, -1 rows around; rows in the reverse order of the slots; slot 1
# between the step's slots 0 and 2 without tokens (batched on padding rows only).
BATCHED_CASES = [
    Case("batched-aligned-fp32", "fp32", 16, 96, 4, (0, 1, 2, 3), (4,) * 4, (48, 16, 16), (16, 8, 16, 4)),
    Case("batched-padded-fp32", "fp32", 8, 64, 4, (-1, 1, 2, 2, 3, -1), (2, 3, 1, 1, 3, 1), (40, 24), (8, 4, 6, 2), scale=0.5),
    Case("batched-reversed-fp32", "fp32", 8, 64, 3, (2, 1, 0), (2, 2, 2), (32,), (8, 3, 8)),
    Case("batched-gap-fp32", "fp32", 8, 64, 3, (0, -1, 2), (3, 1, 3), (24, 24), (8, 8, 4)),
]  # fmt: skip

# Decode and prefill shapes of the engine's CPU path: mixed live ranks (0 and padded ones
# included), -1 rows between adapters, a slot whose tokens are not one run of rows, runs
# longer than BLOCK_DIAGONAL_MAX_TOKENS (one expand per slice), a whole batch on one slot.
FUSED_CASES = [
    Case("single-stream-fp32", "fp32", 16, 576, 8, (5,), (1,), (64, 16, 16), (8,) * 8),
    Case("single-stream-bf16", "bf16", 16, 96, 2, (1,), (1,), (32, 32), (16, 8)),
    Case(
        "decode-mixed-ranks-fp32",
        "fp32",
        16,
        96,
        4,
        (0, 0, -1, 1, 1, 2, 2, 3, -1),
        (1,) * 9,
        (48, 16, 16),
        (16, 8, 0, 3),
    ),
    Case(
        "scattered-groups-fp32",
        "fp32",
        8,
        64,
        3,
        (2, -1, 0, 2, -1, 1, 0),
        (1, 2, 1, 3, 1, 2, 1),
        (40, 24),
        (8, 4, 6),
    ),
    Case("scattered-groups-bf16", "bf16", 8, 64, 3, (1, 0, 1, -1, 2, 1), (2, 1, 1, 1, 2, 3)),
    Case(
        "prefill-long-runs-fp32",
        "fp32",
        16,
        128,
        3,
        (-1, 0, 1, 2),
        (5, 40, 33, 3),
        (64, 32, 32),
        (16, 8, 12),
        scale=0.5,
    ),
    Case("prefill-long-runs-bf16", "bf16", 8, 128, 2, (1, -1, 0), (45, 4, 34), (48, 48), (8, 5)),
    *BATCHED_CASES,
]


@pytest.fixture(params=["block-diagonal", "per-slice"])
def short_expand(request, monkeypatch) -> str:
    """Short segments' expand, either way (``PER_SLICE_MIN_ZEROS`` picks it by the zeros the
    block-diagonal would read: the tests' small shapes would always take one road)."""

    zeros = 0 if request.param == "per-slice" else 1 << 62
    monkeypatch.setattr(segmented, "PER_SLICE_MIN_ZEROS", zeros)
    return request.param


@pytest.mark.parametrize("case", FUSED_CASES + [back_to_back(c) for c in CASES], ids=str)
def test_fused_add_matches_float64(case: Case, short_expand: str) -> None:
    check_fused(make_batch(case))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_fused_add_skips_slots_without_the_projection(dtype: str) -> None:
    """Adapters with different target sets in one batch: slots 1 and 3 hold nothing for this
    projection (bit clear in the mask, huge weights that must add nothing); slot 2 has
    zeros in its second slice (a q/v adapter's k)."""
    case = Case(f"targets-{dtype}", dtype, 16, 96, 4, (3, 0, -1, 1, 2, 0), (2, 1, 1, 3, 2, 1))
    case = dataclasses.replace(case, widths=(48, 16, 16), slot_ranks=(16, 8, 16, 4))
    batch = make_batch(case)
    batch.lora_as[1][2], batch.lora_bs[1][2] = 0.0, 0.0
    check_fused(batch, skipped=(1, 3))


@pytest.mark.parametrize(
    "name, aligned",
    [
        ("batched-aligned-fp32", True),
        ("batched-padded-fp32", False),
        ("batched-reversed-fp32", False),
    ],
)
def test_short_segments_on_consecutive_slots_take_the_batched_road(name: str, aligned: bool):
    """The ``Batched`` cases above do run batched (their results are checked against
    float64 with the others): viewed in place when aligned, gathered otherwise; too much
    padding, or a long segment, sends the step back to one segment at a time."""
    case = next(c for c in FUSED_CASES if c.name == name)
    meta = make_batch(case).meta
    everyone = (1 << case.num_slots) - 1
    plan = segmented.batched(meta, case.rank, everyone, torch.device("cpu"))
    assert plan is not None and (plan.rows is not None) == aligned
    if name == "batched-aligned-fp32":  # slots 0 and 3 alone: half the rows padding
        assert segmented.batched(meta, case.rank, 0b1001, torch.device("cpu")) is None
    long = dataclasses.replace(case, seq_lens=(40,) * len(case.seq_lens))
    assert (
        segmented.batched(make_batch(long).meta, case.rank, everyone, torch.device("cpu")) is None
    )


def test_a_batched_step_adds_nothing_to_a_slot_without_the_projection() -> None:
    """Slots 0, 2 and 3 have weights for the linear, slot 1 (between them, its rows between
    theirs) has none: the step runs batched over the four, viewed in place, and slot 1's
    rows get nothing from its (huge) weights."""
    case = next(c for c in BATCHED_CASES if c.name == "batched-aligned-fp32")
    batch = make_batch(case)
    plan = segmented.batched(batch.meta, case.rank, 0b1101, torch.device("cpu"))
    assert plan is not None and plan.rows is not None and plan.num == 4
    check_fused(batch, skipped=(1,))


def test_fused_stacks_views_alias_the_fused_memory() -> None:
    """``lora_as`` / ``lora_bs`` keep the kernels' shapes and are the fused memory: a slot
    written through them (as the AdapterManager writes) is what the fused views read, and
    the block-diagonal's zeros stay zero."""
    fused = FusedStacks.allocate(3, 8, 20, (12, 4, 4), torch.float32)
    assert [tuple(a.shape) for a in fused.lora_as] == [(3, 8, 20)] * 3
    assert [tuple(b.shape) for b in fused.lora_bs] == [(3, 12, 8), (3, 4, 8), (3, 4, 8)]
    a = [torch.randn(5, 20) for _ in range(3)]
    b = [torch.randn(n, 5) for n in (12, 4, 4)]
    for i in range(3):
        fused.lora_as[i][2, :5], fused.lora_bs[i][2, :, :5] = a[i], b[i]
    views = fused.views(2, 5)
    assert not views.per_slice  # 2 * 20 * 5 block-diagonal zeros: one expand is cheaper
    assert torch.equal(views.a.t(), torch.stack(a, dim=1).reshape(15, 20))  # rows r*n + i
    expected_b = torch.block_diag(*(m.t() for m in b)).view(3, 5, 20).transpose(0, 1)
    assert torch.equal(views.b, expected_b.reshape(15, 20))
    assert all(torch.equal(d, m.t()) for d, m in zip(views.diagonal, b, strict=True))
    assert fused.views(2, 5) is views  # built once per slot and rank


def test_dispatch_runs_the_fused_path_and_checks_its_stacks(monkeypatch) -> None:
    """``add_lora_slices(..., fused=...)`` on CPU tensors takes the segmented path with the
    slot mask, and refuses per-slice stacks that are not the fused stacks' own views."""
    batch = make_batch(FUSED_CASES[2])
    fused = fused_copy(batch)
    calls = []
    real = dispatch.add_lora_fused
    monkeypatch.setattr(dispatch, "add_lora_fused", lambda *a: calls.append(a) or real(*a))

    def fn(x, lora_as, lora_bs, meta, out, offsets, scale):
        return add_lora_slices(
            x,
            fused.lora_as,
            fused.lora_bs,
            meta,
            out,
            offsets,
            scale,
            slot_mask=0b1011,
            fused=fused,
        )

    check_add_lora(batch, "cpu", fn)
    assert len(calls) == 1 and calls[0][4] == 0b1011
    with pytest.raises(ValueError, match="own views"):
        out = torch.zeros(batch.x.shape[0], batch.out_cols)
        add_lora_slices(batch.x, batch.lora_as, batch.lora_bs, batch.meta, out, fused=fused)


def test_lora_linear_on_cpu_takes_the_fused_path() -> None:
    """A CPU ``LoRALinear`` keeps fused stacks and adds through them what the per-slice
    reference adds, skipping slots outside its ``slot_mask``."""
    from lorafleet.worker.model.context import StepContext
    from lorafleet.worker.model.decoder import LoRALinear

    gen = torch.Generator().manual_seed(5)
    linear = LoRALinear(32, (24, 8, 8), bias=False)
    linear.weight.copy_(torch.randn(40, 32, generator=gen))
    linear.allocate_slots(3, 8)
    assert linear.fused is not None and linear.lora_as is linear.fused.lora_as
    for stack in (*linear.lora_as, *linear.lora_bs):
        stack[:2] = torch.randn(stack[:2].shape, generator=gen)
    linear.slot_mask = 0b011
    x = torch.randn(5, 32, generator=gen)
    meta = LoRAMeta.from_token_slots([1, 1, -1, 0, 2], 3, slot_ranks=[8, 6, 8])
    ctx = StepContext(
        positions=None,
        slot_mapping=None,
        logits_indices=None,
        num_seqs=5,
        max_query_len=1,
        block_size=16,
        lora=meta,
    )
    with torch.inference_mode():
        got = linear(x, ctx)
        buf = lora_shrink_slices_ref(x, [a[:2] for a in linear.lora_as], _two_slots(meta))
        want = x @ linear.weight.T
        lora_expand_slices_ref(buf, [b[:2] for b in linear.lora_bs], _two_slots(meta), want)
    torch.testing.assert_close(got, want, **FP32_TOL)


#: float32 against float64 for sums of a few dozen products of unit-scale values.
FP32_TOL = {"rtol": 1e-4, "atol": 1e-4}


def _hot_linear(bias: bool, out_sizes: tuple[int, ...], gen: torch.Generator, merge_after: int = 0):
    """A CPU float32 ``LoRALinear`` (in 48) with 3 slots of rank up to 8, random weights in
    slots 0 and 2 (slot 2 at rank 5, its second slice zero as a q/v adapter's k), slot 1
    empty; and its base weight and bias as loaded, kept apart."""
    from lorafleet.worker.model.decoder import LoRALinear

    linear = LoRALinear(48, out_sizes, bias=bias)
    weight = torch.randn(sum(out_sizes), 48, generator=gen)
    linear.weight.copy_(weight)
    base_bias = torch.randn(sum(out_sizes), generator=gen) if bias else None
    if bias:
        linear.bias.copy_(base_bias)
    linear.allocate_slots(3, 8, merge_after)
    for stack in (*linear.lora_as, *linear.lora_bs):
        stack[0] = torch.randn(stack[0].shape, generator=gen)
    for stack in (linear.lora_as[0], linear.lora_bs[0]):
        stack[2, ..., :5] = torch.randn(stack[2, ..., :5].shape, generator=gen)
    linear.slot_mask = 0b101
    return linear, weight, base_bias


def _hot_truth(linear, weight, bias, x, slot: int, rank: int) -> torch.Tensor:
    """float64 ``x W^T + b + sum_i x A_i^T B_i^T`` for every row on ``slot`` at ``rank``."""
    want = x.double() @ weight.double().T
    if bias is not None:
        want += bias.double()
    parts = [
        x.double() @ a[slot, :rank].double().T @ b[slot, :, :rank].double().T
        for a, b in zip(linear.lora_as, linear.lora_bs, strict=True)
    ]
    return want + torch.cat(parts, dim=1)


def _ctx(meta: LoRAMeta):
    from lorafleet.worker.model.context import StepContext

    return StepContext(None, None, None, meta.num_tokens, 1, 16, meta)


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize(
    "out_sizes", [(40, 8, 8), (64, 64), (24,)], ids=["qkv", "gate-up", "single"]
)
@pytest.mark.parametrize("tokens", [1, 5, 40], ids=["decode", "short", "long"])
def test_lora_linear_hot_slot_matches_float64(bias, out_sizes, tokens, short_expand) -> None:
    """Every row on one slot: the base GEMM with the slot's A under W (``HotSlot``), at the
    slot's live rank, then the expand (block-diagonal or per slice, short or long) equals
    float64; the base path still reads the weight as loaded; a slot rewritten in place is
    read anew, and so is a switch of slot or rank."""
    from lorafleet.kernels.segmented import HotSlot

    gen = torch.Generator().manual_seed(tokens + len(out_sizes))
    linear, weight, base_bias = _hot_linear(bias, out_sizes, gen)
    assert linear.hot is not None and linear.weight.data_ptr() == linear.hot.w_ext.data_ptr()
    x = torch.randn(tokens, 48, generator=gen)
    calls = []
    real = HotSlot.forward
    HotSlot.forward = lambda self, *a: calls.append(a) or real(self, *a)
    try:
        with torch.inference_mode():
            base = linear(x, _ctx(LoRAMeta.from_token_slots([-1] * tokens, 3)))
            torch.testing.assert_close(
                base.double(), _hot_truth(linear, weight, base_bias, x, 1, 0), **FP32_TOL
            )
            for slot, rank in [(0, 8), (2, 5), (0, 8)]:
                meta = LoRAMeta.from_token_slots([slot] * tokens, 3, slot_ranks=[8, 0, rank])
                got = linear(x, _ctx(meta))
                want = _hot_truth(linear, weight, base_bias, x, slot, rank)
                torch.testing.assert_close(got.double(), want, **FP32_TOL)
            linear.lora_as[-1][0] *= -2.0  # the manager writes a slot through these views
            meta = LoRAMeta.from_token_slots([0] * tokens, 3, slot_ranks=[8, 0, 5])
            want = _hot_truth(linear, weight, base_bias, x, 0, 8)
            torch.testing.assert_close(linear(x, _ctx(meta)).double(), want, **FP32_TOL)
    finally:
        HotSlot.forward = real
    assert len(calls) == 4


def test_lora_linear_hot_slot_only_for_one_whole_segment(short_expand: str) -> None:
    """Rows on two slots, one slot and base rows, or one slot and a slot outside the linear's
    mask (whose rows must get nothing) take the segmented path, and agree with float64."""
    from lorafleet.kernels.segmented import HotSlot

    gen = torch.Generator().manual_seed(11)
    linear, weight, _ = _hot_linear(False, (40, 8, 8), gen)
    x = torch.randn(4, 48, generator=gen)
    calls = []
    real = HotSlot.forward
    HotSlot.forward = lambda self, *a: calls.append(a) or real(self, *a)
    try:
        with torch.inference_mode():
            for slots, hot in [
                ([0, 0, 2, 2], False),
                ([0, 0, -1, -1], False),
                ([1, 1, 2, 2], False),
                ([2, 2, 2, 2], True),
            ]:
                calls.clear()
                meta = LoRAMeta.from_token_slots(slots, 3, slot_ranks=[8, 8, 5])
                got = linear(x, _ctx(meta)).double()
                assert bool(calls) == hot, slots
                for row, slot in enumerate(slots):
                    ranks = {0: 8, 2: 5}
                    if slot in ranks:
                        want = _hot_truth(linear, weight, None, x[row : row + 1], slot, ranks[slot])
                    else:  # no adapter, or slot 1: outside the mask, nothing added
                        want = x[row : row + 1].double() @ weight.double().T
                    torch.testing.assert_close(got[row : row + 1], want, **FP32_TOL)
    finally:
        HotSlot.forward = real


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize(
    "out_sizes", [(40, 8, 8), (64, 64), (24,)], ids=["qkv", "gate-up", "single"]
)
def test_lora_linear_merges_a_long_run_on_one_slot(bias, out_sizes) -> None:
    """``merge_after=3``: the third step in a row whose rows all sit on one slot, and every
    step after it, run on W merged with that slot (one GEMM, ``w_merged``) and equal
    float64; a mixed step, a switch of slot or a slot rewritten in place ends the run (the
    unmerged road again, then a new merge of the new contents), but a run back on the slot
    the merged copy holds, unchanged, is merged from its first step; W never changes."""
    gen = torch.Generator().manual_seed(len(out_sizes) + bias)
    linear, weight, base_bias = _hot_linear(bias, out_sizes, gen, merge_after=3)
    hot = linear.hot
    x = torch.randn(2, 48, generator=gen)

    def step(slots: list[int], rank: int = 8) -> bool:
        """One step (a new meta) of ``slots``; whether it ran merged. Checks the output."""
        meta = LoRAMeta.from_token_slots(slots, 3, slot_ranks=[8, 0, 5])
        got = linear(x, _ctx(meta)).double()
        for row, slot in enumerate(slots):
            want = _hot_truth(linear, weight, base_bias, x[row : row + 1], slot, rank)
            torch.testing.assert_close(got[row : row + 1], want, **FP32_TOL)
        return hot.plan is not None and hot.plan[0] is hot.w_merged

    with torch.inference_mode():
        assert [step([0, 0]) for _ in range(5)] == [False, False, True, True, True]
        assert not step([0, 2]) and step([0, 0])  # slot 0's merge is still there: at once
        assert [step([2, 2], rank=5) for _ in range(3)] == [False, False, True]
        assert not step([0, 0]) and not step([0, 0]) and step([0, 0])  # merged again
        linear.lora_bs[0][0] *= -3.0  # the manager writes a slot through these views
        assert [step([0, 0]) for _ in range(3)] == [False, False, True]
        torch.testing.assert_close(linear.weight, weight, rtol=0, atol=0)


def test_lora_linear_never_merges_with_merge_after_zero() -> None:
    gen = torch.Generator().manual_seed(5)
    linear, _, _ = _hot_linear(False, (40, 8, 8), gen)
    x = torch.randn(1, 48, generator=gen)
    with torch.inference_mode():
        for _ in range(20):
            linear(x, _ctx(LoRAMeta.from_token_slots([0], 3, slot_ranks=[8, 0, 5])))
    assert linear.hot.w_merged is None


def _two_slots(meta: LoRAMeta) -> LoRAMeta:
    """``meta`` with slot 2's tokens on no adapter (the linear's mask leaves slot 2 out)."""
    slots = [s if s < 2 else -1 for s in meta.token_slots.tolist()]
    return LoRAMeta.from_token_slots(slots, 2, slot_ranks=meta.slot_ranks_host[:2])


# --------------------------------------------------------------------------- dispatch


def _spy(monkeypatch: pytest.MonkeyPatch, calls: list[str]) -> None:
    ops = _triton_ops()
    for name in (
        "lora_shrink_triton",
        "lora_expand_triton",
        "lora_shrink_slices_triton",
        "lora_expand_slices_triton",
    ):
        real = getattr(ops, name)

        def wrapper(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(ops, name, wrapper)


@needs_triton
@pytest.mark.parametrize("interpret", [False, True])
def test_dispatch_on_cpu(monkeypatch: pytest.MonkeyPatch, interpret: bool) -> None:
    """CPU runs the reference unless TRITON_INTERPRET=1 (read per call) asks for the kernels."""
    calls: list[str] = []
    _spy(monkeypatch, calls)
    monkeypatch.setenv("TRITON_INTERPRET", "1" if interpret else "0")
    case = CASE_BY_NAME["r8-fp16-qkv"]
    batch = make_batch(case)
    buf = lora_shrink(batch.x, batch.lora_as[0], batch.meta)
    check_shrink(
        batch, torch.stack([buf, *lora_shrink_slices(batch.x, batch.lora_as[1:], batch.meta)])
    )
    out0 = poisoned_out(batch, True, "cpu")
    out = out0.clone()
    narrow = out[:, : case.widths[0]]
    lora_expand(buf, batch.lora_bs[0], batch.meta, narrow)
    lora_expand_slices(
        buf[None].expand(2, -1, -1), batch.lora_bs[1:], batch.meta, out, batch.offsets[1:]
    )
    check_expand(batch, buf[None].expand(3, -1, -1), out0, out, True)
    expected = [
        "lora_shrink_triton",
        "lora_shrink_slices_triton",
        "lora_expand_triton",
        "lora_expand_slices_triton",
    ]
    # The single-slice launchers delegate to the slice ones, hence a set.
    assert set(calls) == (set(expected) if interpret else set())


def test_import_and_dispatch_without_triton() -> None:
    """``import lorafleet.kernels`` works without triton; every op falls back to the reference."""
    code = """
import os, sys
sys.modules["triton"] = None  # makes `import triton` raise ImportError
os.environ["TRITON_INTERPRET"] = "1"
import torch
from lorafleet.kernels import LoRAMeta, lora_shrink, lora_expand, triton_available, use_triton
assert not triton_available() and not use_triton(torch.device("cpu"))
meta = LoRAMeta.from_token_slots(torch.tensor([0, -1, 1]), 2)
buf = lora_shrink(torch.ones(3, 4), torch.ones(2, 2, 4), meta)
out = lora_expand(buf, torch.ones(2, 3, 2), meta, torch.zeros(3, 3))
assert out.tolist() == [[8.0] * 3, [0.0] * 3, [8.0] * 3], out
assert "triton" not in sys.modules or sys.modules["triton"] is None
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_meta_slot_ranks() -> None:
    meta = LoRAMeta.from_token_slots(torch.tensor([1, -1, 0]), 3, slot_ranks=[4, 8, 2])
    assert meta.slot_ranks_host == (4, 8, 2) and meta.slot_ranks.dtype == torch.int32
    assert meta.rank_of(1, 6) == 6 and meta.rank_of(2, 6) == 2
    assert LoRAMeta.from_token_slots(torch.tensor([0]), 1).rank_of(0, 16) == 16
    with pytest.raises(ValueError, match=">= 0"):
        LoRAMeta.from_token_slots(torch.tensor([0]), 1, slot_ranks=[-1])


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda])]
)
def test_meta_from_a_host_list_equals_meta_from_a_tensor(device: str) -> None:
    """The engine passes host lists; both forms give the same grouping, dtypes and device."""
    slots = [2, -1, 0, 2, 2, -1, 0, 3]
    a = LoRAMeta.from_token_slots(slots, 4, slot_ranks=[4, 0, 8, 16], device=device)
    b = LoRAMeta.from_token_slots(torch.tensor(slots, device=device), 4, slot_ranks=[4, 0, 8, 16])
    assert a.sorted_token_ids.tolist() == [2, 6, 0, 3, 4, 7, 1, 5]
    assert a.slot_counts.tolist() == [2, 0, 3, 1] and a.slot_starts.tolist() == [0, 2, 2, 5]
    assert a.active_slots.tolist() == [0, 2, 3] and a.slot_ranks.tolist() == [4, 0, 8, 16]
    for name in ("token_slots", "sorted_token_ids", "slot_counts", "slot_starts", "active_slots"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.tolist() == y.tolist() and x.dtype == y.dtype and x.device == y.device, name
        assert x.device.type == device
    assert (a.num_lora_tokens, a.max_segment_tokens, a.num_active, a.num_segments) == (6, 3, 3, 3)
    with pytest.raises(ValueError, match=r"in \[-1, 4\)"):
        LoRAMeta.from_token_slots([0, 4], 4)


def static_batch(batch: Batch, device: str) -> Batch:
    """``batch`` with a static (capture-shaped) meta, first written for another step."""
    case = batch.case
    meta = LoRAMeta.for_capture(batch.x.shape[0], case.num_slots, device)
    meta.write([case.num_slots - 1] * batch.x.shape[0], [case.rank] * case.num_slots)
    meta.write(batch.token_slots.tolist(), batch.ranks())  # rewrites every table in place
    return dataclasses.replace(batch, meta=meta)


def test_static_meta_cuts_segments_and_pads_to_capacity() -> None:
    slots = [2] * 37 + [-1, 0, -1] + [3] * 16
    meta = LoRAMeta.for_capture(len(slots), 4, "cpu")
    assert meta.static and meta.num_segments == static_segment_capacity(56, 4) == 7
    assert meta.seg_counts.tolist() == [0] * 7  # nothing to do until written
    meta.write(slots, [8, 8, 4, 16])
    # slot 0: 1 token; slot 2: 37 tokens in 16 + 16 + 5; slot 3: 16; then empty segments
    assert meta.seg_slots.tolist()[:5] == [0, 2, 2, 2, 3]
    assert meta.seg_counts.tolist() == [1, 16, 16, 5, 16, 0, 0]
    assert meta.seg_starts.tolist()[:5] == [0, 1, 17, 33, 38]
    assert meta.active_slots.tolist() == [0, 2, 3, -1]
    assert meta.slot_ranks.tolist() == [8, 8, 4, 16]
    exact = LoRAMeta.from_token_slots(slots, 4, [8, 8, 4, 16])
    assert meta.sorted_token_ids.tolist() == exact.sorted_token_ids.tolist()
    concrete = meta.concrete()
    assert [(s, idx.tolist()) for s, idx in concrete.groups] == [
        (s, idx.tolist()) for s, idx in exact.groups
    ]
    with pytest.raises(ValueError, match=r"in \[-1, 4\)"):
        meta.write([4] * len(slots), [8] * 4)
    with pytest.raises(ValueError, match="56"):
        meta.write([0], [8] * 4)
    with pytest.raises(ValueError, match="slot_ranks"):
        meta.write(slots, [8] * 3)
    with pytest.raises(ValueError, match="static"):
        exact.write(slots, [8] * 4)


@pytest.mark.parametrize("num_tokens", [1, 5, 16, 17, 64, 255])
@pytest.mark.parametrize("num_slots", [1, 3, 16, 128])
def test_static_segment_capacity_is_enough_for_any_step(num_tokens: int, num_slots: int) -> None:
    """The worst step: as many slots as can be active, every one one token past a segment
    boundary, the rest on one slot."""
    cap = static_segment_capacity(num_tokens, num_slots)
    active = min(num_tokens, num_slots)
    for spread in range(1, active + 1):
        slots = [i % spread for i in range(num_tokens)]
        counts = [slots.count(s) for s in range(spread)]
        assert sum(-(-c // 16) for c in counts) <= cap, (num_tokens, num_slots, spread)


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=str)
def test_triton_interpreted_static_meta(case: Case) -> None:
    """The CUDA-graph form: grids sized for capacity over 16-token segments, per-slot ranks
    read from the device, tables rewritten in place between steps."""
    ops = _triton_ops()
    add = CASES.index(case) % 2 == 1
    batch = static_batch(make_batch(case), "cpu")
    run_slices(batch, "cpu", ops.lora_shrink_slices_triton, ops.lora_expand_slices_triton, add)


@needs_triton
def test_static_meta_on_the_torch_path_reads_the_step_back() -> None:
    case = CASE_BY_NAME["r64-bf16-mixed"]
    batch = static_batch(make_batch(case), "cpu")
    run_slices(batch, "cpu", lora_shrink_slices, lora_expand_slices, True)


# --------------------------------------------------------------------------- GPU compile


@needs_triton
def test_kernels_compile_for_cuda_without_a_gpu() -> None:
    """Lower the compiled flavour to cubin for sm_80 / sm_90 (ptxas ships with triton).

    The interpreter accepts things a GPU compile rejects (dot tiles under 16, dtype mixes
    in ``tl.dot``); this catches them on a machine without a GPU.
    """
    from lorafleet.kernels.triton_compile_check import compile_variants, heuristic_variants

    variants = heuristic_variants(dtypes=("bf16", "fp32"), ranks=(16, 128))
    compiled = compile_variants(variants, archs=(90,))
    compiled += compile_variants(variants[:3], archs=(80,))
    assert len(compiled) == len(variants) + 3
    assert all(kernel.asm["cubin"] for _, _, kernel in compiled)


@needs_triton
def test_per_slot_rank_expand_loads_whole_rank_tiles_16_bytes_wide() -> None:
    """With per-slot ranks, the expand once masked every rank tile against a rank read from
    memory. B's rank axis is contiguous, so that compiled to 4-byte async copies, and the
    kernel ran 1.8x slower than the padded one on an H100 (24.3 vs 13.8 us, BENCHMARKS.md).
    Whole rank tiles must load 16 bytes wide; only a partial last tile is masked."""
    from lorafleet.kernels.triton_compile_check import (
        async_copy_bytes,
        compile_variant,
        heuristic_variants,
    )

    for variant in heuristic_variants(dtypes=("bf16",), ranks=(64,)):
        if variant.kernel == "expand":
            assert 16 in async_copy_bytes(compile_variant(variant, 90)), variant.name


# --------------------------------------------------------------------------- GPU


@compiled_cuda
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("add", [True, False])
def test_triton_compiled_cuda(case: Case, add: bool) -> None:
    ops = _triton_ops()
    run_slices(
        make_batch(case, "cuda"),
        "cuda",
        ops.lora_shrink_slices_triton,
        ops.lora_expand_slices_triton,
        add,
    )


@compiled_cuda
@pytest.mark.parametrize("case", CASES, ids=str)
def test_triton_compiled_cuda_static_meta(case: Case) -> None:
    ops = _triton_ops()
    batch = static_batch(make_batch(case, "cuda"), "cuda")
    run_slices(batch, "cuda", ops.lora_shrink_slices_triton, ops.lora_expand_slices_triton, True)


@compiled_cuda
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_triton_compiled_cuda_decode_shape(dtype: str) -> None:
    """The benchmark's decode shape: 256 one-token sequences over 64 adapters, H=4096, r=16."""
    ops = _triton_ops()
    case = Case(f"decode-{dtype}", dtype, 16, 4096, 64, *_decode(256, 64, 7), widths=(4096,))
    run_slices(
        make_batch(case, "cuda"),
        "cuda",
        ops.lora_shrink_slices_triton,
        ops.lora_expand_slices_triton,
        True,
    )


@compiled_cuda
def test_dispatch_uses_triton_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    _spy(monkeypatch, calls)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    batch = make_batch(CASE_BY_NAME["r16-fp16-gateup"], "cuda")
    buf = lora_shrink(batch.x.cuda(), batch.lora_as[0].cuda(), batch.meta)
    out = torch.zeros(batch.x.shape[0], batch.lora_bs[0].shape[1], dtype=batch.dtype, device="cuda")
    lora_expand(buf, batch.lora_bs[0].cuda(), batch.meta, out)
    # The single-slice entry points delegate to the slices forms, both spied on.
    assert calls == [
        "lora_shrink_triton",
        "lora_shrink_slices_triton",
        "lora_expand_triton",
        "lora_expand_slices_triton",
    ]


@needs_triton
def test_deterministic_mode_turns_atomic_split_k_off() -> None:
    tiles = _tiles()
    kwargs = {
        "max_segment_tokens": 4,
        "num_segments": 8,
        "num_slices": 1,
        "hidden": 4096,
        "rank": 16,
        "elem_size": 2,
        "sm_count": 132,
        "interpret": False,
    }
    assert tiles.default_shrink_config(**kwargs).split_k > 1
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert tiles.default_shrink_config(**kwargs).split_k == 1
        # add_lora_slices' partial sums add in a fixed order: the split stays.
        assert tiles.default_shrink_config(**kwargs, partials=True).split_k > 1
    finally:
        torch.use_deterministic_algorithms(before)
