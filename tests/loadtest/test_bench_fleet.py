"""benchmarks/bench_fleet.py end to end on a small run: both sides run and report."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_fleet.py"

pytestmark = pytest.mark.slow


def test_a_small_fleet_run_reports_both_sides_and_the_ratios():
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--scenarios", "issue", "--workers", "2",
         "--jobs", "24", "--rate", "20", "--tokens", "2"],
        capture_output=True, text=True, timeout=500,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = proc.stdout
    failed = re.search(r"requests failed\s+(\d+)\s+(\d+)", out)
    assert failed is not None and failed.groups() == ("0", "0"), out
    disk = re.search(r"adapter disk loads \(fleet\)\s+(\d+)\s+(\d+)", out)
    assert disk is not None and all(int(n) >= 1 for n in disk.groups()), out
    assert re.search(r"ratios random/affinity: disk loads [0-9.]+x", out), out
