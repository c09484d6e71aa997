"""Ordinary mistakes in a Redis URL get one typed error whose one-line message names the URL
(password masked) and what to do: a malformed URL when the client is created, a Redis
that cannot be used when it connects. Real servers only: the session's redis-server, a
closed port, a socket that speaks HTTP."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator

import pytest

from lorafleet.producer import Client, SyncClient
from lorafleet.producer.client import URL_ENV, _connect_failure
from lorafleet.producer.errors import LoraFleetError, QueueUnavailableError, RedisURLError
from lorafleet.producer.redis_server import free_port

START = f"start Redis or pass --redis-url / set {URL_ENV}"


def _connect_error(url: str | None = None) -> QueueUnavailableError:
    async def connect() -> None:
        async with Client(url, connect_timeout=2):
            pass

    with pytest.raises(QueueUnavailableError) as info:
        asyncio.run(connect())
    assert "\n" not in str(info.value)
    return info.value


@pytest.mark.parametrize("make", [Client, SyncClient])
def test_another_scheme_is_refused_when_the_client_is_made(make):
    with pytest.raises(RedisURLError) as info:
        make("http://user:s3cret@127.0.0.1:38361")
    assert str(info.value) == (
        "Redis URL must start with redis://, rediss:// or unix://, "
        "got 'http://user:***@127.0.0.1:38361'"
    )
    # One error that callers already catch: a bad argument, and a lorafleet error.
    assert isinstance(info.value, ValueError) and isinstance(info.value, LoraFleetError)


@pytest.mark.parametrize(
    "url, message",
    [
        ("localhost:6379", "did you mean 'redis://localhost:6379'?"),
        ("redis://127.0.0.1:port/0", "is not valid: Port could not be cast"),
        ("redis://127.0.0.1:6379/zero", "names database 'zero': a database is a number"),
        ("redis://127.0.0.1:6379/0?socket_timeout=soon", "Invalid value for 'socket_timeout'"),
    ],
)
def test_malformed_urls_are_refused_when_the_client_is_made(url, message):
    with pytest.raises(RedisURLError, match=message):
        Client(url)


def test_nothing_listening(monkeypatch):
    url = f"redis://127.0.0.1:{free_port()}/0"
    assert str(_connect_error(url)) == (
        f"Redis at {url} is unavailable (connection refused): {START}"
    )
    # A URL from the environment says so: the user may not know that it is set.
    monkeypatch.setenv(URL_ENV, url)
    assert f"Redis at {url} (from ${URL_ENV}) is unavailable" in str(_connect_error())


def test_no_unix_socket(tmp_path):
    url = f"unix://{tmp_path}/redis.sock?db=0"
    assert "is unavailable (no such file or directory)" in str(_connect_error(url))


def test_a_database_the_server_does_not_have(redis_server):
    url = redis_server.url.replace("/0", "/99")
    assert str(_connect_error(url)) == (
        f"Redis at {url}: database 99 does not exist on this server (it has 16: 0 to 15)"
    )


def test_a_password_the_server_does_not_take(redis_server):
    url = redis_server.url.replace("redis://", "redis://:s3cret@")
    message = str(_connect_error(url))
    assert "refused the login" in message and "check the user and password" in message
    assert "s3cret" not in message and ":***@" in message


@pytest.fixture
def http_port() -> Iterator[int]:
    """A port that answers like a web server (a Redis URL pointing at the wrong port)."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:  # closed: the test is over
                return
            with conn:
                conn.recv(4096)  # the client's first command
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                conn.recv(4096)  # until the client hangs up

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    server.close()
    thread.join(timeout=5)


def test_a_port_that_is_not_redis(http_port):
    url = f"redis://127.0.0.1:{http_port}/0"
    message = str(_connect_error(url))
    assert message.startswith(f"Redis at {url} does not answer like Redis (")
    assert message.endswith("): check the host and port")


def test_several_addresses_refused_read_as_one_reason():
    """asyncio reports a host with several addresses (localhost on most machines: ::1 and
    127.0.0.1) as one OSError without an errno."""
    error = OSError(
        "Multiple exceptions: [Errno 111] Connect call failed ('::1', 6379, 0, 0), "
        "[Errno 111] Connect call failed ('127.0.0.1', 6379)"
    )
    assert _connect_failure(error) == ("connection refused", START)
