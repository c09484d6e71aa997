"""Load-test report: statistics from the request records, summary table, JSON and figure.

Definitions follow vLLM's serving benchmark: TTFT is send to first streamed text; TPOT is a
request's mean time per output token after the first; ITL is every gap between two
streamed deltas of a request; end-to-end is send to the final result; goodput is the rate of
requests that succeeded and met every given SLO. Queue wait is the time a job sat in Redis
before a worker took it (reported by the worker). Throughputs count the measured run, from
the first send to the last answer. Latencies are in seconds in the JSON report and in
milliseconds in the table and figure.

The figure needs matplotlib (``pip install matplotlib``); nothing else here does.
"""

from __future__ import annotations

import io
import itertools
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import msgspec
from rich import box
from rich.console import Console
from rich.table import Table

#: Schema version of the JSON report.
REPORT_VERSION = 1

#: Percentiles in every latency summary.
PERCENTILES = (50, 90, 99)


class RequestRecord(msgspec.Struct, kw_only=True):
    """What the client saw of one request. Times are seconds since the run started:
    ``sent`` when the client began submitting, ``enqueued`` when the job was in Redis,
    ``finished`` when the result (or the error) arrived.

    ``chunks`` holds the arrival time of each streamed text delta (a token that ends inside
    a UTF-8 character streams with the next one). ``queue_wait`` is the time the job spent
    in Redis before a worker took it (``RequestMetrics.time_in_queue``). ``error`` is the
    failure's stable code, ``None`` when the request succeeded.
    """

    index: int
    adapter: str
    prompt_chars: int
    max_tokens: int
    sent: float
    enqueued: float | None = None
    chunks: list[float] = msgspec.field(default_factory=list)
    finished: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    queue_wait: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.finished is not None

    @property
    def ttft(self) -> float | None:
        return self.chunks[0] - self.sent if self.chunks else None

    @property
    def e2e(self) -> float | None:
        return None if self.finished is None else self.finished - self.sent

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (vLLM's TPOT)."""
        if not self.ok or not self.chunks or self.output_tokens < 2:
            return None
        assert self.finished is not None
        return (self.finished - self.chunks[0]) / (self.output_tokens - 1)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of non-empty ``values``, interpolating linearly
    between order statistics (numpy's default method)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


class Stats(msgspec.Struct, kw_only=True):
    """Summary of one latency, seconds; all ``None`` when there were no values."""

    count: int
    mean: float | None = None
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None
    max: float | None = None

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Stats:
        present = [v for v in values if v is not None]
        if not present:
            return cls(count=0)
        return cls(
            count=len(present),
            mean=sum(present) / len(present),
            p50=percentile(present, 50),
            p90=percentile(present, 90),
            p99=percentile(present, 99),
            max=max(present),
        )


class SLO(msgspec.Struct, frozen=True, kw_only=True):
    """Latency objectives in seconds; ``None`` means no objective on that latency."""

    ttft: float | None = None
    tpot: float | None = None
    e2e: float | None = None

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.ttft, self.tpot, self.e2e))

    def met(self, record: RequestRecord) -> bool:
        """Whether the request succeeded and met every objective (a latency that could not
        be measured, e.g. TPOT of a one-token output, does not count against it)."""
        if not record.ok:
            return False
        checks = ((self.ttft, record.ttft), (self.tpot, record.tpot), (self.e2e, record.e2e))
        return all(limit is None or value is None or value <= limit for limit, value in checks)

    def describe(self) -> str:
        parts = [
            f"{name} <= {limit * 1000:g} ms"
            for name, limit in (("TTFT", self.ttft), ("TPOT", self.tpot), ("e2e", self.e2e))
            if limit is not None
        ]
        return ", ".join(parts)


class AdapterRow(msgspec.Struct, kw_only=True):
    """Per-adapter breakdown (``(base)`` for the base model); latencies in seconds."""

    adapter: str
    requests: int
    ok: int
    failed: int
    output_tokens: int
    ttft_p50: float | None
    tpot_p50: float | None
    e2e_p50: float | None
    e2e_p99: float | None


