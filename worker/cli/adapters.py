"""Adapters named on the command line, as ``LoRARequest``s with ids stable across runs."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from lorafleet.producer.types import LoRARequest
from lorafleet.worker.cli.errors import UsageError


def stable_lora_id(name: str, path: str) -> int:
    """A ``lora_int_id`` derived from name and path: the same adapter gets the same id in
    every invocation, so one-off commands never clash with ids a shared worker has cached."""
    digest = hashlib.sha256(f"{name}\0{path}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % (2**31 - 1) + 1


def folder_lora(folder: Path, name: str | None = None) -> LoRARequest:
    """The request for the adapter in ``folder`` (named after it unless ``name``)."""
    path = str(folder.expanduser().resolve())
    name = name or folder.name
    return LoRARequest(name, stable_lora_id(name, path), path)


def parse_lora_flags(specs: Sequence[str]) -> list[LoRARequest]:
    """``--lora NAME=PATH`` values as requests; a malformed or repeated name is refused."""
    loras: list[LoRARequest] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--lora wants NAME=PATH, got {spec!r}")
        if any(lora.lora_name == name for lora in loras):
            raise UsageError(f"--lora names {name!r} twice: give each adapter its own name")
        loras.append(folder_lora(Path(path), name))
    return loras
