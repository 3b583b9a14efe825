"""Loads that hang release their slots at the timeout; too many turn the runtime's loading off.

A real hang in a real loader: a joblib pickle whose ``__reduce__`` is ``time.sleep(600)`` (code
formats allowed, as by default), so ``joblib.load`` never returns within the test. Real processes
(``loadtest.cluster``): a private etcd, a router, runtime A with ``load_timeout_s`` 2 s, two load
slots and ``max_stuck_loads`` 3; later runtime B.

Asserted: two hung loads answer DEADLINE_EXCEEDED after the timeout, and a healthy model then loads
and answers on the same runtime at once (before the fix, both slots stayed taken: a healthy model
waited 40 s, forever on a stuck mount), with readiness still SERVING; a third hung load turns A's
readiness off, and A refuses loads; a new model then loads on runtime B, while A keeps serving the
model it holds. Marked slow.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import joblib
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loadtest.cluster import Cluster
from loadtest.load import bytes_call
from loadtest.management import register_many
from loadtest.models import TrainedModel, infer_body, train_logistic
from mesh.gen.mmesh import model_mesh_pb2 as mm
from mesh.gen.mmesh import model_mesh_pb2_grpc as mm_grpc

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(240)]

INFER = "/inference.GRPCInferenceService/ModelInfer"
ENV = {"MESH_RUNTIME_LOAD_TIMEOUT_S": "2", "MESH_RUNTIME_MAX_CONCURRENT_LOADS": "2",
       "MESH_RUNTIME_MAX_STUCK_LOADS": "3", "MESH_RUNTIME_SUPPORTED_TYPES": "sklearn"}


class Hang:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (time.sleep, (600,))


def hanging_model(directory: Path, name: str) -> Path:
    path = directory / name / "model.joblib"
    path.parent.mkdir(parents=True)
    joblib.dump(Hang(), path)
    return path


async def _serving(endpoint: str) -> bool:
    async with grpc.aio.insecure_channel(endpoint) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


async def _infer(channel: grpc.aio.Channel, model: TrainedModel | str, timeout: float = 30) -> str:
    body = infer_body(model) if isinstance(model, TrainedModel) else b""
    model_id = model.model_id if isinstance(model, TrainedModel) else model
    try:
        await bytes_call(channel, INFER)(body, metadata=(("mm-model-id", model_id),), timeout=timeout)
    except grpc.aio.AioRpcError as err:
        return err.code().name
    return "OK"


def test_hung_loads_release_their_slots_and_too_many_turn_loading_off(tmp_path: Path) -> None:
    healthy = [train_logistic(f"ok-{i}", tmp_path, n_features=4, seed=i, rows=60) for i in range(3)]
    hangs = [hanging_model(tmp_path, f"hang-{i}") for i in range(3)]
    with Cluster(log_level="warning") as cluster:
        a = cluster.start_runtime("runtime-a", extra_env=ENV)
        router = cluster.start_router(extra_env=ENV)
        asyncio.run(_first_part(router.endpoint, a.endpoint, healthy, hangs))
        b = cluster.start_runtime("runtime-b", extra_env=ENV)
        asyncio.run(_second_part(router.endpoint, a.endpoint, b.endpoint, healthy))


async def _first_part(router: str, a: str, healthy: list[TrainedModel], hangs: list[Path]) -> None:
    async with grpc.aio.insecure_channel(router) as channel:
        stub = mm_grpc.ModelMeshStub(channel)  # type: ignore[no-untyped-call]
        models = [(m.model_id, str(m.path)) for m in healthy] + [(p.parent.name, str(p)) for p in hangs]
        assert await register_many(stub, models, in_flight=4) == (len(models), {})

        started = time.monotonic()
        answers = await asyncio.gather(_infer(channel, "hang-0"), _infer(channel, "hang-1"))
        assert answers == ["DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED"], answers
        assert await _infer(channel, healthy[0]) == "OK"  # both slots were released at the timeout
        print(f"two hung loads, then a healthy model answered: {time.monotonic() - started:.1f} s")
        assert await _serving(a)

        assert await _infer(channel, "hang-2") == "DEADLINE_EXCEEDED"
        deadline = time.monotonic() + 10
        while await _serving(a):  # three stuck loads: readiness goes off with the next check
            assert time.monotonic() < deadline, "runtime A still SERVING with three stuck loads"
            await asyncio.sleep(0.2)
        assert await _infer(channel, healthy[1]) == "UNAVAILABLE"  # A takes no loads, and is alone
        assert await _infer(channel, healthy[0]) == "OK"  # what it holds, it serves


async def _second_part(router: str, a: str, b: str, healthy: list[TrainedModel]) -> None:
    async with grpc.aio.insecure_channel(router) as channel:
        deadline = time.monotonic() + 20
        while (answer := await _infer(channel, healthy[2])) != "OK":  # until the router sees B
            assert time.monotonic() < deadline, answer
            await asyncio.sleep(0.3)
        status = await mm_grpc.ModelMeshStub(channel).getModelStatus(  # type: ignore[no-untyped-call]
            mm.GetStatusRequest(modelId=healthy[2].model_id), timeout=10)
        assert [c.location for c in status.modelCopyInfos if c.location.startswith("runtime-b")], status
        assert await _infer(channel, healthy[0]) == "OK"
    assert not await _serving(a) and await _serving(b)
