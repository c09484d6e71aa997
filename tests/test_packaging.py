"""The distribution installs under the ``lorafleet.`` namespace, and the producer needs no torch."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_producer_imports_without_torch():
    code = (
        "import sys, lorafleet.producer, lorafleet.producer.codec, lorafleet.worker;"
        "assert 'torch' not in sys.modules, 'producer import pulled in torch'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_built_wheel_layout_and_import(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
    )
    (wheel,) = tmp_path.glob("lorafleet-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for expected in (
        "lorafleet/producer/types.py",
        "lorafleet/worker/engine/llm_engine.py",
        "lorafleet/kernels/meta.py",
    ):
        assert expected in names
    assert not any(n.startswith(("kernels/", "worker/", "producer/", "tests/")) for n in names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    # Isolated interpreter: the wheel's files first, then only third-party packages (the
    # editable install's finder is not loaded, so the import must come from the wheel).
    code = (
        f"import sys; sys.path[:0] = [{str(site)!r}, {sysconfig.get_paths()['purelib']!r}];"
        "import lorafleet.producer, lorafleet.kernels, lorafleet.worker.engine.llm_engine as e;"
        f"assert lorafleet.producer.__file__.startswith({str(site)!r}), lorafleet.producer.__file__;"
        "from lorafleet.producer import LoRARequest; LoRARequest('a', 1, '/p')"
    )
    subprocess.run([sys.executable, "-I", "-c", code], check=True)
