"""The shipped demo model and adapters, served through the real queue and a worker process."""

from __future__ import annotations

import uuid

import pytest

from lorafleet.producer import SamplingParams, SyncClient
from lorafleet.worker.demo.demo_assets import (
    BASE_TASK,
    demo_adapters,
    demo_lora_requests,
    demo_model_dir,
    demo_prompt,
    expected_output,
    held_out_words,
)
from lorafleet.worker.local.launcher import WorkerProcess
from lorafleet.worker.serve.settings import WorkerConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_worker(redis_server, tmp_path_factory):
    adapters = demo_adapters()
    config = WorkerConfig.create(
        model=str(demo_model_dir()),
        device="cpu",
        adapter_roots=tuple(sorted({str(p.parent) for p in adapters.values()})),
        redis_url=redis_server.url,
        queue=f"lorafleet:test-demo:{uuid.uuid4().hex[:8]}",
        max_loras=2,  # four adapters through two slots: slots turn over during the run
        max_num_seqs=64,
    )
    log = tmp_path_factory.mktemp("demo") / "worker.log"
    with WorkerProcess(config, log_path=log, ready_timeout=180) as process:
        yield process


def test_each_adapter_does_its_task_through_the_queue(demo_worker):
    words = held_out_words()[:50]
    assert len(words) == 50
    loras = demo_lora_requests()
    tasks = [BASE_TASK, *loras]
    jobs = [(word, task) for word in words for task in tasks]
    with SyncClient(demo_worker.config.redis_url, queue_name=demo_worker.config.queue) as client:
        outs = client.generate(
            [demo_prompt(w) for w, _ in jobs],
            SamplingParams(max_tokens=16, temperature=0),
            lora_request=[loras.get(t) for _, t in jobs],
            timeout=300,
        )
    answers: dict[str, dict[str, str]] = {t: {} for t in tasks}
    for (word, task), out in zip(jobs, outs, strict=True):
        answers[task][word] = out.outputs[0].text
    for task in tasks:
        correct = sum(answers[task][w] == expected_output(task, w) for w in words)
        assert correct >= 45, f"{task}: {correct}/50 correct"
    # The adapter, not chance, decides the output: the tasks disagree on the same inputs.
    for a in tasks:
        for b in tasks:
            if a < b:
                differ = sum(answers[a][w] != answers[b][w] for w in words)
                assert differ > 0, (a, b)
    assert sum(answers["reverse"][w] != answers["sort"][w] for w in words) >= 40
