"""A runtime that stops answering (SIGSTOP: the process is there, its sockets open, nothing moves)
under load costs at most the requests that were in flight on it.

Real processes (``loadtest.cluster``): a private etcd, two runtimes and a router, 20 small
scikit-learn models warmed so that their copies sit on both runtimes by their hashing homes. A
closed-loop client with 8 requests in flight (deadline 4 s each) sends for 12 s; runtime 0 is
SIGSTOPped at 3 s and SIGCONTed at 9 s. The router's channels to runtimes ping every second and
give up on a peer after one more: the stopped runtime's streams break within about 2 s, the
requests waiting on them are retried on the other runtime (which loads those models), and the
router routes around the stopped one until it answers again. Lease expiry (10 s here) plays no part.

Asserted: at most 8 requests fail (those in flight on the stopped runtime, if their deadline ran
out before the retry); the router served requests throughout the stop; after SIGCONT everything
answers. Marked slow (three processes, 12 s of load).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import grpc
import pytest

from loadtest.cluster import Cluster
from loadtest.load import bytes_call
from loadtest.management import register_many, wait_loaded
from loadtest.models import infer_body, train_logistic
from mesh.gen.mmesh import model_mesh_pb2_grpc as mm_grpc

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(300)]

INFER = "/inference.GRPCInferenceService/ModelInfer"
MODELS, IN_FLIGHT, DEADLINE_S = 20, 8, 4.0
STOP_AT_S, CONT_AT_S, END_S = 3.0, 9.0, 12.0


def test_a_sigstopped_runtime_costs_at_most_the_requests_in_flight_on_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    models = [train_logistic(f"stop-{i:02d}", tmp_path, n_features=8, seed=i, rows=100) for i in range(MODELS)]
    with Cluster(log_level="warning") as cluster:
        runtimes = [cluster.start_runtime(f"runtime-{i}") for i in range(2)]
        router = cluster.start_router()
        results = asyncio.run(_run(router.endpoint, models, runtimes[0].pid))
    ok_during = [t for t, ok in results if ok and STOP_AT_S + 2.5 <= t <= CONT_AT_S]
    failed = [t for t, ok in results if not ok]
    print(f"{len(results)} requests, {len(failed)} failed at {[round(t, 2) for t in failed]}; "
          f"{len(ok_during)} answered while stopped (from 2.5 s after the stop)")
    assert len(failed) <= IN_FLIGHT
    assert all(STOP_AT_S <= t <= STOP_AT_S + DEADLINE_S + 1 for t in failed)
    assert len(ok_during) > 50  # routed around the stopped runtime
    assert any(ok for t, ok in results if t > CONT_AT_S + 1)


async def _run(endpoint: str, models, stopped_pid: int) -> list[tuple[float, bool]]:  # type: ignore[no-untyped-def]
    async with grpc.aio.insecure_channel(endpoint) as channel:
        stub = mm_grpc.ModelMeshStub(channel)  # type: ignore[no-untyped-call]
        done, errors = await register_many(stub, [(m.model_id, str(m.path)) for m in models], in_flight=4)
        assert (done, errors) == (MODELS, {})
        call = bytes_call(channel, INFER)
        for m in models:  # one at a time: each model on its hashing home
            await call(infer_body(m), metadata=(("mm-model-id", m.model_id),), timeout=30)
            await wait_loaded(stub, m.model_id)
        results: list[tuple[float, bool]] = []  # (seconds since start, answered)
        start = time.monotonic()
        turn = iter(range(10**9))

        async def worker() -> None:
            while (now := time.monotonic() - start) < END_S:
                m = models[next(turn) % MODELS]
                try:
                    await call(infer_body(m), metadata=(("mm-model-id", m.model_id),), timeout=DEADLINE_S)
                    results.append((now, True))
                except grpc.aio.AioRpcError:
                    results.append((now, False))

        async def stop_and_continue() -> None:
            await asyncio.sleep(STOP_AT_S)
            os.kill(stopped_pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(CONT_AT_S - STOP_AT_S)
            finally:
                os.kill(stopped_pid, signal.SIGCONT)

        await asyncio.gather(stop_and_continue(), *(worker() for _ in range(IN_FLIGHT)))
        return results
