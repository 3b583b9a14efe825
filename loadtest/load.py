"""Closed-loop load: ``concurrency`` workers, each sending the next request when the last answered.

The request is pre-encoded bytes sent through a multicallable without serializers, so the client
spends nothing on protobuf. A phase is a warm-up (answers discarded), a pause until every worker
has finished its last call, then the measured part: the ``on_start`` hook runs with nothing in
flight, the workers run for ``duration_s``, stop issuing, and drain, and ``on_end`` runs again with
nothing in flight. So CPU readings taken in the hooks cover exactly the measured requests, and the
throughput is measured requests over the time from start to drain.

Latency is taken around each ``await`` with ``perf_counter``: it includes the client's own event
loop delays, which on a 2-core machine shared with the servers are part of what a co-located
client sees.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np

Metadata = Sequence[tuple[str, str]]


def percentile_ms(latencies_s: Sequence[float], q: float) -> float:
    if not latencies_s:
        return float("nan")
    return float(np.percentile(np.asarray(latencies_s), q)) * 1000


@dataclass
class PhaseResult:
    name: str
    concurrency: int
    requests: int
    seconds: float
    latencies_s: list[float] = field(repr=False)
    errors: dict[str, int]
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def throughput_rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    def p(self, q: float) -> float:
        return percentile_ms(self.latencies_s, q)

    def add(self, other: PhaseResult) -> None:
        """Fold another segment of the same phase into this one (interleaved rounds)."""
        self.requests += other.requests
        self.seconds += other.seconds
        self.latencies_s.extend(other.latencies_s)
        for code, n in other.errors.items():
            self.errors[code] = self.errors.get(code, 0) + n

    def summary(self) -> dict[str, object]:
        return {"name": self.name, "concurrency": self.concurrency, "requests": self.requests,
                "seconds": round(self.seconds, 3), "throughput_rps": round(self.throughput_rps, 1),
                "p50_ms": round(self.p(50), 3), "p90_ms": round(self.p(90), 3),
                "p99_ms": round(self.p(99), 3), "errors": self.errors,
                **{k: round(v, 6) for k, v in self.extra.items()}}


async def _run_workers(call: grpc.aio.UnaryUnaryMultiCallable, body: bytes, metadata: Metadata,
                       concurrency: int, duration_s: float, timeout_s: float,
                       latencies: list[float] | None, errors: dict[str, int]) -> int:
    end = time.perf_counter() + duration_s
    done = 0

    async def worker() -> None:
        nonlocal done
        clock = time.perf_counter
        while clock() < end:
            started = clock()
            try:
                await call(body, metadata=metadata, timeout=timeout_s)
            except grpc.aio.AioRpcError as err:
                errors[err.code().name] = errors.get(err.code().name, 0) + 1
                continue
            if latencies is not None:
                latencies.append(clock() - started)
            done += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done


async def closed_loop(call: grpc.aio.UnaryUnaryMultiCallable, body: bytes, metadata: Metadata, *,
                      name: str, concurrency: int, duration_s: float, warmup_s: float,
                      timeout_s: float = 30.0, on_start: Callable[[], None] | None = None,
                      on_end: Callable[[], None] | None = None) -> PhaseResult:
    if warmup_s > 0:
        await _run_workers(call, body, metadata, concurrency, warmup_s, timeout_s, None, {})
    if on_start is not None:
        on_start()
    latencies: list[float] = []
    errors: dict[str, int] = {}
    started = time.perf_counter()
    done = await _run_workers(call, body, metadata, concurrency, duration_s, timeout_s, latencies, errors)
    elapsed = time.perf_counter() - started
    if on_end is not None:
        on_end()
    return PhaseResult(name, concurrency, done, elapsed, latencies, errors)


def bytes_call(channel: grpc.aio.Channel, method: str) -> grpc.aio.UnaryUnaryMultiCallable:
    """A multicallable that sends and returns raw bytes (no serializers)."""
    return channel.unary_unary(method)
