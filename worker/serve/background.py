"""The queue worker's background loops (abort listener, stream publisher, heartbeat, slot
watch, queue-length reader, holdings watch, queue prefetch): each runs as one asyncio task
for its owner's lifetime and ends when the owner closes."""

from __future__ import annotations

import asyncio
import contextlib
from typing import ClassVar


async def stop_task(task: asyncio.Task | None) -> None:
    """Cancel ``task`` and wait until it has ended (``None``: never started, nothing to do).

    Its ``CancelledError`` stays here: closing an owner must not look like the closer
    being cancelled. Whatever the loop did before it saw the cancellation is done."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


class BackgroundLoop:
    """An owner of one such loop: ``start()`` runs ``run()`` (a subclass's loop, until
    cancelled) as the task ``lorafleet-{task_name}``; ``close()`` stops it."""

    task_name: ClassVar[str]
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name=f"lorafleet-{self.task_name}")

    async def close(self) -> None:
        await stop_task(self._task)

    async def run(self) -> None:
        raise NotImplementedError
