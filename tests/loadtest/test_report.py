"""Report arithmetic on hand-made records (pure, fast)."""

from __future__ import annotations

import pytest

from lorafleet.producer.loadreport import (
    SLO,
    RequestRecord,
    Stats,
    build_report,
    format_summary,
    headline,
    percentile,
    plot_report,
    read_json,
    report_figure,
    write_json,
)


def _record(i: int, adapter: str, sent: float, ttft: float, step: float, tokens: int, **kw):
    chunks = [sent + ttft + k * step for k in range(tokens)]
    return RequestRecord(
        index=i,
        adapter=adapter,
        prompt_chars=10,
        max_tokens=tokens,
        sent=sent,
        enqueued=sent + 0.001,
        chunks=chunks,
        finished=chunks[-1],
        prompt_tokens=11,
        output_tokens=tokens,
        queue_wait=0.002,
        **kw,
    )


def _records() -> list[RequestRecord]:
    records = [_record(i, "a" if i % 3 else "(base)", i * 0.1, 0.05, 0.01, 5) for i in range(9)]
    records.append(_record(9, "slow", 0.9, 0.5, 0.2, 5))
    failed = RequestRecord(
        index=10, adapter="a", prompt_chars=3, max_tokens=5, sent=1.0, finished=1.2
    )
    failed.error = "adapter_not_found"
    return [*records, failed]


def test_percentile_interpolates_like_numpy():
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile(list(range(101)), 90) == 90
    assert percentile([0.0, 10.0], 99) == pytest.approx(9.9)
    with pytest.raises(ValueError):
        percentile([], 50)
    assert Stats.of([None, None]) == Stats(count=0)


def test_report_counts_latencies_and_goodput():
    records = _records()
    duration = 2.0
    report = build_report(
        records, duration, description="d", config={}, slo=SLO(ttft=0.1, tpot=0.05)
    )
    assert (report.sent, report.ok, report.failed) == (11, 10, 1)
    assert report.errors == {"adapter_not_found": 1}
    assert report.output_tokens == 50 and report.prompt_tokens == 110
    assert report.request_throughput == pytest.approx(10 / duration)
    assert report.output_throughput == pytest.approx(50 / duration)
    assert report.total_token_throughput == pytest.approx(160 / duration)
    assert report.ttft.count == 10 and report.ttft.p50 == pytest.approx(0.05)
    assert report.ttft.max == pytest.approx(0.5)
    assert report.tpot.p50 == pytest.approx(0.01) and report.tpot.max == pytest.approx(0.2)
    assert report.itl.count == 40  # 4 gaps per successful request
    assert report.queue_wait.mean == pytest.approx(0.002)
    # The slow request misses both SLOs, the failed one counts against attainment.
    assert report.goodput == pytest.approx(9 / duration)
    assert report.slo_attainment == pytest.approx(9 / 11)
    rows = {row.adapter: row for row in report.per_adapter}
    assert sum(row.requests for row in report.per_adapter) == report.sent
    assert (rows["a"].requests, rows["a"].ok, rows["a"].failed) == (7, 6, 1)
    assert rows["(base)"].requests == 3 and rows["slow"].ttft_p50 == pytest.approx(0.5)
    assert report.per_adapter[0].adapter == "a"  # busiest first
    assert sum(b.completed for b in report.timeline) == report.ok
    assert sum(b.output_tokens for b in report.timeline) == pytest.approx(report.output_tokens)
    assert report.timeline[-1].end == pytest.approx(duration)


def test_no_slo_means_no_goodput():
    report = build_report(_records(), 2.0, description="d", config={})
    assert report.slo is None and report.goodput is None and report.slo_attainment is None


def test_summary_json_and_figure(tmp_path):
    report = build_report(_records(), 2.0, description="demo run", config={"k": 1}, slo=SLO(e2e=1))
    text = format_summary(report, top=2)
    assert "11 sent, 10 ok, 1 failed (adapter_not_found 1)" in text
    assert "goodput" in text and "e2e <= 1000 ms" in text
    assert "busiest 2 of 3" in text
    for label in ("queue wait", "TTFT", "inter-token (TPOT)", "end-to-end"):
        assert label in text
    path = tmp_path / "report.json"
    write_json(report, path)
    assert read_json(path) == report

    pytest.importorskip("matplotlib")
    figure = tmp_path / "report.png"
    plot_report(report, figure)
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_figure_draws_the_slos_and_the_headline_figures():
    pytest.importorskip("matplotlib")
    slo = SLO(ttft=0.3, e2e=1)
    config = {"mode": "open", "rate": 4.0}
    report = build_report(_records(), 2.0, description="d", config=config, slo=slo)
    text = headline(report)
    assert text.startswith("10 ok / 1 failed of 11 requests")
    assert f"goodput {report.goodput:.2f} req/s" in text
    assert f"offered 4 req/s, achieved {report.request_throughput:.2f} req/s" in text
    fig = report_figure(report)
    cdf, rate = fig.axes[:2]
    labels = cdf.get_legend_handles_labels()[1]
    assert "TTFT SLO 300 ms" in labels and "end-to-end SLO 1000 ms" in labels
    assert not any(label.startswith("TPOT SLO") for label in labels)  # none was set
    assert "offered 4 req/s" in rate.get_legend_handles_labels()[1]
    assert text in fig.texts[0].get_text()  # the suptitle
    closed = build_report(_records(), 2.0, description="d", config={"mode": "closed"})
    assert "offered" not in headline(closed) and "goodput" not in headline(closed)
