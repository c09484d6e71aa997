"""benchmarks/run_all.py: the GPU suite refuses clearly without CUDA; the CPU rows come out."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

RUN_ALL = Path(__file__).resolve().parents[2] / "benchmarks" / "run_all.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(RUN_ALL), *args], capture_output=True, text=True, timeout=300
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_gpu_suite_stops_at_once_without_cuda(tmp_path):
    proc = _run("--gpu", "--out", str(tmp_path / "rows.md"))
    assert proc.returncode != 0
    assert "--gpu needs a CUDA device" in proc.stderr and "CPU suite" in proc.stderr
    assert not (tmp_path / "rows.md").exists()


@pytest.mark.slow
def test_adapter_section_writes_rows_with_their_command(tmp_path):
    out = tmp_path / "rows.md"
    args = ["--only", "adapters", "--counts", "1,4", "--requests", "16", "--rounds", "1"]
    proc = _run(*args, "--tiers", "2:4,4:4", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith(("| 1 |", "| 4 |"))]
    assert len(rows) == 4  # two adapter counts on each of two engine configurations
    command = (
        "python benchmarks/run_all.py --only adapters --threads 1 --counts 1,4 --requests 16 "
        "--rounds 1 --tiers 2:4,4:4"
    )
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] in ("2 : 4", "4 : 4")
        assert float(cells[2].replace(",", "")) > 0 and cells[4].endswith("x")
        assert cells[-1] == f"`{command}`"
