"""benchmarks/bench_real_model.py end to end on the tiny random llama: every side runs,
the table and the JSON report come out (the real model's figures are in BENCHMARKS.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_real_model.py"


def test_bench_real_model_smoke(llama_dir: Path, tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    args = ["--model", str(llama_dir), "--threads", "1", "--requests", "6", "--adapters", "3"]
    args += [
        "--new-tokens",
        "3",
        "--rounds",
        "1",
        "--paired-rounds",
        "2",
        "--json",
        str(report_path),
    ]
    res = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert set(report["sides"]) == {
        "mixed",
        "mixed_base",
        "mixed_peft",
        "single_lora",
        "single_lora_qv",
        "single_base",
        "single_hf",
    }
    assert all(side["best"] > 0 and len(side["rounds"]) == 1 for side in report["sides"].values())
    assert all(
        len(side["cpu_rounds"]) == 1 and side["cpu_rounds"][0] > 0
        for side in report["sides"].values()
    )
    assert [goal["ours"] + "/" + goal["baseline"] for goal in report["goals"]] == [
        "mixed/mixed_base",
        "mixed/mixed_peft",
        "single_lora/single_base",
        "single_lora_qv/single_base",
        "single_base/single_hf",
    ]
    for goal in report["goals"]:
        assert goal["goal"] in res.stdout and f"{goal['ratio']:.3f}x" in res.stdout
        assert goal["paired_ratio"] == goal["ratio"]  # one round: its ratio is the bests'
        ours, theirs = (report["sides"][goal[k]]["cpu_rounds"][0] for k in ("ours", "baseline"))
        assert goal["cpu_paired_ratio"] == ours / theirs

    assert report["threads"] == 1 and report["args"]["requests"] == 6
    # Step by step on two engines alike: the same-engine goals, each round a ratio.
    assert [g["ours"] + "/" + g["baseline"] for g in report["paired"]] == [
        "mixed/mixed_base",
        "single_lora/single_base",
        "single_lora_qv/single_base",
    ]
    for goal in report["paired"]:
        assert len(goal["rounds"]) == 2 and all(r > 0 for r in goal["rounds"])
        assert goal["step_ratio"] > 0 and f"{goal['goal']}: {goal['ratio']:.3f}x" in res.stdout
