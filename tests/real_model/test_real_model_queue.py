"""The real model through the queue and the command line, with default settings: a worker,
``generate --model smollm2`` and ``loadtest --model smollm2`` serve it as it comes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from real_model_support import QUESTIONS

from lorafleet.producer import SamplingParams, SyncClient
from lorafleet.producer.redis_server import EmbeddedRedis
from lorafleet.worker.local.launcher import WorkerProcess
from lorafleet.worker.serve.settings import WorkerConfig

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "lorafleet.worker.cli"]
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def redis_url():
    with EmbeddedRedis() as server:
        yield server.url


def test_a_worker_with_only_the_catalog_name_serves_chat(redis_url, real_model, tmp_path):
    config = WorkerConfig.create(model="smollm2", redis_url=redis_url)
    assert config.to_env().keys() == {"LORAFLEET_MODEL", "LORAFLEET_REDIS_URL"}
    with (
        WorkerProcess(config, log_path=tmp_path / "w.log", ready_timeout=300) as worker,
        SyncClient(redis_url, queue_name=worker.config.queue) as client,
    ):
        (out,) = client.chat(FRANCE, SamplingParams(max_tokens=16, temperature=0))
    assert out.outputs[0].text == "The capital of France is Paris."
    log = (tmp_path / "w.log").read_text()
    assert "Traceback" not in log and "max_model_len lowered" not in log, log


def test_mixed_chat_batch_through_the_queue_equals_peft(
    redis_url, real_model, real_adapters, real_adapter_root, peft_reference, tmp_path
):
    config = WorkerConfig.create(
        model=str(real_model),
        redis_url=redis_url,
        adapter_roots=(str(real_adapter_root),),
        max_loras=2,
        max_lora_rank=32,
        queue="lorafleet:real-mixed",
    )
    requests = [(None, QUESTIONS[0])] + [
        (lora, QUESTIONS[i % len(QUESTIONS)]) for i, lora in enumerate(real_adapters)
    ]
    chats = [[{"role": "user", "content": q}] for _, q in requests]
    with (
        WorkerProcess(config, log_path=tmp_path / "w.log", ready_timeout=300),
        SyncClient(redis_url, queue_name=config.queue) as client,
    ):
        outs = client.chat(
            chats, SamplingParams(max_tokens=16, temperature=0), [lr for lr, _ in requests]
        )
    expected = peft_reference(requests, 16)
    for (_, question), out, tokens in zip(requests, outs, expected, strict=True):
        assert out.outputs[0].token_ids == tokens, question


def test_generate_with_the_catalog_name(real_model):
    proc = subprocess.run(
        [
            *CLI,
            "generate",
            "--model",
            "smollm2",
            "--chat",
            "--max-tokens",
            "16",
            FRANCE[0]["content"],
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "The capital of France is Paris."


def test_loadtest_with_the_catalog_name(real_model, tmp_path):
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [*CLI, "loadtest", "--model", "smollm2", "--base-share", "1", "--num-requests", "6",
         "--rate", "inf", "--output-len", "4", "--warmup", "1", "--quiet", "--json", str(report)],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads(report.read_text())
    assert (summary["sent"], summary["ok"]) == (6, 6), summary["errors"]
