"""The engine process and its link to the queue worker: ``engine_process`` (the child that
owns the device and steps an ``LLMEngine``), ``link`` (the messages and their framing) and
``async_engine`` (the worker's asyncio front of the child).

May import: ``engine`` (``engine_process`` only: the child side). ``link`` and
``async_engine`` run in the queue worker and never import torch.
"""
