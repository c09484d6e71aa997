"""Inference worker: engine, scheduler, adapters, model, arq worker settings.

Names resolve lazily so ``import lorafleet.worker`` stays light (no torch) until used.
"""

from importlib import import_module

_LAZY = {
    "LLM": "lorafleet.worker.engine.llm",
    "LLMEngine": "lorafleet.worker.engine.llm_engine",
    "EngineConfig": "lorafleet.worker.engine.config",
    # Built from LORAFLEET_* on each lookup: `arq lorafleet.worker.WorkerSettings`.
    "WorkerSettings": "lorafleet.worker.serve.worker_settings",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lorafleet.worker' has no attribute {name!r}")
    return getattr(import_module(module), name)


__all__ = sorted(_LAZY)
