"""The sending side of ``mesh-loadtest``: one event loop per worker, one worker per process.

Requests are pre-encoded bytes (one body per model) sent through a multicallable without
serializers (``loadtest.load.bytes_call``), so the client spends nothing on protobuf.

**Open loop.** A worker sends at precomputed times (``loadtest.arrivals``) and measures each
latency from the time the request was *meant* to go, not from when it went: if the client falls
behind, the requests start late and their latency includes the lateness (no coordinated omission).
At most ``max_inflight`` requests are outstanding; one due beyond that is dropped and counted.
**Closed loop.** ``concurrency`` senders, each sending the next request when the last answered.

Both run ``warmup_s`` then ``duration_s``; only requests meant to start after the warm-up count in
the result. Every worker also reports each second of the run (elapsed from a wall-clock start
shared by all workers, so that their seconds line up): requests sent, answered, failed and a
histogram of the latencies that completed in it, for the live progress line and the plot.

With ``processes`` > 1, each worker is a spawned process (its own interpreter, event loop and uvloop)
sending its share (rate / P, concurrency / P); the parent merges what they report. Spawned, not
forked: gRPC's threads do not survive a fork.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
import numpy as np

from loadtest.arrivals import Popularity, Trace, open_loop_schedule
from loadtest.histogram import Histogram
from loadtest.load import bytes_call

INFER = "/inference.GRPCInferenceService/ModelInfer"
Metadata = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class WorkerConfig:
    target: str
    bodies: list[bytes]  # one pre-encoded ModelInferRequest per model
    metadata: list[Metadata]  # the model-selecting header per model (empty with --header none)
    popularity: Popularity
    duration_s: float
    warmup_s: float = 0.0
    rate: float = 0.0  # open loop when > 0 (total over all workers)
    arrivals: str = "poisson"  # poisson | bursty | trace
    cv: float = 1.0
    concurrency: int = 0  # closed loop when > 0 (total over all workers)
    trace: Trace | None = None
    max_inflight: int = 10_000
    timeout_s: float = 30.0
    seed: int = 0
    processes: int = 1
    # plain: a raw multicallable on a channel to the target; smart: mesh.client.SmartClient (the target
    # is a router; loaded models are sent straight to a runtime holding them).
    client: str = "plain"


@dataclass
class Window:
    """What one worker saw in one second (or, summed, all workers)."""

    second: int
    sent: int = 0
    ok: int = 0
    errors: int = 0
    hist: Histogram = field(default_factory=Histogram)

    def add(self, other: Window) -> None:
        self.sent += other.sent
        self.ok += other.ok
        self.errors += other.errors
        self.hist.merge(other.hist)


@dataclass
class WorkerResult:
    """The measured part of a run (after the warm-up)."""

    hist: Histogram = field(default_factory=Histogram)
    sent: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    dropped: int = 0
    paths: dict[str, int] = field(default_factory=dict)  # smart client: requests by path (SmartClient.counts)

    def add(self, other: WorkerResult) -> None:
        self.hist.merge(other.hist)
        self.sent += other.sent
        self.ok += other.ok
        self.dropped += other.dropped
        for path, n in other.paths.items():
            self.paths[path] = self.paths.get(path, 0) + n
        for code, n in other.errors.items():
            self.errors[code] = self.errors.get(code, 0) + n


class _Recorder:
    def __init__(self, start: float, measure_from: float, report: Callable[[Window], None]) -> None:
        self.start = start
        self.measure_from = measure_from
        self.report = report
        self.result = WorkerResult()
        self.window = Window(0)

    def sent(self, intended: float) -> None:
        self.window.sent += 1
        if intended >= self.measure_from:
            self.result.sent += 1

    def done(self, intended: float, latency: float, code: str | None) -> None:
        measured = intended >= self.measure_from
        if code is None:
            self.window.ok += 1
            self.window.hist.record(latency)
            if measured:
                self.result.ok += 1
                self.result.hist.record(latency)
        else:
            self.window.errors += 1
            if measured:
                self.result.errors[code] = self.result.errors.get(code, 0) + 1

    async def tick(self) -> None:
        """Report each second as it ends (cancelled at the end of the run, which reports the rest)."""
        while True:
            await asyncio.sleep(max(self.start + self.window.second + 1 - time.perf_counter(), 0))
            self.flush()

    def flush(self) -> None:
        window, self.window = self.window, Window(self.window.second + 1)
        self.report(window)


async def _send(call: grpc.aio.UnaryUnaryMultiCallable, body: bytes, md: Metadata, timeout_s: float,
                rec: _Recorder, intended: float) -> None:
    rec.sent(intended)
    code: str | None = None
    try:
        await call(body, metadata=md, timeout=timeout_s)
    except grpc.aio.AioRpcError as err:
        code = err.code().name
    rec.done(intended, time.perf_counter() - intended, code)


async def _open_loop(cfg: WorkerConfig, worker: int, call: grpc.aio.UnaryUnaryMultiCallable,
                     rec: _Recorder) -> None:
    rng = np.random.default_rng([cfg.seed, worker])
    times = open_loop_schedule(cfg.arrivals, cfg.cv, cfg.rate, cfg.warmup_s + cfg.duration_s, rng, cfg.trace,
                               worker, cfg.processes)
    models = cfg.popularity.pick(len(times), rng, offset=worker, stride=cfg.processes)
    inflight: set[asyncio.Task[None]] = set()
    clock = time.perf_counter
    for t, m in zip((rec.start + times).tolist(), models.tolist(), strict=True):
        delay = t - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(inflight) >= cfg.max_inflight:
            if t >= rec.measure_from:
                rec.result.dropped += 1
            continue
        task = asyncio.create_task(_send(call, cfg.bodies[m], cfg.metadata[m], cfg.timeout_s, rec, t))
        inflight.add(task)
        task.add_done_callback(inflight.discard)
    if inflight:
        await asyncio.gather(*inflight)


async def _closed_loop(cfg: WorkerConfig, worker: int, call: grpc.aio.UnaryUnaryMultiCallable,
                       rec: _Recorder) -> None:
    share = cfg.concurrency // cfg.processes + (1 if worker < cfg.concurrency % cfg.processes else 0)
    end = rec.start + cfg.warmup_s + cfg.duration_s
    rng = np.random.default_rng([cfg.seed, worker])

    async def sender(k: int) -> None:
        clock = time.perf_counter
        chunk = 0
        while True:
            stride = cfg.processes * share
            picks = cfg.popularity.pick(1024, rng, offset=worker * share + k + chunk * 1024 * stride,
                                        stride=stride).tolist()
            chunk += 1
            for m in picks:
                now = clock()
                if now >= end:
                    return
                await _send(call, cfg.bodies[m], cfg.metadata[m], cfg.timeout_s, rec, now)

    await asyncio.gather(*(sender(k) for k in range(share)))


async def run_worker(cfg: WorkerConfig, worker: int, start_wall: float, report: Callable[[Window], None]
                     ) -> WorkerResult:
    """Run one worker's share; ``start_wall`` (time.time()) is the shared start of second 0."""
    start = time.perf_counter() + (start_wall - time.time())
    rec = _Recorder(start, start + cfg.warmup_s, report)
    async with contextlib.AsyncExitStack() as stack:
        if cfg.client == "smart":
            from mesh.client import SmartClient

            smart = await stack.enter_async_context(SmartClient(cfg.target))
            await smart.wait_synced(5.0)  # until then it sends everything to the router: no error either way
            call: Any = smart
        else:
            channel = await stack.enter_async_context(grpc.aio.insecure_channel(cfg.target))
            call = bytes_call(channel, INFER)
        await asyncio.sleep(max(start - time.perf_counter(), 0))
        ticker = asyncio.create_task(rec.tick(), name=f"loadtest-ticker-{worker}")
        try:
            if cfg.rate > 0:
                await _open_loop(cfg, worker, call, rec)
            else:
                await _closed_loop(cfg, worker, call, rec)
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
        rec.flush()
        if cfg.client == "smart":
            rec.result.paths = dict(smart.counts)
    return rec.result


