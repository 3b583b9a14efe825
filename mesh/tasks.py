"""Every task a process starts has an owner: the one mechanism for background work.

* **Root tasks** (:class:`RootTasks`): a component's long-running loops (registry watches,
  publishers, rate trackers). One that crashes is logged with its traceback and stops the whole
  process (after a grace period for clean-up), rather than leaving a process that looks alive but
  no longer watches or publishes: an orchestrator then restarts it. This is the shape of kopf's
  reactor and of ``asyncio.TaskGroup``.
* **Background tasks** (:class:`Background`): short-lived work a component starts and does not
  await (a load, an unload, a probe, a copy being added). Its owner keeps a reference until the
  task ends (asyncio keeps only weak ones: an unreferenced task can vanish mid-flight), the task is
  named, its failure is logged with its traceback, and the owner cancels what is left at shutdown.
* :func:`spawn` is the primitive both use: a named task whose crash is logged. A task whose death
  must change the process's state (the lease keep-alive) says so in its own ``finally``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import structlog

log = structlog.get_logger(__name__)

T = TypeVar("T")


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


def spawn(coro: Coroutine[Any, Any, T], *, name: str) -> asyncio.Task[T]:
    """A named task whose exception, if any, is logged with its traceback. The caller keeps the
    returned task and ends it with :func:`cancel_and_wait`."""
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


class Background:
    """The short-lived tasks of one owner (module docstring)."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = spawn(coro, name=f"{self.owner}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def __len__(self) -> int:
        return len(self._tasks)

    async def cancel_all(self, grace_s: float = 5.0) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=grace_s)


async def call_soon_safely(fn: Callable[[], Awaitable[Any]], what: str) -> None:
    """Await ``fn()`` and log (not raise) its failure: for best-effort clean-up steps."""
    try:
        await fn()
    except Exception:
        log.warning("clean-up step failed", step=what, exc_info=True)
