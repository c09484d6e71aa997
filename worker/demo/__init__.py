"""Demos and synthetic models: the character-level demo's assets, the chat demo's tasks and
adapters for the real model, and random tiny models and PEFT adapters built offline (for
tests, benchmarks and load tests).

May import: ``model.catalog``, the producer. ``demo_assets`` and ``chat_demo`` are
torch-free (both read their files through ``shipped``); ``synthetic`` builds models with
torch and transformers.
"""
