"""Adapter-aware admission: slot reuse first, most-demanded adapter next, no starvation."""

from __future__ import annotations

import pytest

from lorafleet.producer import LoRARequest, SamplingParams
from lorafleet.worker import LLM
from lorafleet.worker.demo.synthetic import build_random_adapter

GREEDY = SamplingParams(max_tokens=4, temperature=0)


@pytest.fixture(scope="module")
def adapters(llama_dir, tmp_path_factory) -> list[LoRARequest]:
    root = tmp_path_factory.mktemp("sched")
    return [
        LoRARequest(
            f"a{i}", i + 1, str(build_random_adapter(llama_dir, root / f"a{i}", rank=4, seed=i))
        )
        for i in range(5)
    ]


def _run(engine) -> list[set[int]]:
    """Step to completion; the distinct adapters of every step."""
    steps = []
    while engine.has_unfinished():
        engine.step()
        steps.append({s.lora_id for s in engine.scheduler.running if s.lora_request})
    return steps


def test_step_never_exceeds_max_loras(llama_dir, adapters):
    llm = LLM(str(llama_dir), max_loras=2, max_lora_rank=8)
    for i in range(20):
        llm.engine.add_request(f"r{i}", f"p{i}", GREEDY, adapters[i % 5] if i % 3 else None)
    steps = _run(llm.engine)
    assert steps and max(len(s) for s in steps) <= 2


def test_prefers_resident_adapter_then_most_demanded(llama_dir, adapters):
    llm = LLM(str(llama_dir), max_loras=1, max_lora_rank=8, max_num_seqs=64)
    engine = llm.engine
    engine.add_request("warm", "x", GREEDY, adapters[0])
    engine.step()  # adapters[0] now holds the only slot
    engine.add_request("one", "x", GREEDY, adapters[1])
    for i in range(3):
        engine.add_request(f"many{i}", "x", GREEDY, adapters[2])
    engine.add_request("resident", "x", GREEDY, adapters[0])
    engine.step()
    running = {s.request_id for s in engine.scheduler.running}
    assert "resident" in running and "one" not in running
    order = []
    while engine.has_unfinished():
        engine.step()
        for s in engine.scheduler.running:
            if s.request_id not in order:
                order.append(s.request_id)
    # When the slot frees, the adapter with 3 waiting requests wins over the one with 1.
    assert order.index("many0") < order.index("one")


def test_aging_bound_prevents_starvation(llama_dir, adapters):
    llm = LLM(str(llama_dir), max_loras=1, max_lora_rank=8, starvation_steps=3, max_num_seqs=4)
    engine = llm.engine
    engine.add_request("lonely", "x", SamplingParams(max_tokens=2, temperature=0), adapters[4])
    served_at = None
    step = 0
    while engine.has_unfinished() and step < 200:
        # A steady stream of requests for the resident adapter keeps arriving.
        engine.add_request(
            f"busy{step}", "x", SamplingParams(max_tokens=3, temperature=0), adapters[0]
        )
        engine.step()
        step += 1
        if served_at is None and any(s.request_id == "lonely" for s in engine.scheduler.running):
            served_at = step
        if served_at is not None and step > served_at + 5:
            break
    assert served_at is not None and served_at <= 12
