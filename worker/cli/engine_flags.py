"""The flags of a worker a command starts for itself (its configuration and start-up are
``lorafleet.worker.local.fleet``'s)."""

from __future__ import annotations

import argparse


def add_engine_flags(group: argparse._ArgumentGroup) -> None:
    """The flags sizing a local worker's engine (``dest`` is the ``WorkerConfig`` field)."""
    group.add_argument(
        "--device",
        help="device of the local worker: auto, cpu, cuda, cuda:N (default auto) "
        "[LORAFLEET_DEVICE]",
    )
    group.add_argument(
        "--max-model-len",
        type=int,
        help="prompt + output token limit of the local worker (default: the model's, lowered "
        "to what the KV cache holds) [LORAFLEET_MAX_MODEL_LEN]",
    )
    group.add_argument(
        "--kv-cache-mb",
        type=int,
        help="KV cache of the local worker, MiB (default: sized from the device's memory) "
        "[LORAFLEET_KV_CACHE_MB]",
    )
