"""Named background tasks that cannot die silently (shared by the registry modules).

``spawn`` wraps ``asyncio.create_task``: the task gets a name (visible in ``asyncio.all_tasks()``
and in logs) and a done-callback that logs any exception with its traceback. The caller keeps the
returned task (asyncio holds only weak references) and ends it with :func:`cancel_and_wait`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import structlog

log = structlog.get_logger(__name__)

T = TypeVar("T")


def spawn(coro: Coroutine[Any, Any, T], *, name: str) -> asyncio.Task[T]:
    task = asyncio.get_running_loop().create_task(coro, name=name)
    task.add_done_callback(_log_crash)
    return task


def _log_crash(task: asyncio.Task[Any]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error("background task crashed", task=task.get_name(), exc_info=exc)


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` and wait for it to finish; its own crash was already logged."""
    if task is None or task.done():
        return
    task.cancel()
    if task is asyncio.current_task():
        return  # a task closing its own owner: it ends when it next awaits
    # wait() neither raises the task's outcome nor swallows our own cancellation.
    await asyncio.wait({task})
