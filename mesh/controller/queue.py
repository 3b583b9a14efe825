"""The controller's work queue and back-off, in the shape of client-go's workqueue.

Events only say *which* Predictor to look at; the reconciler reads the latest object when its turn
comes. So a key queued twice is reconciled once, a key is never reconciled by two workers at once
(an event arriving meanwhile queues it again for after), and a failed key comes back after an
exponential delay of its own, without holding up the others.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class Backoff:
    """Delays ``first``, 2x, 4x, ... capped at ``cap``; ``reset`` after a success."""

    def __init__(self, first: float = 0.5, cap: float = 30.0) -> None:
        self.first, self.cap = first, max(cap, first)
        self.failures = 0

    def next(self) -> float:
        delay: float = min(self.first * 2.0 ** min(self.failures, 30), self.cap)
        self.failures += 1
        return delay

    def reset(self) -> None:
        self.failures = 0


class WorkQueue(Generic[K]):
    def __init__(self) -> None:
        self._queue: asyncio.Queue[K] = asyncio.Queue()
        self._queued: set[K] = set()
        self._active: set[K] = set()
        self._again: set[K] = set()
        self._timers: dict[K, asyncio.TimerHandle] = {}

    def add(self, key: K, delay_s: float = 0.0) -> None:
        if delay_s > 0:
            loop = asyncio.get_running_loop()
            timer = self._timers.get(key)
            if timer is not None and timer.when() <= loop.time() + delay_s:
                return  # already due sooner
            if timer is not None:
                timer.cancel()
            self._timers[key] = loop.call_later(delay_s, self._fire, key)
            return
        if key in self._queued:
            return
        if key in self._active:
            self._again.add(key)
            return
        self._queued.add(key)
        self._queue.put_nowait(key)

    def _fire(self, key: K) -> None:
        self._timers.pop(key, None)
        self.add(key)

    async def get(self) -> K:
        key = await self._queue.get()
        self._queued.discard(key)
        self._active.add(key)
        return key

    def done(self, key: K) -> None:
        self._active.discard(key)
        if key in self._again:
            self._again.discard(key)
            self.add(key)

    def __len__(self) -> int:
        return len(self._queued) + len(self._timers)

    def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
