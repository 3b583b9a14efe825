"""mesh.transport.inflight: requests and bytes in flight per connection and per process (the
200 concurrent 16 MiB bodies against real servers: tests/e2e/test_inflight_bounds.py)."""

from __future__ import annotations

import asyncio
import time

import pytest

from mesh.errors import ResourceExhausted
from mesh.transport import inflight
from mesh.transport.inflight import TRIM_AFTER_BYTES, InflightLimit

MIB = 1 << 20


def test_the_process_bound_refuses_past_its_bytes_and_requests_but_always_takes_one_call() -> None:
    limit = InflightLimit(max_bytes=40 * MIB, max_requests=3)
    first = limit.enter(100 * MIB)  # alone: never refused, even past the bound
    with pytest.raises(ResourceExhausted, match=r"1 requests \(100 MiB\) in flight"):
        limit.enter(1)
    limit.leave(100 * MIB, first)
    taken = [limit.enter(10 * MIB) for _ in range(3)]
    with pytest.raises(ResourceExhausted, match="limit is 3 requests"):
        limit.enter(1)
    for c in taken:
        limit.leave(10 * MIB, c)
    assert (limit.requests, limit.bytes, limit.refused) == (0, 0, 2)


def test_one_connection_cannot_take_the_whole_process() -> None:
    limit = InflightLimit(max_bytes=1000 * MIB, max_requests=100, max_connection_bytes=32 * MIB)
    a = [limit.enter(16 * MIB, "ipv4:10.0.0.1:1") for _ in range(2)]
    with pytest.raises(ResourceExhausted, match="this connection has 2 requests"):
        limit.enter(16 * MIB, "ipv4:10.0.0.1:1")
    b = limit.enter(16 * MIB, "ipv4:10.0.0.2:1")  # another connection is not held back
    assert limit.connections == 2
    for c in a:
        limit.leave(16 * MIB, c)
    limit.leave(16 * MIB, b)
    assert limit.connections == 0 and limit.bytes == 0  # no state left for closed connections


async def test_a_burst_of_large_bodies_asks_for_memory_back_once_after_it(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    trims: list[float] = []
    monkeypatch.setattr(inflight, "trim", lambda collect=True: trims.append(time.monotonic()) or True)
    limit = InflightLimit(max_bytes=1 << 40, max_requests=10**6, on_burst=inflight.trim_soon(0.05))
    for _ in range(3 * TRIM_AFTER_BYTES // (16 * MIB)):  # three thresholds' worth, refused or not
        limit.leave(16 * MIB, limit.enter(16 * MIB))
    await asyncio.sleep(0.3)
    assert 1 <= len(trims) <= 2  # during and after the burst, not once per body
    limit.leave(1, limit.enter(1))  # small traffic: no trim
    await asyncio.sleep(0.15)
    assert len(trims) <= 2
