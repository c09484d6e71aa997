"""``lorafleet usage``: the usage ledger per tenant and/or adapter over a period."""

from __future__ import annotations

import argparse

from lorafleet.producer.client import URL_ENV
from lorafleet.worker.cli.errors import UsageError

NAME = "usage"
HELP = "show metered usage per tenant and adapter"
DESCRIPTION = (
    "Read the usage ledger the workers keep in Redis: requests, prompt and completion "
    "tokens, engine and adapter-load seconds per tenant and/or adapter, and the waste "
    "(runs whose result was not delivered) per worker. The period rounds to the "
    "ledger's buckets (hourly by default): a bucket counts if it starts in it."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--since",
        help="start: ISO date/time (UTC unless given), Unix seconds, or ago (30m, 24h, 7d); "
        "default: everything kept",
    )
    p.add_argument("--until", help="end, as --since (default: now)")
    p.add_argument(
        "--by",
        default="tenant,adapter",
        help="group by tenant, adapter or tenant,adapter (default)",
    )
    p.add_argument("--format", default="table", help="table (default), json or csv", dest="fmt")
    p.add_argument("--redis-url", help=f"Redis of the workers [{URL_ENV}]")
    p.add_argument("-v", "--verbose", action="store_true", help="tracebacks with errors")


def run(args: argparse.Namespace) -> int:
    from lorafleet.producer.ledger import check_by, parse_time
    from lorafleet.producer.sync_client import SyncClient
    from lorafleet.producer.usage_report import FORMATS, format_usage

    if args.fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {args.fmt!r}")
    try:
        by = check_by(args.by)
        since = parse_time(args.since, name="--since") if args.since else None
        until = parse_time(args.until, name="--until") if args.until else None
    except ValueError as e:
        raise UsageError(str(e).replace("by must", "--by must")) from None
    if since is not None and until is not None and until <= since:
        raise UsageError("--until must be after --since")
    with SyncClient(args.redis_url) as client:
        report = client.usage(since=since, until=until, by=by)
    print(format_usage(report, args.fmt), end="")
    return 0
