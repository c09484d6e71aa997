"""Observability fixtures: Debian's Prometheus binaries, free ports, the ops/ folder.

Prometheus and promtool come from Debian's ``prometheus`` package (``make setup`` installs
it). Tests that need them skip only where apt-get does not exist either (``make setup``
cannot install them there); on a Debian machine a missing binary is a failure, so CI never
skips them silently.
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import Callable
from pathlib import Path

import pytest


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is not None:
        return path
    if shutil.which("apt-get") is None:
        pytest.skip(f"{name} not found and no apt-get to install Debian's prometheus package")
    pytest.fail(f"{name} not found: run `make setup-ops` (Debian's prometheus package)")


@pytest.fixture(scope="session")
def promtool() -> str:
    return _binary("promtool")


@pytest.fixture(scope="session")
def prometheus_binary() -> str:
    return _binary("prometheus")


@pytest.fixture(scope="session")
def ops_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "ops"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    """Returns a loopback TCP port that is free right now (the OS picks it)."""
    return _free_port
