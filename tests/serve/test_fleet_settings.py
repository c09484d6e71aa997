"""The fleet's settings: defaults, parsing, and errors that name the variable or flag."""

from __future__ import annotations

import pytest

from lorafleet.worker.serve.settings import ConfigError, WorkerConfig


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    return tmp_path


def test_defaults_and_round_trip(model_dir):
    config = WorkerConfig.from_env({"LORAFLEET_MODEL": str(model_dir)})
    assert (config.affinity, config.steal_after, config.prefetch) == (True, 0.5, True)
    assert config.engine_config().prefetch_adapters
    env = {
        "LORAFLEET_MODEL": str(model_dir),
        "LORAFLEET_AFFINITY": "off",
        "LORAFLEET_STEAL_AFTER": "2.5",
        "LORAFLEET_PREFETCH": "0",
    }
    config = WorkerConfig.from_env(env)
    assert (config.affinity, config.steal_after, config.prefetch) == (False, 2.5, False)
    assert not config.engine.prefetch_adapters
    assert WorkerConfig.from_env(config.to_env()) == config


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LORAFLEET_AFFINITY": "sometimes"}, "LORAFLEET_AFFINITY must be 1 or 0"),
        ({"LORAFLEET_STEAL_AFTER": "soon"}, "LORAFLEET_STEAL_AFTER must be a number"),
        ({"LORAFLEET_STEAL_AFTER": "-1"}, "LORAFLEET_STEAL_AFTER must be in [0, heartbeat_ttl"),
        (
            {"LORAFLEET_STEAL_AFTER": "20", "LORAFLEET_HEARTBEAT_TTL": "15"},
            "LORAFLEET_STEAL_AFTER must be in [0, heartbeat_ttl (15)] seconds, got 20.0",
        ),
        ({"LORAFLEET_PREFETCH": "2"}, "LORAFLEET_PREFETCH must be 1 or 0"),
    ],
)
def test_bad_values_name_the_variable(model_dir, env, message):
    with pytest.raises(ConfigError) as err:
        WorkerConfig.from_env({"LORAFLEET_MODEL": str(model_dir), **env})
    assert message in str(err.value)


def test_a_bad_flag_is_named_as_the_flag(model_dir):
    env = {"LORAFLEET_MODEL": str(model_dir), "LORAFLEET_STEAL_AFTER": "-3"}
    with pytest.raises(ConfigError, match=r"--steal-after must be in \[0"):
        WorkerConfig.from_env(env, flags=frozenset({"steal_after"}))
