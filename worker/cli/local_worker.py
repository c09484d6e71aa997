"""A worker a command starts for itself: its configuration (the ``LORAFLEET_*`` variables
of the environment, then the command's flags) and the local fleet it runs in (an embedded
Redis and the worker process)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lorafleet.worker.settings import WorkerConfig


def add_engine_flags(group: argparse._ArgumentGroup) -> None:
    """The flags sizing a local worker's engine (``dest`` is the ``WorkerConfig`` field)."""
    group.add_argument(
        "--device",
        help="device of the local worker: auto, cpu, cuda, cuda:N (default auto) "
        "[LORAFLEET_DEVICE]",
    )
    group.add_argument(
        "--max-model-len",
        type=int,
        help="prompt + output token limit of the local worker (default: the model's, lowered "
        "to what the KV cache holds) [LORAFLEET_MAX_MODEL_LEN]",
    )
    group.add_argument(
        "--kv-cache-mb",
        type=int,
        help="KV cache of the local worker, MiB (default: sized from the device's memory) "
        "[LORAFLEET_KV_CACHE_MB]",
    )


def model_arg(model: str | None) -> str | None:
    """A ``--model`` value as a worker takes it: a folder made absolute (the worker's
    working directory may differ), a catalog name as it is."""
    if model is None:
        return None
    from lorafleet.worker.catalog import find_model

    path = Path(model).expanduser()
    return model if find_model(model) is not None and not path.is_dir() else str(path.resolve())


def local_worker_config(
    flags: Mapping[str, object], computed: Mapping[str, object]
) -> WorkerConfig:
    """The local worker's configuration: the environment's ``LORAFLEET_*`` variables, then
    ``flags`` (``WorkerConfig`` fields the user typed as flags; problems name the flag),
    then ``computed`` (fields the command derived). None leaves a field to the
    environment. Raises ``ConfigError`` listing every problem."""
    from lorafleet.worker.settings import VARIABLES, WorkerConfig

    variables = {var.field: var for var in VARIABLES}
    environ = dict(os.environ)
    for field, value in {**flags, **computed}.items():
        if value is not None:
            var = variables[field]
            environ[var.env] = os.pathsep.join(value) if var.kind == "paths" else str(value)
    typed = frozenset(f for f, v in flags.items() if v is not None)
    return WorkerConfig.from_env(environ, flags=typed)


@contextmanager
def local_fleet(config: WorkerConfig, *, embedded_redis: bool) -> Iterator[WorkerConfig]:
    """Start (an embedded Redis if asked, then) a worker; yield the configuration clients
    should use; stop both on exit."""
    from lorafleet.producer.redis_server import EmbeddedRedis
    from lorafleet.worker.launcher import WorkerProcess

    with ExitStack() as stack:
        if embedded_redis:
            server = stack.enter_context(EmbeddedRedis())
            config = replace(config, redis_url=server.url)
        worker = stack.enter_context(WorkerProcess(config))
        yield worker.config
