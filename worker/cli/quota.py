"""``lorafleet quota``: set and show per-tenant quotas (jobs in flight, tokens per minute)."""

from __future__ import annotations

import argparse
import json

from lorafleet.producer.client import URL_ENV
from lorafleet.worker.cli.errors import UsageError

NAME = "quota"
HELP = "set or show per-tenant quotas"
DESCRIPTION = (
    "Quotas live in Redis and apply at once: a job its tenant's quota refuses gets "
    "quota_exceeded (at submit, or when a worker takes it) and costs nothing. "
    "`lorafleet quota set TENANT --max-in-flight N --tokens-per-minute M` sets limits "
    "(0 in flight: refuse all; --clear NAME removes one); `lorafleet quota show "
    "[TENANT ...]` lists them."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("set", "show"), help="set or show")
    p.add_argument("tenants", nargs="*", metavar="TENANT", help="tenant(s): one for set")
    p.add_argument("--max-in-flight", type=int, help="jobs of the tenant queued or running")
    p.add_argument("--tokens-per-minute", type=int, help="prompt + completion tokens a minute")
    p.add_argument(
        "--clear",
        action="append",
        default=[],
        metavar="LIMIT",
        help="remove a limit: max_in_flight or tokens_per_minute (repeatable)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--redis-url", help=f"Redis of the workers [{URL_ENV}]")
    p.add_argument("-v", "--verbose", action="store_true", help="tracebacks with errors")


def run(args: argparse.Namespace) -> int:
    from lorafleet.producer.quotas import LIMITS
    from lorafleet.producer.sync_client import SyncClient
    from lorafleet.producer.usage import tenant_problem

    for tenant in args.tenants:
        if (problem := tenant_problem(tenant)) is not None:
            raise UsageError(problem)
    if args.action == "set":
        if len(args.tenants) != 1:
            raise UsageError("quota set takes one TENANT")
        limits = {"max_in_flight": args.max_in_flight, "tokens_per_minute": args.tokens_per_minute}
        for name, value in limits.items():
            if value is not None and value < 0:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
        for name in args.clear:
            if name not in LIMITS:
                raise UsageError(f"--clear takes {' or '.join(LIMITS)}, got {name!r}")
        if all(v is None for v in limits.values()) and not args.clear:
            raise UsageError("quota set needs --max-in-flight, --tokens-per-minute or --clear")
    elif args.max_in_flight is not None or args.tokens_per_minute is not None or args.clear:
        raise UsageError("quota show takes no limits (use quota set)")
    with SyncClient(args.redis_url) as client:
        if args.action == "set":
            quotas = [client.set_quota(args.tenants[0], clear=tuple(args.clear), **limits)]
        else:
            quotas = client.quotas(args.tenants or None)
    if args.json:
        print(json.dumps([q.__dict__ for q in quotas]))
        return 0
    if not quotas:
        print("no quotas set")
    for q in quotas:
        shown = [
            f"max_in_flight={q.max_in_flight if q.max_in_flight is not None else 'none'}",
            f"tokens_per_minute={q.tokens_per_minute if q.tokens_per_minute is not None else 'none'}",
        ]
        print(q.tenant, *shown)
    return 0
