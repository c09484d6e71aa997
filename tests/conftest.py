"""Shared fixtures: tiny random models and PEFT-format adapters, built once per session."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# Prepared real models live in the checkout's own cache (git-ignored): prepared once, then
# reused by every run here, and by the worker processes tests start (they inherit it).
os.environ.setdefault(
    "LORAFLEET_CACHE", str(Path(__file__).resolve().parents[1] / ".lorafleet-cache")
)

from lorafleet.producer import LoRARequest
from lorafleet.worker.serve.settings import WorkerConfig


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    rank: int
    alpha: float
    targets: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    use_rslora: bool = False


# Different ranks and alphas, one rsLoRA, one on q/v only: the engine issue's mix.
ADAPTER_SPECS = (
    AdapterSpec("r4", 4, 8.0),
    AdapterSpec("r8_qv", 8, 16.0, ("q_proj", "v_proj")),
    AdapterSpec("r16_rs", 16, 8.0, use_rslora=True),
    AdapterSpec("r64", 64, 32.0),
    AdapterSpec("r8_mlp", 8, 4.0, ("gate_proj", "up_proj", "down_proj")),
)


def _build_model(root: Path, arch: str) -> Path:
    from lorafleet.worker.demo.synthetic import build_random_model

    overrides: dict = {}
    if arch == "llama":
        # llama3 rope scaling and tied embeddings exercise those code paths.
        overrides = dict(
            tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
    return build_random_model(root / arch, arch, seed=1, **overrides)


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory):
    """arch -> model dir (built lazily, cached for the session)."""
    root = tmp_path_factory.mktemp("models")
    cache: dict[str, Path] = {}

    def get(arch: str = "llama") -> Path:
        if arch not in cache:
            cache[arch] = _build_model(root, arch)
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def llama_dir(model_factory) -> Path:
    return model_factory("llama")


@pytest.fixture(scope="session")
def lorafleet_stdout() -> Callable[..., str]:
    """(*argv) -> what ``lorafleet ARGV`` prints on stdout, run in a child process as
    ``python -m lorafleet.worker.cli``; a non-zero exit raises ``CalledProcessError``."""

    def run(*argv: str) -> str:
        return subprocess.run(
            [sys.executable, "-m", "lorafleet.worker.cli", *argv],
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    return run


@pytest.fixture(scope="session")
def tiny_worker_config(llama_dir) -> Callable[..., WorkerConfig]:
    """(redis_url, adapter_root, suite, **settings) -> the configuration of a CPU worker on
    the tiny llama that may read adapters under ``adapter_root``, on a queue of its own
    (``lorafleet:<suite>:<random>``); ``settings`` add to those or replace them."""

    def make(redis_url: str, adapter_root: Path, suite: str, **settings: Any) -> WorkerConfig:
        values: dict[str, Any] = {
            "model": str(llama_dir),
            "device": "cpu",
            "adapter_roots": (str(adapter_root),),
            "redis_url": redis_url,
            "queue": f"lorafleet:{suite}:{uuid.uuid4().hex[:8]}",
        }
        return WorkerConfig.create(**{**values, **settings})

    return make


@pytest.fixture(scope="session")
def adapter_factory(tmp_path_factory):
    """(model_dir) -> list of (spec, LoRARequest) for ADAPTER_SPECS, cached per model."""
    from lorafleet.worker.demo.synthetic import build_random_adapter

    root = tmp_path_factory.mktemp("adapters")
    cache: dict[Path, list[tuple[AdapterSpec, LoRARequest]]] = {}

    def get(model_dir: Path) -> list[tuple[AdapterSpec, LoRARequest]]:
        if model_dir not in cache:
            made = []
            for i, spec in enumerate(ADAPTER_SPECS):
                path = build_random_adapter(
                    model_dir,
                    root / model_dir.name / spec.name,
                    rank=spec.rank,
                    alpha=spec.alpha,
                    target_modules=spec.targets,
                    use_rslora=spec.use_rslora,
                    seed=100 + i,
                )
                made.append((spec, LoRARequest(spec.name, i + 1, str(path))))
            cache[model_dir] = made
        return cache[model_dir]

    return get
