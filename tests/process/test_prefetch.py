"""Reading adapters ahead in the engine process: a request whose adapter must come from
disk is parked while a background thread reads it, then added; prefetched adapters are
counted as used or wasted; failures and aborts of parked requests are answered as ever."""

from __future__ import annotations

import time
from pathlib import Path

from lorafleet.producer import LoRARequest, SamplingParams
from lorafleet.worker.engine.config import EngineConfig
from lorafleet.worker.engine.llm_engine import LLMEngine
from lorafleet.worker.engine.outputs import StepOutput
from lorafleet.worker.process.engine_process import EngineLoop
from lorafleet.worker.process.link import AbortRequest, AddRequest, PrefetchAdapters

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def _engine(llama_dir: Path, **over) -> LLMEngine:
    values = dict(model=str(llama_dir), device="cpu", max_loras=2, max_cpu_loras=2)
    values.update(over)
    return LLMEngine(EngineConfig(**values))


def _add(request_id: str, lora: LoRARequest | None) -> AddRequest:
    return AddRequest(request_id, "the prefetch test", GREEDY, lora, None)


def _run(loop: EngineLoop, commands, timeout: float = 60.0) -> dict[str, StepOutput]:
    """Apply ``commands``, then collect reads, release parked requests and step until every
    request has finished; the final output of each request."""
    finals: dict[str, StepOutput] = {}
    outputs = loop.apply(commands)
    deadline = time.monotonic() + timeout
    while True:
        for out in outputs:
            if out.finished:
                finals[out.request_id] = out
        if not loop.parked and not loop.engine.has_unfinished():
            return finals
        assert time.monotonic() < deadline, "the engine did not finish"
        if loop.prefetcher is not None:
            loop.prefetcher.collect()
        outputs = loop.release_parked()
        if loop.engine.has_unfinished():
            outputs += loop.step()
        else:
            time.sleep(0.002)


def test_a_request_waits_for_its_adapter_read_off_the_engine_thread(llama_dir, adapter_factory):
    (_, a), *_ = adapter_factory(llama_dir)
    plain = EngineLoop(_engine(llama_dir, prefetch_adapters=False))
    expected = _run(plain, [_add("a", a), _add("base", None)])
    assert plain.prefetcher is None and not plain.parked

    loop = EngineLoop(_engine(llama_dir))
    outputs = loop.apply([_add("a", a), _add("base", None)])
    assert outputs == [] and list(loop.parked) == ["a"]  # the base request runs meanwhile
    assert "base" in loop.engine.requests and "a" not in loop.engine.requests
    finals = _run(loop, [])
    for rid in ("a", "base"):
        assert finals[rid].output.outputs[0].token_ids == expected[rid].output.outputs[0].token_ids
    stats = loop.engine.adapters.stats
    assert (stats.disk_loads, stats.prefetch_loads, stats.prefetch_used) == (1, 1, 1)
    # Held now: the next request for it is added at once.
    assert loop.apply([_add("a2", a)]) == [] and not loop.parked
    assert "a2" in loop.engine.requests
    _run(loop, [])


def test_prefetched_adapters_are_used_or_counted_wasted(llama_dir, adapter_factory):
    (_, a), (_, b), (_, c), *_ = adapter_factory(llama_dir)
    loop = EngineLoop(_engine(llama_dir, max_loras=1, max_cpu_loras=1))
    loop.apply([PrefetchAdapters([a, b])])
    _run(loop, [])
    deadline = time.monotonic() + 30
    while loop.prefetcher.busy:
        assert time.monotonic() < deadline
        loop.prefetcher.collect()
        time.sleep(0.002)
    stats = loop.engine.adapters.stats
    # The CPU cache holds one adapter: b pushed a out unused.
    assert (stats.prefetch_loads, stats.prefetch_wasted) == (2, 1)
    assert loop.engine.adapters.is_held(b.lora_int_id)
    _run(loop, [_add("b", b)])
    assert (stats.prefetch_used, stats.disk_loads) == (1, 2)
    assert loop.engine.snapshot().adapters_in_cpu == (b.lora_int_id,)
    assert loop.engine.snapshot().adapters_in_slots == (b.lora_int_id,)
    _run(loop, [_add("c", c)])  # read ahead too, though nobody asked: it was not held
    assert stats.prefetch_loads == 3


def test_a_parked_request_is_aborted_or_fails_like_any_other(llama_dir, adapter_factory, tmp_path):
    (_, a), *_ = adapter_factory(llama_dir)
    loop = EngineLoop(_engine(llama_dir))
    missing = LoRARequest("missing", 77, str(tmp_path / "nowhere"))
    loop.apply([_add("gone", missing), _add("a", a), AbortRequest("a")])
    assert set(loop.parked) == {"gone", "a"}
    finals = _run(loop, [])
    assert finals["gone"].error is not None and finals["gone"].error.code == "adapter_not_found"
    assert finals["a"].finish_reason == "abort"
    assert loop.engine.adapters.stats.disk_load_failures == 1  # the request's own read
