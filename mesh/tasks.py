"""Root tasks of a process: named, supervised, and fatal when they fail.

A component's long-running loops (registry watches, lease keep-alive, publishers, rate trackers)
run as root tasks of its process under :func:`run_root_tasks`. A root task that crashes is logged
with its traceback and stops the whole process (after the given grace period for clean-up), rather
than leaving a process that looks alive but no longer watches or publishes: an orchestrator then
restarts it. This is the shape of kopf's reactor and of ``asyncio.TaskGroup``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import structlog

log = structlog.get_logger(__name__)


class RootTasks:
    """Start named root tasks; ``wait`` returns when ``stop`` is called or a task fails."""

    def __init__(self) -> None:
        self._tasks: list[asyncio.Task[Any]] = []
        self.stopping = asyncio.Event()
        self.failure: BaseException | None = None

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._done)
        self._tasks.append(task)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("root task failed; stopping the process", task=task.get_name(), exc_info=exc)
            if self.failure is None:
                self.failure = exc
            self.stopping.set()
        elif not self.stopping.is_set():
            log.error("root task ended unexpectedly; stopping the process", task=task.get_name())
            self.failure = RuntimeError(f"root task {task.get_name()} ended")
            self.stopping.set()

    def stop(self) -> None:
        self.stopping.set()

    async def wait(self) -> None:
        await self.stopping.wait()

    async def cancel_all(self, grace_s: float = 5.0) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=grace_s)
        self._tasks.clear()


async def call_soon_safely(fn: Callable[[], Awaitable[Any]], what: str) -> None:
    """Await ``fn()`` and log (not raise) its failure: for best-effort clean-up steps."""
    try:
        await fn()
    except Exception:
        log.warning("clean-up step failed", step=what, exc_info=True)
