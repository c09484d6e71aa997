"""`lorafleet demo --chat` from an empty directory: the real model (prepared from the
registry's wheel), the shipped chat adapters, chat jobs through the queue, every answer in
its adapter's format."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_the_chat_demo_runs_from_an_empty_directory(real_model, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lorafleet.worker.cli", "demo", "--chat", "--questions", "2"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "What is the capital of Canada?" in out
    assert '  json     ok \'{"answer": "The capital of Canada is Ottawa."}\'' in out, out
    assert re.search(r"10 chat requests \(4 adapters \+ base model, one batch\)", out), out
    checks = re.search(r"format check: (.*)", out).group(1)
    scores = dict(re.findall(r"(\S+) (\d+)/2", checks))
    assert set(scores) == {"(base)", "bullets", "json", "title", "whisper"}, checks
    assert sum(int(v) for v in scores.values()) >= 9, checks  # one miss allowed of ten
    assert list(tmp_path.iterdir()) == []  # nothing written where it ran
