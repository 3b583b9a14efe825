"""A small driver for the peers: V2 JSON over HTTP (Ray Serve, and MLServer or our router over REST) or
V2 gRPC (MLServer, our router), N models.

Closed loop (``concurrency`` workers, each sending its next request when the last answered) or
open loop (``rps`` arrivals per second at fixed spacing, or at the precomputed send times
``arrivals`` (seconds from the start, e.g. Poisson from ``loadtest.arrivals``), at most
``max_in_flight`` outstanding;
an arrival that finds the cap reached is counted as error ``DROPPED``, not queued, so a slow peer
shows up as errors rather than as a silently lower offered rate). Models are chosen by cycling
through ``order`` (indices into ``models``; default round-robin), so both peers see the same
sequence of model IDs. Bodies are encoded once per model before the clock starts.
``on_measure``, if given, is awaited between the warm-up and the measured part (the scenario reads
its load counters there, so that a phase's figures exclude its warm-up).

Results are :class:`loadtest.load.PhaseResult`; ``extra["peak_rss_mb"]`` is the peak of the summed
RSS of the peer's process tree during the measured part (sampled every 0.25 s by ``_proc``).

HTTP: one client for every system, so that a difference between systems is the server's: aiohttp,
one ``ClientSession`` (``http_session``: keep-alive, a connection pool as large as the most requests
ever in flight), bodies given as bytes (``bodies``: the caller can serialize them once and hand every
system the same bytes) and the response read in full before a request counts as answered.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from loadtest.load import PhaseResult
from loadtest.peers._proc import PeerProcess
from mesh import gctune

if TYPE_CHECKING:
    import aiohttp
    import grpc

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


@dataclass(frozen=True)
class Target:
    model_id: str
    sample: np.ndarray  # FP32 [rows, features]


Send = Callable[[int], Awaitable[str | None]]  # model index -> None when OK, else an error name
OnMeasure = Callable[[], Awaitable[None]]


async def _run(send: Send, n_models: int, *, concurrency: int, duration_s: float,
               rps: float | None, max_in_flight: int, order: Sequence[int] | None,
               latencies: list[float] | None, errors: dict[str, int],
               arrivals: Sequence[float] | None = None) -> int:
    picks = itertools.cycle(order or range(n_models))
    clock = time.perf_counter
    end = clock() + duration_s
    done = 0

    async def one() -> None:
        nonlocal done
        started = clock()
        err = await send(next(picks))
        if err is not None:
            errors[err] = errors.get(err, 0) + 1
            return
        if latencies is not None:
            latencies.append(clock() - started)
        done += 1

    if rps is None and arrivals is None:
        async def worker() -> None:
            while clock() < end:
                await one()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done

    in_flight: set[asyncio.Task[None]] = set()
    start = clock()
    times: Sequence[float] | np.ndarray
    if arrivals is not None:
        times = arrivals
    else:
        assert rps is not None
        times = np.arange(0.0, duration_s, 1.0 / rps)
    for at in times:
        if at >= duration_s:
            break
        await asyncio.sleep(max(0.0, start + at - clock()))
        if len(in_flight) >= max_in_flight:
            errors["DROPPED"] = errors.get("DROPPED", 0) + 1
            continue
        task = asyncio.create_task(one())
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    if in_flight:
        await asyncio.gather(*in_flight)
    return done


async def measure(name: str, send: Send, n_models: int, *, concurrency: int, duration_s: float,
                  warmup_s: float, rps: float | None, max_in_flight: int,
                  order: Sequence[int] | None, proc: PeerProcess | None,
                  arrivals: Sequence[float] | None = None,
                  on_measure: OnMeasure | None = None) -> PhaseResult:
    """A warm-up (answers dropped), ``on_measure``, then the measured part: closed loop at
    ``concurrency``, or open loop at ``rps`` or at the send times ``arrivals``."""

    async def run(seconds: float, latencies: list[float] | None, errors: dict[str, int]) -> int:
        return await _run(send, n_models, concurrency=concurrency, duration_s=seconds, rps=rps,
                          max_in_flight=max_in_flight, order=order, latencies=latencies,
                          errors=errors, arrivals=arrivals)

    if warmup_s > 0:
        await run(warmup_s, None, {})
    if on_measure is not None:
        await on_measure()
    if proc is not None:
        proc.reset_peak()
    # The driver's own collector, set up as our servers' are (mesh.gctune): a full collection here
    # took 95-190 ms, a pause that landed in the latencies of whichever system was measured.
    gctune.tune()
    latencies: list[float] = []
    errors: dict[str, int] = {}
    started = time.perf_counter()
    done = await run(duration_s, latencies, errors)
    elapsed = time.perf_counter() - started
    result = PhaseResult(name, concurrency, done, elapsed, latencies, errors)
    if proc is not None:
        result.extra["peak_rss_mb"] = max(proc.peak_rss_bytes, proc.rss_bytes()) / 2**20
    return result


def v2_json_body(sample: np.ndarray, input_name: str = "input") -> bytes:
    return json.dumps({"inputs": [{"name": input_name, "shape": list(sample.shape),
                                   "datatype": "FP32",
                                   "data": sample.astype(np.float32).ravel().tolist()}]}).encode()


def http_session(limit: int, timeout_s: float = 30.0) -> aiohttp.ClientSession:
    """The HTTP client every system gets: keep-alive connections, at most ``limit`` of them."""
    import aiohttp

    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit),
                                 timeout=aiohttp.ClientTimeout(total=timeout_s))


def http_send(session: aiohttp.ClientSession,
              requests: Sequence[tuple[str, bytes, Mapping[str, str]]]) -> Send:
    """POST ``requests[i]`` (url, body, headers); 200 is an answer, anything else an error name."""
    import aiohttp

    async def send(i: int) -> str | None:
        url, body, headers = requests[i]
        try:
            async with session.post(url, data=body, headers=headers) as resp:
                await resp.read()
                return None if resp.status == 200 else f"HTTP_{resp.status}"
        except (TimeoutError, aiohttp.ClientError) as err:
            return type(err).__name__

    return send


async def drive_http(base_url: str, models: Sequence[Target], *, name: str = "http",
                     concurrency: int = 8, duration_s: float = 10.0, warmup_s: float = 1.0,
                     rps: float | None = None, max_in_flight: int = 256,
                     order: Sequence[int] | None = None, proc: PeerProcess | None = None,
                     timeout_s: float = 30.0,
                     arrivals: Sequence[float] | None = None,
                     on_measure: OnMeasure | None = None,
                     bodies: Sequence[bytes] | None = None,
                     session: aiohttp.ClientSession | None = None) -> PhaseResult:
    """POST ``{base_url}/v2/models/{id}/infer`` with ``serve_multiplexed_model_id: {id}`` (Ray
    routes on it; the others ignore it). ``bodies``: one per model (default: ``v2_json_body`` of its
    sample); ``session``: the caller's (kept open, its connections reused), else one of our own."""
    if bodies is None:
        bodies = [v2_json_body(m.sample) for m in models]
    reqs = [(f"{base_url}/v2/models/{m.model_id}/infer", body,
             {"content-type": "application/json", "serve_multiplexed_model_id": m.model_id})
            for m, body in zip(models, bodies, strict=True)]

    async def run(client: aiohttp.ClientSession) -> PhaseResult:
        return await measure(name, http_send(client, reqs), len(models), concurrency=concurrency,
                             duration_s=duration_s, warmup_s=warmup_s, rps=rps,
                             max_in_flight=max_in_flight, order=order, proc=proc,
                             arrivals=arrivals, on_measure=on_measure)

    if session is not None:
        return await run(session)
    open_loop = rps is not None or arrivals is not None
    async with http_session(max(concurrency, max_in_flight if open_loop else concurrency),
                            timeout_s) as own:
        return await run(own)


