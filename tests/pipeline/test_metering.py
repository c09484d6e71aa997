"""Metering through the queue: usage on results and final events, the ledger holding
exactly what the clients received, and ``lorafleet usage`` in each format."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import uuid

import pytest
import redis

from lorafleet.producer import SamplingParams
from lorafleet.producer.keys import stream_key
from lorafleet.producer.ledger import BASE_ADAPTER, to_us
from lorafleet.producer.stream import FIELD, decode_event

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "lorafleet.worker.cli"]
PARAMS = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120)


def test_usage_on_results_and_events_equals_the_ledger(client, adapters, worker):
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    loras = [adapters[7], None, adapters[7], adapters[8]]
    handles = [
        client.submit(f"prompt {i}", PARAMS, lora, tenant=tenant) for i, lora in enumerate(loras)
    ]
    outputs = [h.result(timeout=120) for h in handles]
    outputs += client.generate(["via generate"], PARAMS, adapters[8], tenant=tenant)
    outputs += client.chat([{"role": "user", "content": "hi"}], PARAMS, tenant=tenant)
    for out in outputs:
        usage = out.usage
        assert usage.prompt_tokens == len(out.prompt_token_ids)
        assert usage.completion_tokens == len(out.outputs[0].token_ids) == 6
        assert usage.queue_wait_s is not None and usage.queue_wait_s >= 0
        assert usage.engine_s > 0
    # The final stream event carries the same usage.
    r = redis.Redis.from_url(worker.config.redis_url)
    events = [decode_event(f[FIELD]) for _, f in r.xrange(stream_key(handles[0].job_id))]
    assert events[-1].final and events[-1].result.output.usage == outputs[0].usage
    assert events[0].worker and events[0].seq == 0  # the run's first event names its worker

    report = client.usage(by="tenant,adapter")
    mine = {row.adapter: row for row in report.rows if row.tenant == tenant}
    expected: dict[str, list] = {}
    for lora, out in zip([*loras, adapters[8], None], outputs, strict=True):
        expected.setdefault(lora.lora_name if lora else BASE_ADAPTER, []).append(out.usage)
    assert set(mine) == set(expected)
    for adapter, usages in expected.items():
        row = mine[adapter]
        assert row.requests == len(usages)
        assert row.prompt_tokens == sum(u.prompt_tokens for u in usages)
        assert row.completion_tokens == sum(u.completion_tokens for u in usages)
        assert row.engine_us == sum(to_us(u.engine_s) for u in usages)
        assert row.adapter_load_us == sum(to_us(u.adapter_load_s) for u in usages)


def test_usage_command_formats(client, adapters, worker):
    tenant = f"fmt-{uuid.uuid4().hex[:6]}"
    client.generate(["one", "two"], PARAMS, adapters[9], tenant=tenant)
    url = worker.config.redis_url
    table = _cli("usage", "--redis-url", url, "--by", "tenant")
    assert table.returncode == 0, table.stderr
    cells = next(x for x in table.stdout.splitlines() if tenant in x).split()
    assert (cells[1], cells[3]) == ("2", "12")  # requests, completion tokens
    assert "total" in table.stdout

    as_json = _cli("usage", "--redis-url", url, "--format", "json", "--since", "1h")
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    rows = [x for x in data["rows"] if x["tenant"] == tenant]
    assert [(x["adapter"], x["requests"], x["completion_tokens"]) for x in rows] == [
        (adapters[9].lora_name, 2, 12)
    ]
    assert rows[0]["engine_s"] == rows[0]["engine_us"] / 1e6

    as_csv = _cli("usage", "--redis-url", url, "--format", "csv", "--by", "adapter,tenant")
    assert as_csv.returncode == 0, as_csv.stderr
    records = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert set(records[0]) >= {"kind", "tenant", "adapter", "requests", "engine_s"}
    (mine,) = [x for x in records if x["tenant"] == tenant]
    assert (mine["kind"], mine["adapter"], mine["requests"]) == (
        "usage",
        adapters[9].lora_name,
        "2",
    )

    empty = _cli("usage", "--redis-url", url, "--until", "2000-01-01")
    assert empty.returncode == 0 and "no usage recorded" in empty.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["usage", "--format", "xml"], "--format must be one of table, json, csv, got 'xml'"),
        (["usage", "--by", "worker"], "--by must be one of tenant, adapter, tenant,adapter"),
        (["usage", "--since", "last week"], "--since 'last week' is not a time"),
        (["usage", "--since", "1h", "--until", "2h"], "--until must be after --since"),
        (
            ["generate", "--tenant", "a b", "--redis-url", "redis://x", "p"],
            "--tenant: tenant 'a b'",
        ),
    ],
)
def test_bad_usage_and_tenant_flags_are_one_line(args, message):
    proc = _cli(*args)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_generate_command_with_a_tenant(client, adapters, worker):
    tenant = f"cli-{uuid.uuid4().hex[:6]}"
    a = adapters[3]
    proc = _cli(
        "generate", "--redis-url", worker.config.redis_url, "--queue", worker.config.queue,
        "--tenant", tenant, "--json", "--max-tokens", "3", "--lora", f"{a.lora_name}={a.lora_path}",
        "one", "two",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(x) for x in proc.stdout.splitlines()]
    assert [x["usage"]["completion_tokens"] for x in lines] == [3, 3]
    (row,) = [r for r in client.usage(by="tenant").rows if r.tenant == tenant]
    assert (row.requests, row.completion_tokens) == (2, 6)
    assert row.prompt_tokens == sum(x["usage"]["prompt_tokens"] for x in lines)
