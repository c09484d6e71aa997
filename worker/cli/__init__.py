"""The ``lorafleet`` command, one module per subcommand.

Each command module declares itself: ``NAME``, ``HELP`` (its line in ``lorafleet --help``),
``DESCRIPTION`` (the top of its own ``--help``), ``add_arguments(parser)`` and
``run(args) -> exit status``; ``build_parser`` makes the subparsers from those, so no command
repeats the registration. Building the parser imports the command modules and nothing
heavy: each command imports what it needs when it runs, so ``lorafleet --help`` and the
producer-only commands never load torch. Nothing else in lorafleet imports this package.

A mistake a user can fix (a bad flag value, an unreachable Redis, a model that does not
fit, a missing adapter folder) prints one line, ``lorafleet COMMAND: message``, and exits
with status 2; ``-v`` adds the traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

from lorafleet.worker.cli import (
    demo,
    generate,
    loadtest,
    make_adapters,
    prepare_model,
    quota,
    redis_server,
    usage,
    worker,
)
from lorafleet.worker.cli.errors import is_user_error

COMMANDS = (
    demo,
    prepare_model,
    worker,
    generate,
    redis_server,
    loadtest,
    make_adapters,
    usage,
    quota,
)


def _version() -> str:
    try:
        return version("lorafleet")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorafleet", description="Many LoRA adapters, one base model, a Redis job queue."
    )
    parser.add_argument("--version", action="version", version=f"lorafleet {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        p = sub.add_parser(command.NAME, help=command.HELP, description=command.DESCRIPTION)
        command.add_arguments(p)
        p.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except Exception as e:
        if not is_user_error(e) or getattr(args, "verbose", False):
            raise
        print(f"lorafleet {args.command}: {e}", file=sys.stderr)
        return 2
