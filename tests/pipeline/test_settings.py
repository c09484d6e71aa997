"""Worker configuration: LORAFLEET_* parsing, validation messages, arq settings."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lorafleet.producer.codec import arq_deserialize, arq_serialize
from lorafleet.worker.engine.config import EngineConfig
from lorafleet.worker.serve.settings import VARIABLES, ConfigError, WorkerConfig
from lorafleet.worker.serve.worker_settings import build_worker_settings


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    return tmp_path


def test_defaults_and_types(model_dir, tmp_path):
    env = {
        "LORAFLEET_MODEL": str(model_dir),
        "LORAFLEET_MAX_LORAS": "8",
        "LORAFLEET_POLL_DELAY": "0.02",
        "LORAFLEET_ADAPTER_ROOTS": f"{tmp_path}:{model_dir}",
        "LORAFLEET_REDIS_URL": "redis://example:6380/2",
        "LORAFLEET_CUDA_GRAPHS": "yes",
        "LORAFLEET_PIPELINED": "0",
    }
    config = WorkerConfig.from_env(env)
    assert config.max_loras == 8 and config.poll_delay == 0.02
    assert config.cuda_graphs and config.engine_config().cuda_graphs
    assert not config.pipelined and not config.engine_config().pipelined
    assert WorkerConfig.from_env({"LORAFLEET_MODEL": str(model_dir)}).pipelined  # default on
    assert config.adapter_roots == (str(tmp_path), str(model_dir))
    assert config.jobs_at_once == 2 * config.max_num_seqs
    assert WorkerConfig.from_env(config.to_env()) == config
    settings = build_worker_settings(config)
    assert settings.max_jobs >= config.max_num_seqs and settings.poll_delay <= 0.05
    assert settings.redis_settings.host == "example" and settings.redis_settings.database == 2
    assert settings.job_serializer is arq_serialize
    assert settings.job_deserializer is arq_deserialize
    assert settings.functions[0].name == "generate"


def test_every_problem_is_reported_at_once(tmp_path):
    env = {
        "LORAFLEET_MODEL": str(tmp_path / "missing"),
        "LORAFLEET_MAX_LORAS": "many",
        "LORAFLEET_DEVICE": "tpu",
        "LORAFLEET_MAX_NUM_SEQS": "16",
        "LORAFLEET_MAX_JOBS": "4",
        "LORAFLEET_ADAPTER_ROOTS": str(tmp_path / "nope"),
        "LORAFLEET_REDIS_URL": "http://localhost",
        "LORAFLEET_CUDA_GRAPHS": "maybe",
    }
    with pytest.raises(ConfigError) as info:
        WorkerConfig.from_env(env)
    message = str(info.value)
    for needle in (
        "LORAFLEET_MAX_LORAS must be an integer, got 'many'",
        "LORAFLEET_MODEL must be an existing model folder",
        "LORAFLEET_DEVICE must be auto, cpu, cuda or cuda:N",
        "LORAFLEET_MAX_JOBS (4) must be >= LORAFLEET_MAX_NUM_SEQS (16)",
        "LORAFLEET_ADAPTER_ROOTS names",
        "LORAFLEET_REDIS_URL must start with redis://",
        "LORAFLEET_CUDA_GRAPHS must be 1 or 0",
    ):
        assert needle in message


def test_missing_model_is_named():
    with pytest.raises(ConfigError, match="LORAFLEET_MODEL is not set"):
        WorkerConfig.from_env({})


def test_engine_config_checks_are_included(model_dir):
    with pytest.raises(ConfigError, match="max_cpu_loras"):
        WorkerConfig.create(model=str(model_dir), max_loras=8, max_cpu_loras=4)


def test_every_variable_has_a_flag_and_a_field():
    # The engine's settings are EngineConfig's own fields (WorkerConfig.engine), declared once.
    fields = set(WorkerConfig.__dataclass_fields__) - {"engine"}
    assert {v.field for v in VARIABLES if v.engine is None} == fields
    assert {v.engine for v in VARIABLES if v.engine} <= set(EngineConfig.__dataclass_fields__)
    assert all(v.env.startswith("LORAFLEET_") and v.flag.startswith("--") for v in VARIABLES)


def test_worker_command_fails_fast_on_bad_flags(model_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "lorafleet.worker.cli", "worker", "--model", str(model_dir),
         "--max-loras", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "--max-loras must be >= 1" in proc.stderr  # the flag typed, not the variable