class TimelineBucket(msgspec.Struct, kw_only=True):
    """What happened in ``[start, end)`` seconds into the run (the last bucket ends with
    the run, so it may be shorter than the others)."""

    start: float
    end: float
    completed: int
    output_tokens: float

    @property
    def request_rate(self) -> float:
        return self.completed / (self.end - self.start)

    @property
    def token_rate(self) -> float:
        return self.output_tokens / (self.end - self.start)


class Report(msgspec.Struct, kw_only=True):
    """The load test's result; ``records`` keeps every request for further analysis."""

    version: int = REPORT_VERSION
    description: str
    config: dict[str, Any]
    duration_s: float
    sent: int
    ok: int
    failed: int
    errors: dict[str, int]
    prompt_tokens: int
    output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    queue_wait: Stats
    ttft: Stats
    tpot: Stats
    itl: Stats
    e2e: Stats
    slo: SLO | None
    goodput: float | None
    slo_attainment: float | None
    per_adapter: list[AdapterRow]
    bucket_s: float
    timeline: list[TimelineBucket]
    records: list[RequestRecord]


def _p(values: list[float], q: float) -> float | None:
    return percentile(values, q) if values else None


def _adapter_rows(records: Sequence[RequestRecord]) -> list[AdapterRow]:
    groups: dict[str, list[RequestRecord]] = defaultdict(list)
    for r in records:
        groups[r.adapter].append(r)
    rows = []
    for name, group in groups.items():
        good = [r for r in group if r.ok]
        ttft = [v for r in good if (v := r.ttft) is not None]
        tpot = [v for r in good if (v := r.tpot) is not None]
        e2e = [v for r in good if (v := r.e2e) is not None]
        rows.append(
            AdapterRow(
                adapter=name,
                requests=len(group),
                ok=len(good),
                failed=len(group) - len(good),
                output_tokens=sum(r.output_tokens for r in good),
                ttft_p50=_p(ttft, 50),
                tpot_p50=_p(tpot, 50),
                e2e_p50=_p(e2e, 50),
                e2e_p99=_p(e2e, 99),
            )
        )
    return sorted(rows, key=lambda row: (-row.requests, row.adapter))


def _timeline(records: Sequence[RequestRecord], duration: float) -> tuple[float, list]:
    """Completions and output tokens per time bucket; a request's tokens are spread
    evenly over its streamed deltas (the stream does not say how many each carried)."""
    bucket = max(0.5, duration / 60)
    n = max(1, math.ceil(duration / bucket))
    completed = [0] * n
    tokens = [0.0] * n

    def index(t: float) -> int:
        return min(n - 1, max(0, int(t / bucket)))

    for r in records:
        if not r.ok or r.finished is None:
            continue
        completed[index(r.finished)] += 1
        times = r.chunks or [r.finished]
        for t in times:
            tokens[index(t)] += r.output_tokens / len(times)
    return bucket, [
        TimelineBucket(
            start=i * bucket,
            end=min((i + 1) * bucket, duration) if i == n - 1 else (i + 1) * bucket,
            completed=c,
            output_tokens=tok,
        )
        for i, (c, tok) in enumerate(zip(completed, tokens, strict=True))
    ]


def build_report(
    records: Sequence[RequestRecord],
    duration_s: float,
    *,
    description: str,
    config: dict[str, Any],
    slo: SLO | None = None,
) -> Report:
    """Aggregate a run. ``sent == ok + failed == len(records)`` always holds."""
    good = [r for r in records if r.ok]
    prompt_tokens = sum(r.prompt_tokens for r in good)
    output_tokens = sum(r.output_tokens for r in good)
    itl = [b - a for r in good for a, b in itertools.pairwise(r.chunks)]
    per_s = 1.0 / duration_s if duration_s > 0 else 0.0
    met = [r for r in records if slo.met(r)] if slo and slo.any else None
    bucket_s, timeline = _timeline(records, duration_s)
    return Report(
        description=description,
        config=config,
        duration_s=duration_s,
        sent=len(records),
        ok=len(good),
        failed=len(records) - len(good),
        errors=dict(Counter(r.error or "unknown" for r in records if not r.ok)),
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        request_throughput=len(good) * per_s,
        output_throughput=output_tokens * per_s,
        total_token_throughput=(prompt_tokens + output_tokens) * per_s,
        queue_wait=Stats.of(r.queue_wait for r in good),
        ttft=Stats.of(r.ttft for r in good),
        tpot=Stats.of(r.tpot for r in good),
        itl=Stats.of(itl),
        e2e=Stats.of(r.e2e for r in good),
        slo=slo if slo and slo.any else None,
        goodput=None if met is None else len(met) * per_s,
        slo_attainment=None if met is None or not records else len(met) / len(records),
        per_adapter=_adapter_rows(records),
        bucket_s=bucket_s,
        timeline=timeline,
        records=list(records),
    )


