"""``lorafleet worker``: an arq worker, as ``arq lorafleet.worker.WorkerSettings`` runs it,
with every ``LORAFLEET_*`` variable also a flag."""

from __future__ import annotations

import argparse
import os

NAME = "worker"
HELP = "run a worker (same as `arq lorafleet.worker.WorkerSettings`)"
DESCRIPTION = (
    "Run a worker: take jobs from the queue, serve them on one device, until SIGTERM "
    "(which drains). Each flag overrides the LORAFLEET_* variable named with it."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from lorafleet.worker.serve.settings import VARIABLES, default_of

    for var in VARIABLES:
        default = default_of(var)
        shown = "" if default in (None, "", ()) else f"; default {default}"
        p.add_argument(
            var.flag,
            dest=var.field,
            metavar=var.kind.upper(),
            help=f"{var.help} [{var.env}{shown}]".replace("%", "%%"),  # argparse formats it
        )
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="debug logs: a line per job (adapter, tokens, outcome, time)",
    )


def run(args: argparse.Namespace) -> int:
    from arq.worker import run_worker

    from lorafleet.worker.serve.logs import configure_logging
    from lorafleet.worker.serve.settings import VARIABLES, WorkerConfig
    from lorafleet.worker.serve.worker_settings import build_worker_settings

    environ = dict(os.environ)
    typed = set()
    for var in VARIABLES:
        value = getattr(args, var.field)
        if value is not None:
            environ[var.env] = value
            typed.add(var.field)
    config = WorkerConfig.from_env(environ, flags=frozenset(typed))
    configure_logging(args.verbose, config.log_format)
    run_worker(build_worker_settings(config))
    return 0
