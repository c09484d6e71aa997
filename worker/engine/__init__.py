"""The inference engine (runs in the engine process; torch): ``LLMEngine`` and the
in-process ``LLM`` front end, with the scheduler, block manager, sequences, sampler,
detokenizer, model runner, step layout, decode graphs, KV-cache sizing and the engine's
configuration and outputs.

May import: ``model``, ``adapters``, ``kernels``, the producer's wire types. ``config`` and
``outputs`` are torch-free: the queue worker's side reads them. This ``__init__`` imports
nothing, so those two stay light.
"""
