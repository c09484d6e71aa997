"""The kernel benchmark script: it runs end to end under the interpreter, and refuses
clearly without CUDA (it cannot measure anything meaningful on CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorafleet.kernels import triton_available

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_kernels.py"


def _run(*args: str, script: Path = SCRIPT) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_bench_interpret_smoke_prints_a_table() -> None:
    res = _run("--interpret-smoke", "--dtype", "fp16")
    assert res.returncode == 0, res.stderr
    lines = [line for line in res.stdout.splitlines() if line.startswith("| smoke")]
    # four smoke shapes x (shrink, expand, both), and "both static" for the three decode ones
    assert len(lines) == 4 * 3 + 3
    assert "copy bandwidth" in res.stdout and "--interpret-smoke" in res.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA refusal")
def test_bench_without_cuda_exits_with_a_message() -> None:
    res = _run()
    assert res.returncode == 1
    assert "needs a CUDA GPU" in res.stderr


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_attention_bench_interpret_smoke_prints_a_table() -> None:
    res = _run("--interpret-smoke", script=SCRIPT.with_name("bench_attention.py"))
    assert res.returncode == 0, res.stderr
    rows = [
        line
        for line in res.stdout.splitlines()
        if line.startswith("| 2 x") or line.startswith("| 3 x")
    ]
    assert len(rows) == 2 and "copy bandwidth" in res.stdout
