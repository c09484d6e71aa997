"""Adapters named by a model-hub id (``org/name``), fetched through ``huggingface_hub``.

A worker resolves hub ids only when its configuration allows it (``EngineConfig.hub``):

- ``off`` (the default): a hub id is refused; adapters come from the allowed local roots.
- ``offline``: only what is already in the local hub cache (e.g. fetched beforehand with
  ``hf download org/name``); nothing goes over the network.
- ``online``: missing adapters are downloaded. ``HF_HUB_OFFLINE=1`` still forces offline.

Only ``adapter_config.json`` and ``adapter_model.safetensors`` are fetched, never a pickled
``adapter_model.bin``; the files are then validated like any local adapter. Every failure is
an ``AdapterNotFoundError`` naming the adapter, so it is answered as a value and remembered
by the adapter manager's negative cache like a bad local folder.
"""

from __future__ import annotations

import re
from pathlib import Path

from lorafleet.producer.errors import AdapterNotFoundError

HUB_MODES = ("off", "offline", "online")

#: ``org/name`` as the hub spells repository ids (a single slash, no leading dot).
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

#: The files of a PEFT LoRA adapter that lorafleet reads.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def looks_like_hub_id(path: str) -> bool:
    """Whether ``path`` has the shape of a hub id (it may still be a local folder)."""
    return bool(HUB_ID.match(path)) and ".." not in path


def hub_cache_root(cache_dir: str | None) -> Path:
    """The folder hub files are kept in (``cache_dir`` or huggingface_hub's default)."""
    from huggingface_hub import constants

    return Path(cache_dir or constants.HF_HUB_CACHE).expanduser().resolve()


def fetch_adapter(repo_id: str, name: str, *, mode: str, cache_dir: str | None) -> Path:
    """The local folder of hub adapter ``repo_id`` (for request adapter ``name``).

    ``mode`` is one of ``HUB_MODES``. Raises ``AdapterNotFoundError`` when hub ids are not
    allowed, when offline and the adapter is not cached, or when the hub cannot serve it.
    """
    if mode not in ("offline", "online"):
        raise AdapterNotFoundError(
            f"adapter {name!r}: {repo_id!r} is not a local folder and downloading adapters "
            f"from a hub is disabled here (hub is 'off': LORAFLEET_HUB on a worker)"
        )
    from huggingface_hub import is_offline_mode, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = mode == "offline" or is_offline_mode()
    try:
        folder = snapshot_download(
            repo_id,
            cache_dir=cache_dir,
            local_files_only=offline,
            allow_patterns=list(ADAPTER_FILES),
        )
    except LocalEntryNotFoundError as e:
        if offline:
            why = "LORAFLEET_HUB=offline" if mode == "offline" else "HF_HUB_OFFLINE=1"
            raise AdapterNotFoundError(
                f"adapter {name!r}: hub repo {repo_id!r} is not in the local hub cache "
                f"({hub_cache_root(cache_dir)}) and this worker does not download ({why})"
            ) from None
        raise AdapterNotFoundError(
            f"adapter {name!r}: hub repo {repo_id!r} could not be downloaded and is not cached: {e}"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise AdapterNotFoundError(
            f"adapter {name!r}: hub repo {repo_id!r} is not available: {type(e).__name__}: {e}"
        ) from None
    return Path(folder)