# -- output ----------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def format_summary(report: Report, *, top: int = 10) -> str:
    """The human summary: counts, throughput, goodput, latency table, per-adapter rows
    (the ``top`` busiest adapters; the JSON report has all of them)."""
    lines = [f"lorafleet load test: {report.description}"]
    errors = ", ".join(f"{code} {n}" for code, n in sorted(report.errors.items()))
    lines.append(
        f"requests     {report.sent} sent, {report.ok} ok, {report.failed} failed"
        + (f" ({errors})" if errors else "")
    )
    lines.append(f"duration     {report.duration_s:.2f} s")
    lines.append(
        f"throughput   {report.request_throughput:.2f} req/s, "
        f"{report.output_throughput:.1f} output tokens/s, "
        f"{report.total_token_throughput:.1f} total tokens/s"
    )
    if report.slo is not None and report.goodput is not None:
        attained = report.slo_attainment or 0.0
        lines.append(
            f"goodput      {report.goodput:.2f} req/s ({attained:.1%} of requests met "
            f"{report.slo.describe()})"
        )
    latency = _table("latency (ms)", "mean", *(f"p{q}" for q in PERCENTILES), "max", "n")
    for label, stats in (
        ("queue wait", report.queue_wait),
        ("TTFT", report.ttft),
        ("inter-token (TPOT)", report.tpot),
        ("inter-chunk (ITL)", report.itl),
        ("end-to-end", report.e2e),
    ):
        values = [stats.mean, stats.p50, stats.p90, stats.p99, stats.max]
        latency.add_row(label, *(_ms(v) for v in values), str(stats.count))
    rows = report.per_adapter
    shown = rows[:top]
    title = "per adapter" + (f" (busiest {top} of {len(rows)})" if len(rows) > top else "")
    adapters = _table(
        "adapter", "requests", "ok", "failed", "out tok", "TTFT p50", "TPOT p50", "e2e p50",
        "e2e p99", title=f"{title}, latencies in ms",
    )  # fmt: skip
    for r in shown:
        counts = (r.requests, r.ok, r.failed, r.output_tokens)
        latencies = (r.ttft_p50, r.tpot_p50, r.e2e_p50, r.e2e_p99)
        adapters.add_row(r.adapter, *map(str, counts), *(_ms(v) for v in latencies))
    return "\n".join(lines) + "\n\n" + _render(latency) + "\n" + _render(adapters)


def _table(*columns: str, title: str | None = None) -> Table:
    """A plain table: the first column left-aligned, the numbers right-aligned."""
    table = Table(*columns, title=title, title_justify="left", box=box.SIMPLE_HEAD)
    for column in table.columns[1:]:
        column.justify = "right"
    return table


def _render(table: Table) -> str:
    """``table`` as plain text (no colours), as wide as it needs."""
    console = Console(file=io.StringIO(), width=200, color_system=None, highlight=False)
    console.print(table)
    lines = console.file.getvalue().strip("\n").splitlines()
    return "\n".join(line.rstrip() for line in lines)


def write_json(report: Report, path: str | Path) -> None:
    Path(path).write_bytes(msgspec.json.format(msgspec.json.encode(report), indent=1))


def read_json(path: str | Path) -> Report:
    return msgspec.json.decode(Path(path).read_bytes(), type=Report)