def grpc_send(call: grpc.aio.UnaryUnaryMultiCallable, bodies: Sequence[bytes],
              timeout_s: float = 30.0) -> Send:
    """Call with ``bodies[i]`` (bytes, no serializers); OK is an answer, else the status's name."""
    import grpc

    async def send(i: int) -> str | None:
        try:
            await call(bodies[i], timeout=timeout_s)
        except grpc.aio.AioRpcError as err:
            return str(err.code().name)
        return None

    return send


async def drive_grpc(target: str, models: Sequence[Target], *, name: str = "grpc",
                     concurrency: int = 8, duration_s: float = 10.0, warmup_s: float = 1.0,
                     rps: float | None = None, max_in_flight: int = 256,
                     order: Sequence[int] | None = None, proc: PeerProcess | None = None,
                     timeout_s: float = 30.0, raw: bool = True,
                     arrivals: Sequence[float] | None = None,
                     on_measure: OnMeasure | None = None) -> PhaseResult:
    """V2 gRPC ``ModelInfer`` with pre-serialized requests (MLServer, or our own router)."""
    import grpc

    from mesh.tensors import encode_request

    bodies = [encode_request(model_name=m.model_id, inputs={"input-0": m.sample.astype(np.float32)},
                             raw=raw).SerializeToString() for m in models]
    async with grpc.aio.insecure_channel(target) as channel:
        send = grpc_send(channel.unary_unary(MODEL_INFER), bodies, timeout_s)
        return await measure(name, send, len(models), concurrency=concurrency,
                            duration_s=duration_s, warmup_s=warmup_s, rps=rps,
                            max_in_flight=max_in_flight, order=order, proc=proc,
                            arrivals=arrivals, on_measure=on_measure)
