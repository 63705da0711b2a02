"""Ending a background task (the batcher's worker, the deletion listener, pending refits, start-up)."""

from __future__ import annotations

import asyncio
import contextlib


async def cancel(task: asyncio.Task | None) -> None:
    """Cancel `task` (None: nothing to do) and wait until it has stopped; its CancelledError stays with it."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