def _process_main(cfg: WorkerConfig, worker: int, start_wall: float,
                  out: multiprocessing.Queue[tuple[str, object]]) -> None:
    import uvloop

    try:
        result = uvloop.run(run_worker(cfg, worker, start_wall, lambda w: out.put(("second", w))))
        out.put(("done", result))
    except BaseException as exc:  # reported to the parent, which turns it into one line
        out.put(("error", f"worker {worker}: {type(exc).__name__}: {exc}"))


class WorkerFailed(RuntimeError):
    """A worker process ended without a result."""


class _Merger:
    """Sums each second over the workers and passes it on once every worker has reported it."""

    def __init__(self, workers: int, on_second: Callable[[Window], None]) -> None:
        self.workers = workers
        self.on_second = on_second
        self.pending: dict[int, tuple[int, Window]] = {}

    def add(self, window: Window) -> None:
        seen, total = self.pending.get(window.second, (0, Window(window.second)))
        total.add(window)
        if seen + 1 == self.workers:
            self.pending.pop(window.second, None)
            self.on_second(total)
        else:
            self.pending[window.second] = (seen + 1, total)


def start_delay_s(processes: int) -> float:
    """How far ahead to set the shared start: room to open channels, or to start the interpreters."""
    return 0.2 if processes == 1 else 1.5 + 0.2 * processes


async def run(cfg: WorkerConfig, on_second: Callable[[Window], None], start_wall: float) -> WorkerResult:
    """Run all workers from ``start_wall`` (time.time()); returns the merged measured result."""
    merger = _Merger(cfg.processes, on_second)
    if cfg.processes == 1:
        return await run_worker(cfg, 0, start_wall, merger.add)
    ctx = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue[tuple[str, Any]] = ctx.Queue()
    procs = [ctx.Process(target=_process_main, args=(replace(cfg), i, start_wall, out), daemon=True)
             for i in range(cfg.processes)]
    for p in procs:
        p.start()
    total = WorkerResult()
    done = 0
    try:
        while done < cfg.processes:
            try:
                kind, payload = await asyncio.to_thread(out.get, True, 1.0)
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):
                    raise WorkerFailed("a worker process died") from None
                continue
            if kind == "second":
                merger.add(payload)
            elif kind == "done":
                total.add(payload)
                done += 1
            else:
                raise WorkerFailed(payload)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
    return total
