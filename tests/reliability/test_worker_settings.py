"""The worker reads a Redis URL exactly as redis-py does for producers; reliability and
security settings are validated; nothing on the wire is pickled; secrets stay out of
messages."""

from __future__ import annotations

import os
import pickle

import msgspec
import pytest
from arq.connections import RedisSettings

from lorafleet.producer.codec import arq_deserialize, arq_serialize
from lorafleet.worker.serve.redis_url import redis_settings_from_url
from lorafleet.worker.serve.settings import ConfigError, WorkerConfig
from lorafleet.worker.serve.worker_settings import build_worker_settings


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    return tmp_path


def test_a_percent_encoded_password_reaches_redis_decoded():
    # arq's own RedisSettings.from_dsn keeps the password encoded, unlike redis-py.
    url = "redis://user:p%40ss%3Aw%2Frd@redis.internal:6380/3"
    assert RedisSettings.from_dsn(url).password == "p%40ss%3Aw%2Frd"
    settings = redis_settings_from_url(url)
    assert (settings.username, settings.password) == ("user", "p@ss:w/rd")
    assert (settings.host, settings.port, settings.database, settings.ssl) == (
        "redis.internal",
        6380,
        3,
        False,
    )


def test_tls_options_in_the_url_are_applied():
    settings = redis_settings_from_url(
        "rediss://:pw@redis.internal:6390/0?ssl_ca_certs=/etc/ca.pem&ssl_check_hostname=true"
        "&ssl_cert_reqs=required&socket_timeout=5"
    )
    assert settings.ssl and settings.ssl_ca_certs == "/etc/ca.pem"
    assert settings.ssl_check_hostname is True and settings.ssl_cert_reqs == "required"
    unix = redis_settings_from_url("unix:///run/redis.sock?db=2")
    assert (unix.unix_socket_path, unix.database) == ("/run/redis.sock", 2)
    with pytest.raises(ValueError, match="unsupported Redis URL option"):
        redis_settings_from_url("redis://localhost/0?sslmode=on")


def test_bad_settings_are_named_and_the_password_is_not(model_dir):
    env = {
        "LORAFLEET_MODEL": str(model_dir),
        "LORAFLEET_REDIS_URL": "http://admin:hunter2@redis:6379",
        "LORAFLEET_HUB": "always",
        "LORAFLEET_HEARTBEAT_TTL": "0.2",
        "LORAFLEET_DRAIN_TIMEOUT": "-1",
        "LORAFLEET_ADAPTER_FAILURE_TTL": "-5",
        "LORAFLEET_MAX_PROMPT_CHARS": "0",
        "LORAFLEET_MAX_ADAPTER_MB": "0",
    }
    with pytest.raises(ConfigError) as info:
        WorkerConfig.from_env(env)
    message = str(info.value)
    assert "hunter2" not in message and "http://admin:***@redis:6379" in message
    for variable in (
        "HUB ",
        "HEARTBEAT_TTL",
        "DRAIN_TIMEOUT",
        "ADAPTER_FAILURE_TTL",
        "MAX_PROMPT_CHARS",
        "MAX_ADAPTER_MB",
    ):
        assert f"LORAFLEET_{variable}" in message
    with pytest.raises(ConfigError, match=r"redis://h/0\?bogus=1.*unsupported"):
        WorkerConfig.create(model=str(model_dir), redis_url="redis://h/0?bogus=1")


def test_the_worker_settings_carry_the_url_and_never_pickle(model_dir):
    config = WorkerConfig.create(
        model=str(model_dir), redis_url="rediss://:s%3Acret@r:6380/1?ssl_ca_certs=/ca.pem"
    )
    settings = build_worker_settings(config)
    redis = settings.redis_settings
    assert (redis.password, redis.ssl, redis.ssl_ca_certs, redis.database) == (
        "s:cret",
        True,
        "/ca.pem",
        1,
    )
    assert settings.job_serializer is arq_serialize and settings.job_deserializer is arq_deserialize
    envelope = {"t": 1, "f": "generate", "a": [b"payload"], "k": {}, "et": 1}
    data = arq_serialize(envelope)
    assert msgspec.msgpack.decode(data) == envelope
    with pytest.raises(pickle.UnpicklingError):
        pickle.loads(data)
    # A pickled envelope is refused, not unpickled.
    with pytest.raises(msgspec.DecodeError):
        arq_deserialize(pickle.dumps(envelope))


def test_the_worker_defaults_protect_the_fleet(model_dir):
    config = WorkerConfig.create(model=str(model_dir))
    engine = config.engine_config()
    assert engine.adapter_roots == () and engine.hub == "off"
    assert config.heartbeat_ttl == 15 and config.drain_timeout == 25
    assert engine.adapter_failure_ttl == 30 and engine.max_adapter_bytes == 2 * 2**30


def test_the_engine_process_leaves_a_core_to_the_event_loop(model_dir):
    cores = len(os.sched_getaffinity(0))
    assert WorkerConfig.create(model=str(model_dir)).engine_config().num_threads == max(
        1, cores - 1
    )
    config = WorkerConfig.from_env(
        {"LORAFLEET_MODEL": str(model_dir), "LORAFLEET_ENGINE_THREADS": "3"}
    )
    assert config.engine_config().num_threads == 3
    with pytest.raises(ConfigError, match="LORAFLEET_ENGINE_THREADS must be >= 1"):
        WorkerConfig.from_env({"LORAFLEET_MODEL": str(model_dir), "LORAFLEET_ENGINE_THREADS": "0"})
