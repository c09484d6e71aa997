"""The demos' assets as they ship in the package (``assets/<demo>/``): where they are and
how their adapters and JSON records are read. Torch-free: the CLI and the queue worker's
side read these files."""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import cache
from pathlib import Path

from lorafleet.producer.types import LoRARequest


def shipped_dir(demo: str) -> Path:
    """Folder of one demo's shipped assets (``lorafleet/worker/demo/assets/<demo>``)."""
    # Package data is installed as plain files (setuptools wheels are never zipped on
    # install), so a filesystem path is what transformers and PEFT need anyway.
    return Path(__file__).resolve().parent / "assets" / demo


def adapter_folders(root: Path) -> dict[str, Path]:
    """Name -> PEFT adapter folder, for every ``root/<name>/adapter_config.json`` (sorted by
    name); a missing ``root`` gives none."""
    return {
        p.parent.name: p.parent for p in sorted(root.glob("*/adapter_config.json")) if p.is_file()
    }


def lora_requests(
    adapters: Mapping[str, Path], base_model_name: str | None = None
) -> dict[str, LoRARequest]:
    """Name -> request for each adapter folder, in name order with ids 1, 2, ...: the same
    adapters get the same ids on every run."""
    return {
        name: LoRARequest(name, i, str(path), base_model_name=base_model_name)
        for i, (name, path) in enumerate(sorted(adapters.items()), start=1)
    }


@cache
def read_record(path: Path) -> dict:
    """A shipped JSON record, read once per process (callers copy what they hand out)."""
    return json.loads(path.read_text(encoding="utf-8"))
