"""The runtime's per-frame deadlines (mesh.transport.multiplex.Deadlines): frames whose deadlines
fall in one window share a timer, armed by the first and disarmed by the last to finish; an expired
frame's work is cancelled and raises TimeoutError, never before its timeout."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from mesh.transport.multiplex import Deadlines


class CountingLoop:
    """The running loop, counting the timers armed and disarmed through it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.armed = 0
        self.cancelled = 0

    def time(self) -> float:
        return self.loop.time()

    def call_at(self, when: float, callback: Any, *args: Any) -> asyncio.TimerHandle:
        self.armed += 1
        handle = self.loop.call_at(when, callback, *args)
        outer = self

        class Counted:
            def cancel(self) -> None:
                outer.cancelled += 1
                handle.cancel()

        return Counted()  # type: ignore[return-value]


async def test_frames_in_one_window_share_a_timer_disarmed_by_the_last() -> None:
    loop = CountingLoop(asyncio.get_running_loop())
    deadlines = Deadlines(loop, slack_s=10.0)  # type: ignore[arg-type]

    async def quick(i: int) -> int:
        await asyncio.sleep(0)
        return i

    results = await asyncio.gather(*(deadlines.run(quick(i), 30.0) for i in range(50)))
    assert results == list(range(50))
    assert (loop.armed, loop.cancelled) == (1, 1)
    assert await deadlines.run(quick(7), 30.0) == 7  # a new window: a timer of its own
    assert (loop.armed, loop.cancelled) == (2, 2)


async def test_an_expired_frame_is_cancelled_and_times_out_not_early() -> None:
    deadlines = Deadlines(asyncio.get_running_loop(), slack_s=0.01)
    cancelled = asyncio.Event()

    async def slow() -> None:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    started = asyncio.get_running_loop().time()
    with pytest.raises(TimeoutError):
        await deadlines.run(slow(), 0.1)
    elapsed = asyncio.get_running_loop().time() - started
    assert cancelled.is_set() and 0.1 <= elapsed < 1.0
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0  # the deadline's cancellation was consumed


async def test_a_cancellation_from_elsewhere_stays_a_cancellation() -> None:
    deadlines = Deadlines(asyncio.get_running_loop(), slack_s=0.01)
    task = asyncio.create_task(deadlines.run(asyncio.sleep(5), 30.0))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    deadlines.close()
