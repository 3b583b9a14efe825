"""Requests and bytes in flight, bounded per client connection and per process.

Why: nothing else bounds them. gRPC reads each message whole before a handler sees it (up to
``router.max_message_bytes``), and a handler then holds the body until the answer is sent (the
router while the runtime computes; the runtime while it decodes and predicts). 200 concurrent
16 MiB bodies took a router from 62 MiB to 3.7 GiB RSS, and kept it there.

What bounds them, in layers:

- ``router.max_streams_per_connection`` (HTTP/2 ``SETTINGS_MAX_CONCURRENT_STREAMS``): a
  connection has at most that many calls open, so at most that many messages being read. A
  gRPC client queues the calls beyond it; one that opens them anyway has them refused by the
  transport (REFUSED_STREAM, UNAVAILABLE at the client: retryable).
- This module, in the handlers: a call whose body would take the process past
  ``router.max_inflight_bytes`` or ``router.max_inflight_requests``, or its connection past
  ``router.max_connection_inflight_bytes``, is answered RESOURCE_EXHAUSTED at once, and its body
  dropped; a connection or process with nothing in flight always takes one call, so a single
  message up to ``max_message_bytes`` is never refused. The router counts from the arrival of a
  call to its answer; a runtime counts its inference calls the same way (its callers are routers,
  so only the process bound applies there).
- ``mesh.malloc``: messages of 4 MiB and more are given back to the system when freed, so a burst
  of large bodies does not leave the process at its peak.

Counting costs a dict lookup and two additions per call.
"""

from __future__ import annotations

import asyncio
import functools
import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from mesh.errors import ResourceExhausted
from mesh.malloc import trim

_MIB = 1 << 20
TRIM_AFTER_BYTES = 64 * _MIB
TRIM_DELAY_S = 0.5


class Connection:
    """One client connection's calls in flight."""

    __slots__ = ("bytes", "peer", "requests")

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.requests = 0
        self.bytes = 0


class InflightLimit:
    def __init__(self, *, max_bytes: int, max_requests: int, max_connection_bytes: int = 0,
                 on_burst: Callable[[], None] | None = None) -> None:
        self.max_bytes = max_bytes
        self.max_requests = max_requests
        self.max_connection_bytes = max_connection_bytes  # 0: no per-connection bound
        self.bytes = 0
        self.requests = 0
        self.refused = 0
        # Called each time TRIM_AFTER_BYTES more were read (refused bodies count: gRPC read them
        # too): the app gives a burst's memory back to the system after it (trim_soon).
        self.on_burst = on_burst
        self._since_trim = 0
        self._connections: dict[str, Connection] = {}  # while it has calls in flight

    def enter(self, size: int, peer: str = "") -> Connection | None:
        """Count a call of ``size`` bytes from connection ``peer`` (its counters returned, for
        ``leave``), or raise ResourceExhausted at once (the caller drops the body)."""
        if self.requests and (self.bytes + size > self.max_bytes or self.requests >= self.max_requests):
            self.refused += 1
            self._count(size)
            raise ResourceExhausted(
                f"this server has {self.requests} requests ({self.bytes // _MIB} MiB) in flight, its limit is "
                f"{self.max_requests} requests and {self.max_bytes // _MIB} MiB; retry later or send smaller "
                "requests")
        connection = None
        if self.max_connection_bytes and peer:
            connection = self._connections.get(peer)
            if connection is None:
                connection = self._connections[peer] = Connection(peer)
            elif connection.bytes + size > self.max_connection_bytes:
                self.refused += 1
                self._count(size)
                raise ResourceExhausted(
                    f"this connection has {connection.requests} requests ({connection.bytes // _MIB} MiB) in "
                    f"flight, its limit is {self.max_connection_bytes // _MIB} MiB; wait for answers before "
                    "sending more")
            connection.requests += 1
            connection.bytes += size
        self.requests += 1
        self.bytes += size
        self._count(size)
        return connection

    def _count(self, size: int) -> None:
        self._since_trim += size
        if self._since_trim >= TRIM_AFTER_BYTES:
            self._since_trim = 0
            if self.on_burst is not None:
                self.on_burst()

    def leave(self, size: int, connection: Connection | None) -> None:
        self.requests -= 1
        self.bytes -= size
        if connection is not None:
            connection.requests -= 1
            connection.bytes -= size
            if not connection.requests:
                del self._connections[connection.peer]

    @contextmanager
    def admit(self, size: int, peer: str = "") -> Iterator[None]:
        """``enter`` and ``leave`` around a block."""
        connection = self.enter(size, peer)
        try:
            yield
        finally:
            self.leave(size, connection)

    @property
    def connections(self) -> int:
        return len(self._connections)


def trim_soon(delay_s: float = TRIM_DELAY_S) -> Callable[[], None]:
    """An ``on_burst`` for this event loop: ``mesh.malloc.trim`` on a worker thread ``delay_s``
    after a call, and again ``delay_s`` after the last call that came meanwhile (so a burst's
    calls make a trim or two during it and one after it)."""
    loop = asyncio.get_running_loop()
    state = {"pending": False, "again": False}

    def run() -> None:
        gc.collect()  # here, on the loop's thread: what it frees (gRPC calls among them) belongs here
        loop.run_in_executor(None, functools.partial(trim, collect=False))
        if state["again"]:
            state["again"] = False
            loop.call_later(delay_s, run)
        else:
            state["pending"] = False

    def burst() -> None:
        if state["pending"]:
            state["again"] = True
        else:
            state["pending"] = True
            loop.call_later(delay_s, run)

    return burst


__all__ = ["InflightLimit", "trim_soon"]
