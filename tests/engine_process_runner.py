"""Requests through a real engine child process, for tests of the engine on every path."""

from __future__ import annotations

import asyncio

from lorafleet.worker.engine.config import EngineConfig
from lorafleet.worker.process.async_engine import AsyncEngine


def generate_in_engine_process(config: EngineConfig, prompts, params, loras):
    """(engine info, RequestOutputs) of ``prompts`` run through an engine child process."""

    async def run():
        engine = AsyncEngine(config)
        await engine.start()
        try:
            streams = [
                engine.add_request(f"r{i}", p, params, lora)
                for i, (p, lora) in enumerate(zip(prompts, loras, strict=True))
            ]
            return engine.info, [await s.result() for s in streams]
        finally:
            await engine.stop()

    return asyncio.run(run())