def require_matplotlib() -> None:
    """Raise ``RuntimeError`` naming the package to install when matplotlib is missing
    (call it before a long run whose figure is wanted)."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise RuntimeError("the figure needs matplotlib: pip install matplotlib")


def offered_rate(report: Report) -> float | None:
    """The open loop's arrival rate (requests/s) the run was asked for; None for a closed
    loop or everything sent at once."""
    rate = report.config.get("rate")
    return float(rate) if report.config.get("mode") == "open" and rate else None


def headline(report: Report) -> str:
    """The figure's one-line summary: requests ok / failed, goodput, offered vs achieved
    request rate."""
    parts = [f"{report.ok} ok / {report.failed} failed of {report.sent} requests"]
    if report.goodput is not None:
        parts.append(f"goodput {report.goodput:.2f} req/s ({(report.slo_attainment or 0):.0%})")
    offered = offered_rate(report)
    achieved = f"achieved {report.request_throughput:.2f} req/s"
    parts.append(f"offered {offered:g} req/s, {achieved}" if offered else achieved)
    return " · ".join(parts)


def plot_report(report: Report, path: str | Path) -> None:
    """Save ``report_figure(report)`` as a PNG."""
    fig = report_figure(report)
    import matplotlib.pyplot as plt  # after report_figure has chosen the file-only backend

    fig.savefig(str(path), dpi=110)
    plt.close(fig)


def report_figure(report: Report) -> Any:
    """A matplotlib ``Figure``: latency CDFs with the SLOs as vertical lines (left),
    throughput over time with the offered rate (right), and the ``headline`` on top."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    fig, (cdf, rate) = plt.subplots(1, 2, figsize=(13, 4.8))
    good = [r for r in report.records if r.ok]
    slo = report.slo or SLO()
    for label, values, objective in (
        ("queue wait", [r.queue_wait for r in good], None),
        ("TTFT", [r.ttft for r in good], slo.ttft),
        ("TPOT", [r.tpot for r in good], slo.tpot),
        ("end-to-end", [r.e2e for r in good], slo.e2e),
    ):
        ms = sorted(v * 1000 for v in values if v is not None and v > 0)
        if ms:
            (line,) = cdf.step(
                ms, [(i + 1) / len(ms) for i in range(len(ms))], where="post", label=label
            )
            if objective is not None:
                cdf.axvline(
                    objective * 1000,
                    color=line.get_color(),
                    linestyle=":",
                    label=f"{label} SLO {objective * 1000:g} ms",
                )
    cdf.set_xscale("log")
    cdf.set_xlabel("latency (ms, log scale)")
    cdf.set_ylabel("fraction of requests")
    cdf.set_ylim(0, 1.01)
    cdf.grid(True, which="both", alpha=0.3)
    cdf.legend(loc="lower right")
    cdf.set_title("latency CDFs")

    # A post-step needs the last bucket's end repeated to draw that bucket at all.
    edges = [b.start for b in report.timeline] + [report.timeline[-1].end]

    def steps(values: list[float]) -> list[float]:
        return [*values, values[-1]]

    rate.step(
        edges, steps([b.request_rate for b in report.timeline]), where="post", color="tab:blue"
    )
    if (offered := offered_rate(report)) is not None:
        rate.axhline(offered, color="tab:blue", linestyle=":", label=f"offered {offered:g} req/s")
        rate.legend(loc="lower right")
    rate.set_xlabel("time since start (s)")
    rate.set_ylabel("completed requests/s", color="tab:blue")
    rate.set_ylim(bottom=0)
    tokens = rate.twinx()
    tokens.step(
        edges,
        steps([b.token_rate for b in report.timeline]),
        where="post",
        color="tab:orange",
        linestyle="--",
    )
    tokens.set_ylabel("output tokens/s (dashed)", color="tab:orange")
    tokens.set_ylim(bottom=0)
    rate.set_title(f"throughput over time ({report.bucket_s:g} s buckets)")
    rate.grid(True, alpha=0.3)
    fig.suptitle(f"{headline(report)}\n{report.description}", fontsize=9)
    fig.tight_layout()
    return fig
