"""Shared fixtures: tiny random models and PEFT-format adapters, built once per session."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

# Prepared real models live in the checkout's own cache (git-ignored): prepared once, then
# reused by every run here, and by the worker processes tests start (they inherit it).
os.environ.setdefault(
    "LORAFLEET_CACHE", str(Path(__file__).resolve().parents[1] / ".lorafleet-cache")
)

from lorafleet.producer import LoRARequest


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
