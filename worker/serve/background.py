"""The queue worker's background loops (abort listener, stream publisher, heartbeat, slot
watch, queue-length reader): each runs as one asyncio task for its owner's lifetime and
ends when the owner closes."""

from __future__ import annotations

import asyncio
import contextlib


async def stop_task(task: asyncio.Task | None) -> None:
    """Cancel ``task`` and wait until it has ended (``None``: never started, nothing to do).

    Its ``CancelledError`` stays here: closing an owner must not look like the closer
    being cancelled. Whatever the loop did before it saw the cancellation is done."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
