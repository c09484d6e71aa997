"""The embedded Redis launcher: loopback or unix socket, private folder, persistence."""

from __future__ import annotations

import redis

from lorafleet.producer.redis_server import EmbeddedRedis


def test_loopback_start_stop_cleans_up():
    with EmbeddedRedis() as server:
        assert server.url.startswith("redis://127.0.0.1:")
        assert redis.Redis.from_url(server.url).ping()
        folder = server.data_dir
        config = redis.Redis.from_url(server.url).config_get("*")
        assert config["bind"] == "127.0.0.1" and config["appendonly"] == "no"
        assert config["save"] == ""
    assert not server.running and not folder.exists()


def test_unix_socket_only():
    with EmbeddedRedis(unix_socket=True) as server:
        assert server.url.startswith("unix://")
        r = redis.Redis.from_url(server.url)
        assert r.ping() and r.config_get("port")["port"] == "0"


def test_restart_keeps_port_and_persisted_data(tmp_path):
    server = EmbeddedRedis(persist=True, data_dir=tmp_path / "data").start()
    try:
        url = server.url
        redis.Redis.from_url(url).set("k", "v")
        server.restart()
        assert server.url == url
        assert redis.Redis.from_url(url).get("k") == b"v"
    finally:
        server.stop()
    assert (tmp_path / "data").is_dir()  # a folder we passed in is never deleted


def test_restart_without_persistence_forgets():
    with EmbeddedRedis() as server:
        redis.Redis.from_url(server.url).set("k", "v")
        server.restart()
        assert redis.Redis.from_url(server.url).get("k") is None
