"""Requests waiting for an adapter slot: counted by the engine, exported as a metric, and
reported in a log line naming ``--max-loras`` when the wait persists."""

from __future__ import annotations

import logging

from lorafleet.producer import SamplingParams
from lorafleet.worker import LLM
from lorafleet.worker.serve.slot_contention import PERSIST_S, REPEAT_S, SlotContentionWatch

LONG = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)


def test_the_engine_counts_requests_waiting_for_a_slot(llama_dir, adapter_factory):
    (_, a), (_, b), *_ = adapter_factory(llama_dir)
    llm = LLM(str(llama_dir), max_loras=1, max_lora_rank=64, max_model_len=128, device="cpu")
    engine = llm.engine
    engine.add_request("a", "one", LONG, a)
    engine.add_request("b", "two", LONG, b)
    engine.add_request("base", "three", LONG)
    engine.step()  # a takes the only slot; base runs; b waits for the slot
    snap = engine.snapshot()
    assert (snap.running, snap.waiting, snap.waiting_for_slot) == (2, 1, 1)
    assert snap.slots_in_use == 1
    engine.abort("a")
    engine.step()  # the slot is free: b takes it
    assert engine.snapshot().waiting_for_slot == 0


def test_a_persistent_wait_is_reported_once_a_minute_naming_the_flag(caplog):
    watch = SlotContentionWatch(engine=None, max_loras=4)
    with caplog.at_level(logging.WARNING, logger="lorafleet.worker.serve.slot_contention"):
        assert not watch.check(3, 100.0)
        assert not watch.check(3, 100.0 + PERSIST_S - 1)  # not long enough yet
        assert watch.check(5, 100.0 + PERSIST_S)
        assert not watch.check(5, 100.0 + PERSIST_S + REPEAT_S - 1)  # not again so soon
        assert watch.check(2, 100.0 + PERSIST_S + REPEAT_S)
        assert not watch.check(0, 500.0)  # over: the next wait starts its own clock
        assert not watch.check(1, 501.0)
    first = caplog.records[0].getMessage()
    assert len(caplog.records) == 2
    assert first.startswith("5 requests have waited 10s for an adapter slot: all 4 slots")
    assert "--max-loras (LORAFLEET_MAX_LORAS)" in first
