"""``AsyncEngine``: the engine in its own process, driven from asyncio over a socket pair.

Outputs equal the in-process engine's; the engine's counters come back with every step;
a load failure, the engine's death and a stop each end in a clear state, never a hang.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from lorafleet.producer import SamplingParams
from lorafleet.producer.errors import InternalError, PromptTooLongError
from lorafleet.worker import LLM
from lorafleet.worker.engine.config import EngineConfig
from lorafleet.worker.process.async_engine import AsyncEngine, EngineStartError

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
LONG = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)


def _config(llama_dir, **kw) -> EngineConfig:
    return EngineConfig(model=str(llama_dir), max_loras=2, max_lora_rank=16, **kw)


def test_outputs_deltas_and_snapshot_match_the_in_process_engine(llama_dir, adapter_factory):
    adapters = [req for spec, req in adapter_factory(llama_dir) if spec.rank <= 16]
    loras = [None, adapters[0], adapters[1], None, adapters[0]]
    prompts = [f"prompt {i}" for i in range(len(loras))]
    expected = LLM(str(llama_dir), max_loras=2, max_lora_rank=16).generate(
        prompts, GREEDY, lora_request=loras
    )
    steps = []

    async def run():
        engine = AsyncEngine(_config(llama_dir))
        engine.step_observer = steps.append
        await engine.start()
        try:
            streams = [
                engine.add_request(f"r{i}", p, GREEDY, lora)
                for i, (p, lora) in enumerate(zip(prompts, loras, strict=True))
            ]
            deltas = [[d async for d in s] for s in streams]
            results = [await s.result() for s in streams]
            return engine.info, engine.snapshot, deltas, results, engine.num_requests
        finally:
            await engine.stop()

    info, snap, deltas, results, left = asyncio.run(run())
    assert [r.outputs[0].token_ids for r in results] == [e.outputs[0].token_ids for e in expected]
    for per_request, result in zip(deltas, results, strict=True):
        assert "".join(d.text for d in per_request) == result.outputs[0].text
        assert per_request[-1].finished and per_request[-1].finish_reason == "length"
    assert info.config.device == "cpu" and info.dtype == "float32" and info.max_model_len == 512
    assert left == 0
    assert snap.running == snap.waiting == snap.slots_in_use == 0
    assert snap.num_blocks > 0 and snap.free_blocks == snap.num_blocks
    assert snap.adapters.disk_loads == 2 and snap.cpu_adapters == 2
    assert sum(s.num_tokens for s in steps) >= sum(len(r.prompt_token_ids) for r in results)


def test_request_errors_arrive_on_the_stream(llama_dir):
    async def run():
        engine = AsyncEngine(_config(llama_dir))
        await engine.start()
        try:
            too_long = engine.add_request("long", "word " * 2000, GREEDY)
            fine = engine.add_request("fine", "hello", GREEDY)
            with pytest.raises(InternalError, match="already in flight"):
                engine.add_request("fine", "again", GREEDY)
            with pytest.raises(PromptTooLongError, match="max_model_len is 512"):
                await too_long.result()
            return await fine.result()
        finally:
            await engine.stop()

    assert len(asyncio.run(run()).outputs[0].token_ids) == GREEDY.max_tokens


def test_abort_finishes_the_stream_with_abort(llama_dir):
    async def run():
        engine = AsyncEngine(_config(llama_dir))
        await engine.start()
        try:
            stream = engine.add_request("a", "abort me", LONG)
            async for _ in stream:
                engine.abort("a")
            return await stream.result()
        finally:
            await engine.stop()

    out = asyncio.run(run()).outputs[0]
    assert out.finish_reason == "abort" and len(out.token_ids) < LONG.max_tokens


def test_load_failure_raises_with_the_reason(llama_dir):
    async def run():
        await AsyncEngine(_config(llama_dir, kv_cache_bytes=1024)).start()

    with pytest.raises(
        EngineStartError, match=r"KV cache \(kv_cache_bytes=1024\) holds only 0 tokens"
    ):
        asyncio.run(run())


def test_engine_death_fails_open_streams_and_calls_on_exit(llama_dir):
    exits = []

    async def run():
        engine = AsyncEngine(_config(llama_dir), on_exit=exits.append)
        await engine.start()
        try:
            stream = engine.add_request("doomed", "the end", LONG)
            async for _ in stream:
                os.kill(engine.pid, signal.SIGKILL)
                break
            with pytest.raises(InternalError, match="engine process exited with status -9"):
                await asyncio.wait_for(stream.result(), 10)
            with pytest.raises(InternalError, match="not running"):
                engine.add_request("late", "x", GREEDY)
        finally:
            await engine.stop()

    asyncio.run(run())
    assert exits == [-9]


def test_a_hung_engine_is_killed_and_fails_open_streams(llama_dir):
    """A stopped (not dead) engine process answers no step: past ``stall_timeout_s`` the
    watchdog kills it and the death path runs. Idle time, and time the worker itself was
    frozen, are never a stall."""
    exits = []
    timeout = 1.0

    async def run():
        engine = AsyncEngine(_config(llama_dir), on_exit=exits.append, stall_timeout_s=timeout)
        await engine.start()
        try:
            await asyncio.sleep(2.5 * timeout)  # idle, no request waiting: not a stall
            ok = await engine.add_request("fine", "hello", GREEDY).result()
            assert not engine.stalled
            # Worker and engine frozen together (Ctrl-Z, a paused VM; here a blocked loop):
            # on resume the engine answers again, and is not blamed for the pause.
            paused = engine.add_request("paused", "both frozen", LONG)
            async for _ in paused:
                os.kill(engine.pid, signal.SIGSTOP)
                time.sleep(3 * timeout)
                os.kill(engine.pid, signal.SIGCONT)
                break
            assert len((await paused.result()).outputs[0].token_ids) == LONG.max_tokens
            assert not engine.stalled
            stream = engine.add_request("wedged", "the engine freezes", LONG)
            async for _ in stream:
                os.kill(engine.pid, signal.SIGSTOP)
                break
            frozen_at = time.monotonic()
            with pytest.raises(InternalError, match=r"hung \(no step in 1s\) and was killed"):
                await asyncio.wait_for(stream.result(), 10 * timeout)
            return ok, time.monotonic() - frozen_at, engine.stalled
        finally:
            await engine.stop()

    ok, detected_after, stalled = asyncio.run(run())
    assert len(ok.outputs[0].token_ids) == GREEDY.max_tokens
    assert stalled and exits == [-9]
    assert timeout <= detected_after < timeout + 3


def test_stop_ends_the_engine_process(llama_dir):
    async def run():
        engine = AsyncEngine(_config(llama_dir))
        await engine.start()
        pid = engine.pid
        stream = engine.add_request("cut", "stopped midway", LONG)
        async for _ in stream:
            break
        await engine.stop()
        with pytest.raises(InternalError, match="stopped"):
            await stream.result()
        return pid

    pid = asyncio.run(run())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_the_worker_process_never_imports_torch():
    code = (
        "import sys, lorafleet.worker.serve.settings, lorafleet.worker.serve.jobs, lorafleet.worker.serve.metrics;"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
