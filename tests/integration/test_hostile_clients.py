"""What a careless or hostile client can send, against a real router and runtime on 127.0.0.1 (and a
real etcd where the registry matters): each gets a precise status, and nothing else changes.

- a deadline of 60 days (past the 49.7 days a u32 of milliseconds holds) is served, not INTERNAL;
- a shape of 65 dimensions, or a BYTES request of more elements than the bound, is INVALID_ARGUMENT;
- registrations with a 3 MB path or key, too many labels or a minCopies of 1000 are INVALID_ARGUMENT
  (a permanent error, never UNAVAILABLE), and the router's readiness does not move;
- a malformed ``models/`` record written straight into etcd is skipped by every watch and counted;
  the router and runtime stay up, other models serve, and a request for that model says why;
(100,000 distinct unknown model IDs against a router process: tests/e2e/test_unknown_ids_memory.py.)
"""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh.gen.inference import grpc_service_pb2 as pb
from mesh.gen.mmesh import model_mesh_pb2 as mm
from mesh.registry import open_store
from mesh.registry.etcd_server import EtcdProcess
from mesh.registry.keys import Keys
from mesh.tensors import decode_response, encode_request
from tests.support.inprocess import InProcessMesh, memory_url
from tests.support.models import make_model

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

DAY_S = 86_400


async def test_a_sixty_day_deadline_is_served(tmp_path: Path) -> None:
    mesh = await InProcessMesh(memory_url()).start(runtimes=1)
    try:
        model = make_model("sklearn", tmp_path, seed=1)
        await mesh.register("m", "sklearn", str(model.path))
        request = encode_request(model_name="m", inputs={"x": model.sample})
        for timeout in (60 * DAY_S, 49.8 * DAY_S, 0.5 * DAY_S):
            out = decode_response(await mesh.infer("m", request, timeout=timeout))
            np.testing.assert_array_equal(out["predict"], model.expected["predict"])
    finally:
        await mesh.stop()


async def test_too_many_dimensions_or_bytes_elements_are_invalid_argument(tmp_path: Path) -> None:
    mesh = await InProcessMesh(memory_url()).start(runtimes=1)
    try:
        model = make_model("sklearn", tmp_path, seed=1)
        await mesh.register("m", "sklearn", str(model.path))
        deep = pb.ModelInferRequest(model_name="m", inputs=[pb.ModelInferRequest.InferInputTensor(
            name="x", datatype="FP32", shape=[1] * 65)], raw_input_contents=[b"\0" * 4])
        wide = pb.ModelInferRequest(model_name="m", inputs=[pb.ModelInferRequest.InferInputTensor(
            name="x", datatype="BYTES", shape=[2_000_000])], raw_input_contents=[b"\0" * 8_000_000])
        for request, message in ((deep, "65 dimensions, over the limit of 64"),
                                 (wide, "over the limit of 1048576")):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await mesh.infer("m", request)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert message in (caught.value.details() or "")
        out = decode_response(await mesh.infer("m", encode_request(model_name="m", inputs={"x": model.sample})))
        np.testing.assert_array_equal(out["predict"], model.expected["predict"])
    finally:
        await mesh.stop()


async def test_oversize_registrations_are_invalid_argument_and_readiness_holds(etcd: EtcdProcess) -> None:
    mesh = await InProcessMesh(etcd.url).start(runtimes=1)
    assert mesh.router is not None
    health = health_pb2_grpc.HealthStub(mesh.channel)
    try:
        cases = [
            (mm.ModelInfo(type="sklearn", path="/m/" + "p" * 3_000_000), "modelInfo.path is 3000003 bytes"),
            (mm.ModelInfo(type="sklearn", path="/m", key="{" + " " * 3_000_000 + "}"), "modelInfo.key is"),
            (mm.ModelInfo(type="sklearn", path="/m", labels=[f"l{i}" for i in range(100)]), "100 labels"),
            (mm.ModelInfo(type="sklearn", path="/m", minCopies=1000), "minCopies is 1000 copies"),
            (mm.ModelInfo(type="x" * 200, path="/m"), "modelInfo.type is 200 characters"),
        ]

        async def flood() -> None:
            for info, message in cases * 4:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await mesh.mesh.registerModel(mm.RegisterModelRequest(modelId="big", modelInfo=info), timeout=10)
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
                assert message in (caught.value.details() or ""), caught.value.details()

        async def probe() -> list[int]:
            seen = []
            for _ in range(40):
                reply = await health.Check(health_pb2.HealthCheckRequest(service="mmesh.ModelMesh"), timeout=2)
                seen.append(reply.status)
                await asyncio.sleep(0.02)
            return seen

        _, statuses = await asyncio.gather(flood(), probe())
        assert set(statuses) == {health_pb2.HealthCheckResponse.SERVING}
        status = await mesh.mesh.getModelStatus(mm.GetStatusRequest(modelId="big"), timeout=10)
        assert status.status == mm.ModelStatusInfo.NOT_FOUND  # nothing was written
    finally:
        await mesh.stop()


async def test_a_malformed_registry_record_is_skipped_and_counted(etcd: EtcdProcess, tmp_path: Path) -> None:
    port = _free_port()
    mesh = await InProcessMesh(etcd.url, router_overrides={"metrics_port": port}).start(runtimes=1)
    store, prefix = open_store(etcd.url)
    try:
        model = make_model("sklearn", tmp_path, seed=2)
        await mesh.register("good", "sklearn", str(model.path))
        request = encode_request(model_name="good", inputs={"x": model.sample})
        await mesh.infer("good", request)
        keys = Keys(prefix)
        for raw in (b"not json", b'{"model_id": 5, "type": "sklearn"}', b"[1, 2]", b'{"type": "sklearn"}'):
            await store.put(keys.model("bad"), raw)
        await store.put(keys.vmodel("bad-alias"), b'{"vmodel_id": "bad-alias", "active_model_id": 7}')
        await store.put(keys.placement("good", "nobody"), b"\xff\xfe")
        await asyncio.sleep(1.0)  # the watches deliver them
        for _ in range(3):  # router and runtime are alive and serve the good model
            out = decode_response(await mesh.infer("good", request))
            np.testing.assert_array_equal(out["predict"], model.expected["predict"])
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await mesh.infer("bad", encode_request(model_name="bad", inputs={"x": model.sample}))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "ModelSpec" in (caught.value.details() or "")
        text = await asyncio.to_thread(_scrape, port)
        counted = [line for line in text.splitlines() if line.startswith("mesh_registry_bad_records_total")]
        assert counted and float(counted[0].split()[-1]) >= 2, counted
        assert all(not r.task.done() for r in [mesh.router, *mesh.runtimes] if r is not None)
    finally:
        await store.close()
        await mesh.stop()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


async def test_a_second_runtime_with_the_same_instance_id_refuses_to_start() -> None:
    """Two processes with one instance ID would overwrite each other's records and placements: the
    second waits for the first's lease (it could be its own previous life) and then refuses, naming
    the holder; the first keeps serving."""
    from mesh.errors import InvalidArgument

    mesh = InProcessMesh(memory_url())
    first = await mesh.add_runtime(instance_id="runtime-0")
    await mesh.start(runtimes=0)
    try:
        in_use = f"instance ID 'runtime-0' is in use by the runtime at {first.endpoint}"
        with pytest.raises(InvalidArgument, match=in_use):
            await mesh.add_runtime(instance_id="runtime-0")
        assert not first.task.done()
    finally:
        await mesh.stop()
