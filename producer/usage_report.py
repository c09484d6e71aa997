"""A ``UsageReport`` as text: a ``rich`` table, JSON or CSV (``lorafleet usage --format``)."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime

from lorafleet.producer.ledger import UsageReport, UsageRow, WasteRow

FORMATS = ("table", "json", "csv")
_COUNTS = ("requests", "prompt_tokens", "completion_tokens")
_TIMES = ("engine_us", "adapter_load_us")


def format_usage(report: UsageReport, fmt: str = "table") -> str:
    """``report`` as ``table`` (for people), ``json`` (``UsageReport.as_dict``) or ``csv``
    (one header line, one line per group, then one per worker's waste with ``kind`` waste).
    ``ValueError`` for another format."""
    if fmt == "json":
        return json.dumps(report.as_dict(), indent=2)
    if fmt == "csv":
        return _csv(report)
    if fmt == "table":
        return _table(report)
    raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")


def _when(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _csv(report: UsageReport) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    header = [
        "kind",
        *report.by,
        "worker",
        *_COUNTS,
        "attempts",
        "engine_s",
        "adapter_load_s",
    ]
    writer.writerow(header)

    def seconds(us: int) -> str:
        return f"{us / 1_000_000:.6f}"

    for row in report.rows:
        groups = [getattr(row, name) for name in report.by]
        counts = [getattr(row, name) for name in _COUNTS]
        writer.writerow(
            [
                "usage",
                *groups,
                "",
                *counts,
                "",
                seconds(row.engine_us),
                seconds(row.adapter_load_us),
            ]
        )
    for w in report.waste:
        blanks = [""] * len(report.by)
        writer.writerow(
            [
                "waste",
                *blanks,
                w.worker,
                "",
                w.prompt_tokens,
                w.completion_tokens,
                w.attempts,
                seconds(w.engine_us),
                "",
            ]
        )
    return out.getvalue()


def _table(report: UsageReport) -> str:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    title = f"usage {_when(report.since) if report.since else 'since the start'} to {_when(report.until)}"
    table = Table(title=title, box=box.SIMPLE_HEAVY)
    for name in report.by:
        table.add_column(name)
    for name in ("requests", "prompt tokens", "completion tokens", "engine s", "adapter load s"):
        table.add_column(name, justify="right")

    def cells(row: UsageRow) -> list[str]:
        return [
            f"{row.requests:,}",
            f"{row.prompt_tokens:,}",
            f"{row.completion_tokens:,}",
            f"{row.engine_us / 1e6:,.3f}",
            f"{row.adapter_load_us / 1e6:,.3f}",
        ]

    for row in report.rows:
        table.add_row(*[str(getattr(row, name)) for name in report.by], *cells(row))
    if report.rows:
        table.add_section()
        table.add_row("total", *[""] * (len(report.by) - 1), *cells(report.total), style="bold")
    out = io.StringIO()
    console = Console(file=out, width=120, force_terminal=False, color_system=None)
    console.print(table)
    if report.waste:
        waste = Table(title="waste (runs whose result was not delivered)", box=box.SIMPLE_HEAVY)
        for name in ("worker", "runs", "prompt tokens", "completion tokens", "engine s"):
            waste.add_column(name, justify="left" if name == "worker" else "right")
        for w in report.waste:
            waste.add_row(*_waste_cells(w))
        console.print(waste)
    if not report.rows:
        console.print("no usage recorded in this period")
    return out.getvalue().rstrip() + "\n"


def _waste_cells(w: WasteRow) -> list[str]:
    return [
        w.worker,
        f"{w.attempts:,}",
        f"{w.prompt_tokens:,}",
        f"{w.completion_tokens:,}",
        f"{w.engine_us / 1e6:,.3f}",
    ]
