"""The event loop's connections to one model worker, for predictions (``mesh.runtime.workers``).

Per worker, a pool of asyncio Unix-socket connections (at most ``CHANNELS_PER_WORKER``, opened on
demand, reused most recent first), each carrying one request at a time and served by a thread of
its own in the worker. A request is one write (header, model ID and body together); the answer is
parsed as it arrives (:class:`Channel`), its header checked against the limit before anything
more is kept. A connection belongs to its worker's generation (a restarted worker's are dropped),
and one that ends a request without a whole answer (a deadline, a cancelled caller, an answer
refused, bytes nobody asked for) is dropped, never reused. No thread of the runtime's is involved.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Protocol, cast

from mesh.errors import MeshError, ResourceExhausted
from mesh.runtime.forwarding import CopyLost
from mesh.runtime.worker import HEADER, OP_INFER, FrameTooLarge, error_of

# Connections the event loop keeps to one worker, each carrying one prediction at a time (a thread
# each in the worker). Past this, predictions wait for one to come free: the worker's threads share
# one GIL, so more in flight buys little for quick models (4 gave no more than 8 on the hop
# scenario, BENCHMARKS section 9), while a few slow predictions still leave connections free.
CHANNELS_PER_WORKER = 8


class Worker(Protocol):
    """What the pool needs of a worker process (``mesh.runtime.workers.WorkerProcess``)."""

    index: int
    generation: int
    ready: threading.Event
    socket_path: Path


class WorkerGone(CopyLost):
    """The worker holding the model died under the request: the router retries elsewhere."""


class OutOfStep(MeshError):
    """A worker wrote what nobody asked for, or more than its answer: its connection is dropped."""


class Channel(asyncio.Protocol):
    """One connection from the event loop to a worker, carrying one request at a time.

    The answer is parsed as it arrives: the header first, checked against the request's limit
    before anything more is kept (so a worker cannot make the runtime allocate what it announces),
    then the chunks the transport hands over, joined once. Whatever ends the request other than a
    whole answer (a timeout, a cancelled caller, an answer over the limit) leaves the connection
    out of step, and the caller aborts it rather than put it back."""

    def __init__(self, generation: int) -> None:
        self.generation = generation
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self._limit = 0
        self._chunks: list[bytes] = []
        self._have = 0
        self._need = -1  # the whole frame's length once its header is in
        self._tag = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport's subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(EOFError("the worker closed the connection"))

    def eof_received(self) -> None:
        self.closed = True  # at once: the transport closes on the next loop pass, not before a reuse
        self._fail(EOFError("the worker closed the connection"))

    def request(self, frame: bytes, limit: int) -> asyncio.Future[tuple[int, bytes]]:
        """Send ``frame``; the future is the answer's ``(tag, payload)``: FrameTooLarge past
        ``limit``, EOFError when the connection ends first, OutOfStep for bytes beyond the answer."""
        assert self.transport is not None and self._waiter is None
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        self._limit, self._chunks, self._have, self._need = limit, [], 0, -1
        if self.closed or self.transport.is_closing():
            self._fail(EOFError("the worker closed the connection"))
            return waiter
        try:
            self.transport.write(frame)  # sent at once when the socket takes it (no buffered write)
        except (RuntimeError, OSError):  # uvloop's answer for a transport closed meanwhile
            self.closed = True
            self._fail(EOFError("the worker closed the connection"))
        return waiter

    def abort(self) -> None:
        self.closed = True
        self._waiter = None
        self._chunks = []
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._waiter is None:
            self._fail(OutOfStep("a model worker wrote to a connection with no request on it"))
            return
        self._chunks.append(data)
        self._have += len(data)
        if self._need < 0:
            if self._have < HEADER.size:
                return
            if len(self._chunks) > 1:
                self._chunks = [b"".join(self._chunks)]
            length, tag = HEADER.unpack_from(self._chunks[0])
            if length > self._limit:
                self._fail(FrameTooLarge(f"a frame of {length} bytes, over the limit of {self._limit}"))
                return
            self._tag, self._need = tag, HEADER.size + length
        if self._have < self._need:
            return
        if self._have > self._need:
            self._fail(OutOfStep("a model worker wrote more than its answer"))
            return
        chunks = self._chunks
        answer = chunks[0][HEADER.size:] if len(chunks) == 1 else \
            b"".join([chunks[0][HEADER.size:], *chunks[1:]])  # the body copied once, not per chunk
        waiter, self._waiter, self._chunks = self._waiter, None, []
        if not waiter.done():
            waiter.set_result((self._tag, answer))

    def _fail(self, exc: Exception) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        if not isinstance(exc, EOFError):
            self.abort()


class Channels:
    """A worker's connections from one event loop, for predictions: idle ones of the worker's
    current generation are reused, at most ``CHANNELS_PER_WORKER`` exist, and the next caller
    waits for one to come free."""

    def __init__(self, worker: Worker, loop: asyncio.AbstractEventLoop) -> None:
        self.worker = worker
        self.loop = loop
        self.idle: list[Channel] = []
        self.slots = asyncio.Semaphore(CHANNELS_PER_WORKER)

    def clear(self) -> None:
        idle, self.idle = self.idle, []
        for channel in idle:
            channel.abort()

    async def infer(self, generation: int, prefix: bytes, body: bytes, *, timeout: float, limit: int) -> bytes:
        """One prediction, on a connection to the worker's ``generation``; no thread. The same
        answers as ``WorkerProcess.call``: the worker's error as its MeshError, TimeoutError past
        ``timeout``, ResourceExhausted over ``limit``, WorkerGone when the worker died (or
        restarted) under the call. A caller cancelled in flight costs its connection (the answer
        would arrive on it later), never the next request's answer."""
        worker = self.worker
        await self.slots.acquire()
        try:
            channel = None
            while self.idle:
                held = self.idle.pop()
                if not held.closed and held.generation == generation and held.transport is not None \
                        and not held.transport.is_closing():
                    channel = held
                    break
                held.abort()
            if channel is None:
                channel = await self._connect(generation)
            # One write of header, model and body (the body copied once): a second system call
            # costs more than the copy at inference sizes.
            waiter = channel.request(b"".join((HEADER.pack(len(prefix) + len(body), OP_INFER), prefix, body)), limit)
            # The deadline is the worker's answer's: the wait for a free connection is not counted
            # (the requests holding them end by their own deadlines).
            timer = self.loop.call_later(timeout, _expire, waiter)
            whole = False
            try:
                tag, answer = await waiter
                whole = True
            except FrameTooLarge as exc:
                raise ResourceExhausted(f"model worker {worker.index} answered {exc}") from None
            except EOFError:
                raise WorkerGone(f"model worker {worker.index} died during the call") from None
            finally:
                timer.cancel()
                if whole and not channel.closed and channel.generation == worker.generation:
                    self.idle.append(channel)
                else:  # out of step (a timeout, a cancelled caller, an answer refused) or stale
                    channel.abort()
        finally:
            self.slots.release()
        if tag:
            raise error_of(tag, answer.decode("utf-8", "replace"))
        return answer

    async def _connect(self, generation: int) -> Channel:
        worker = self.worker
        if generation != worker.generation or not worker.ready.is_set():
            raise WorkerGone(f"model worker {worker.index} is not running")
        try:
            _, channel = await self.loop.create_unix_connection(lambda: Channel(generation), str(worker.socket_path))
        except OSError as exc:
            raise WorkerGone(f"model worker {worker.index} is not running ({exc.strerror})") from None
        return channel


def _expire(waiter: asyncio.Future[tuple[int, bytes]]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError("no answer before the deadline"))


__all__ = ["CHANNELS_PER_WORKER", "Channel", "Channels", "OutOfStep", "WorkerGone"]
