"""Reading adapters ahead in the engine process: ``PrefetchAdapters`` reads them in a
background thread into the CPU cache; a request for one still being read waits for that
read instead of reading twice; prefetches are counted as used or wasted; a failed read
ahead leaves the request to fail as ever. Real tiny model, real adapter files."""

from __future__ import annotations

import time
from pathlib import Path

from lorafleet.producer import LoRARequest, SamplingParams
from lorafleet.worker.engine.config import EngineConfig
from lorafleet.worker.engine.llm_engine import LLMEngine
from lorafleet.worker.engine.outputs import StepOutput
from lorafleet.worker.process.engine_process import EngineLoop
from lorafleet.worker.process.link import AddRequest, PrefetchAdapters

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def _loop(llama_dir: Path, **over) -> EngineLoop:
    values = dict(model=str(llama_dir), device="cpu", max_loras=2, max_cpu_loras=2)
    values.update(over)
    return EngineLoop(LLMEngine(EngineConfig(**values)))


def _add(request_id: str, lora: LoRARequest | None) -> AddRequest:
    return AddRequest(request_id, "the prefetch test", GREEDY, lora, None)


def _run(loop: EngineLoop, commands, timeout: float = 60.0) -> dict[str, StepOutput]:
    """Apply ``commands`` and step until every request finished: final outputs by id."""
    finals: dict[str, StepOutput] = {}
    outputs = loop.apply(commands)
    deadline = time.monotonic() + timeout
    while True:
        finals.update((o.request_id, o) for o in outputs if o.finished)
        if not loop.engine.has_unfinished():
            return finals
        assert time.monotonic() < deadline, "the engine did not finish"
        outputs = loop.step()


def _settle(loop: EngineLoop) -> None:
    """Wait for the reads ahead and cache them, as the engine loop does between steps."""
    deadline = time.monotonic() + 30
    while loop.prefetcher.busy:
        assert time.monotonic() < deadline, "reads ahead did not finish"
        loop.prefetcher.collect()
        time.sleep(0.002)


def test_a_prefetched_adapter_serves_its_request_without_a_second_read(llama_dir, adapter_factory):
    (_, a), *_ = adapter_factory(llama_dir)
    expected = _run(_loop(llama_dir, prefetch_adapters=False), [_add("a", a)])
    loop = _loop(llama_dir)
    loop.apply([PrefetchAdapters([a])])
    _settle(loop)
    stats = loop.engine.adapters.stats
    assert (stats.disk_loads, stats.prefetch_loads) == (1, 1)
    assert loop.engine.snapshot().adapters_in_cpu == (a.lora_int_id,)
    finals = _run(loop, [_add("a", a)])
    assert finals["a"].output.outputs[0].token_ids == expected["a"].output.outputs[0].token_ids
    assert (stats.disk_loads, stats.prefetch_used) == (1, 1) and stats.cpu_hits >= 1


def test_a_request_arriving_during_the_read_waits_for_it(llama_dir, adapter_factory):
    (_, a), *_ = adapter_factory(llama_dir)
    loop = _loop(llama_dir)
    finals = _run(loop, [PrefetchAdapters([a]), _add("a", a)])  # same batch: read in flight
    assert finals["a"].error is None
    stats = loop.engine.adapters.stats
    assert (stats.disk_loads, stats.prefetch_loads, stats.prefetch_used) == (1, 1, 1)
    assert not loop.prefetcher.busy


def test_prefetches_evicted_unused_or_already_held_are_wasted(llama_dir, adapter_factory):
    (_, a), (_, b), *_ = adapter_factory(llama_dir)
    loop = _loop(llama_dir, max_loras=1, max_cpu_loras=1)
    loop.apply([PrefetchAdapters([a, b])])
    _settle(loop)
    stats = loop.engine.adapters.stats
    # The CPU cache holds one adapter: b pushed a out unused.
    assert (stats.prefetch_loads, stats.prefetch_wasted) == (2, 1)
    assert loop.engine.adapters.is_held(b.lora_int_id)
    loop.apply([PrefetchAdapters([b])])  # held: nothing to read
    assert not loop.prefetcher.busy
    _run(loop, [_add("b", b)])
    assert (stats.prefetch_used, stats.disk_loads) == (1, 2)
    assert loop.engine.snapshot().adapters_in_slots == (b.lora_int_id,)


def test_a_failed_read_ahead_leaves_the_request_to_fail_with_its_own_error(llama_dir, tmp_path):
    loop = _loop(llama_dir)
    missing = LoRARequest("missing", 77, str(tmp_path / "nowhere"))
    loop.apply([PrefetchAdapters([missing])])
    _settle(loop)
    assert loop.engine.adapters.stats.prefetch_loads == 0
    finals = _run(loop, [_add("gone", missing)])
    assert finals["gone"].error is not None and finals["gone"].error.code == "adapter_not_found"
    assert loop.engine.adapters.stats.disk_load_failures == 1  # the request's own read
    loop.apply([PrefetchAdapters([missing])])  # remembered as failed: not read again
    assert not loop.prefetcher.busy
