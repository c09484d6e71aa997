"""Run a lorafleet worker as a child process (for the CLI, tests and benchmarks).

The child is ``python -m lorafleet.worker.cli worker`` (or, with ``arq_cli=True``, plain
``python -m arq lorafleet.worker.WorkerSettings``) configured through ``LORAFLEET_*``
variables; its output goes to a log file (a pipe nobody reads would fill up and stall it).
It is ready once it has registered itself in ``lorafleet:workers``, which happens after the
engine has loaded. Importing this module does not import torch.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Self

import redis

from lorafleet.producer.keys import WORKERS_KEY
from lorafleet.worker.model.catalog import CACHE_ENV
from lorafleet.worker.serve.settings import WorkerConfig


class WorkerStartError(RuntimeError):
    """The worker process exited or did not become ready in time."""


class WorkerProcess:
    """A worker child process for ``config`` (a name is assigned if it has none)."""

    def __init__(
        self,
        config: WorkerConfig,
        *,
        log_path: str | Path | None = None,
        arq_cli: bool = False,
        verbose: bool = False,
        ready_timeout: float = 120.0,
    ) -> None:
        self.ready_timeout = ready_timeout  # used by ``with``; loading a model can be slow
        self.config = (
            config if config.name else replace(config, name=f"worker-{uuid.uuid4().hex[:8]}")
        )
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="lorafleet-worker-", suffix=".log")
            os.close(fd)
        self.log_path = Path(log_path)
        self.command = [sys.executable, "-m", "lorafleet.worker.cli", "worker"]
        if arq_cli:
            self.command = [sys.executable, "-m", "arq", "lorafleet.worker.WorkerSettings"]
        if verbose:  # a line per job
            self.command.append("--verbose")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Self:
        # The worker's settings are the config's alone; the cache folder is where this
        # process finds prepared models, so the worker looks there too.
        env = {
            k: v for k, v in os.environ.items() if not k.startswith("LORAFLEET_") or k == CACHE_ENV
        }
        env.update(self.config.to_env())
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self.command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def wait_ready(self, timeout: float = 120.0) -> Self:
        """Block until the worker has registered in Redis. Raises ``WorkerStartError`` with
        the end of its log if it exits first or takes longer than ``timeout``."""
        deadline = time.monotonic() + timeout
        with redis.Redis.from_url(self.config.redis_url, socket_connect_timeout=1) as r:
            while time.monotonic() < deadline:
                if not self.running:
                    raise WorkerStartError(f"the worker exited during start-up:\n{self.log_tail()}")
                try:
                    if r.hexists(WORKERS_KEY, self.config.name):
                        return self
                except (redis.ConnectionError, redis.TimeoutError):
                    pass  # Redis may be starting too; the worker waits for it as well
                time.sleep(0.05)
        raise WorkerStartError(f"the worker was not ready after {timeout:g}s:\n{self.log_tail()}")

    def signal(self, sig: int) -> None:
        if self.running:
            assert self._proc is not None
            self._proc.send_signal(sig)

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM (the worker drains: see ``lorafleet.worker.serve.drain``), then SIGKILL after
        ``timeout`` (default: the drain timeout plus 10 s). Returns the exit code."""
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(self.config.drain_timeout + 10 if timeout is None else timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        return self._proc.returncode

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return "(no log)"

    def __enter__(self) -> Self:
        self.start()
        try:
            return self.wait_ready(timeout=self.ready_timeout)
        except BaseException:
            self.stop()  # a worker that never became ready must not outlive the block
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
