"""A local fleet: an embedded Redis and a worker process on this machine, for commands that
start their own (``generate --model``, ``loadtest``, ``demo``), tests and benchmarks.

The worker's configuration comes from the ``LORAFLEET_*`` variables of the environment,
overridden by what the command was given (``local_worker_config``).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path

from lorafleet.producer.redis_server import EmbeddedRedis
from lorafleet.worker.local.launcher import WorkerProcess
from lorafleet.worker.model.catalog import find_model
from lorafleet.worker.serve.settings import VARIABLES, WorkerConfig


def model_arg(model: str | None) -> str | None:
    """A ``--model`` value as a worker takes it: a folder made absolute (the worker's
    working directory may differ), a catalog name as it is."""
    if model is None:
        return None
    path = Path(model).expanduser()
    return model if find_model(model) is not None and not path.is_dir() else str(path.resolve())


def local_worker_config(
    flags: Mapping[str, object], computed: Mapping[str, object]
) -> WorkerConfig:
    """The local worker's configuration: the environment's ``LORAFLEET_*`` variables, then
    ``flags`` (``WorkerConfig`` fields the user typed as flags; problems name the flag),
    then ``computed`` (fields the command derived). None leaves a field to the
    environment. Raises ``ConfigError`` listing every problem."""
    variables = {var.field: var for var in VARIABLES}
    environ = dict(os.environ)
    for field, value in {**flags, **computed}.items():
        if value is not None:
            var = variables[field]
            environ[var.env] = os.pathsep.join(value) if var.kind == "paths" else str(value)
    typed = frozenset(f for f, v in flags.items() if v is not None)
    return WorkerConfig.from_env(environ, flags=typed)


@contextmanager
def local_fleet(
    config: WorkerConfig, *, embedded_redis: bool, workers: int = 1
) -> Iterator[WorkerConfig]:
    """Start (an embedded Redis if asked, then) ``workers`` workers on one queue, side by
    side; yield the configuration clients should use (the first worker's); stop them all on
    exit."""
    if workers < 1:
        raise ValueError(f"a local fleet needs at least one worker, got {workers}")
    with ExitStack() as stack:
        if embedded_redis:
            server = stack.enter_context(EmbeddedRedis())
            config = replace(config, redis_url=server.url)
        if workers == 1:
            yield stack.enter_context(WorkerProcess(config)).config
            return
        tag = config.name or f"local-{uuid.uuid4().hex[:6]}"
        processes = [WorkerProcess(replace(config, name=f"{tag}-{i}")) for i in range(workers)]
        for process in processes:
            stack.callback(process.stop)
            process.start()
        for process in processes:  # they load their engines at the same time
            process.wait_ready(timeout=process.ready_timeout)
        yield processes[0].config
