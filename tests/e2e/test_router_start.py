"""A router's start-up against a registry with many registrations and copies (issue 22, part 4):
it serves its port at once and says NOT_SERVING until its view is built, SERVING after, and routes
to a loaded copy as soon as it says SERVING.

The registry is filled the way ``loadtest.scenarios.router_start`` fills it (20,000 registrations,
2,000 loaded copies on 4 stand-in instances, written straight to etcd), next to a real runtime
holding one real loaded model. The router is started while etcd is frozen (SIGSTOP): it cannot
build its view, so the NOT_SERVING answers are observed without a race against a fast start; then
etcd is thawed and the router must become SERVING and route at once. The timing at a million
registrations is the benchmark's business (BENCHMARKS.md), not this test's.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loadtest.cluster import Cluster
from loadtest.scenarios.router_start import fill, spawn_router
from mesh.embedded.up import terminate
from mesh.gen.inference import grpc_service_pb2 as pb
from mesh.gen.inference import grpc_service_pb2_grpc as pb_grpc
from mesh.gen.mmesh import model_mesh_pb2 as mm
from mesh.gen.mmesh import model_mesh_pb2_grpc as mm_grpc
from mesh.gen.mmesh import status_pb2 as st
from mesh.gen.mmesh import status_pb2_grpc as st_grpc
from mesh.registry.etcd import EtcdStore
from mesh.registry.keys import Keys
from mesh.tensors import decode_response, encode_request
from tests.support.models import make_model

pytestmark = pytest.mark.e2e

REGISTRATIONS = 20_000
COPIES = 2_000
INSTANCES = 4
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
FROZEN_S = 2.0  # how long the router is watched while it cannot build its view


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_router_says_not_serving_until_its_view_is_built_then_routes_at_once(tmp_path: Path) -> None:
    model = make_model("sklearn", tmp_path, 1)
    with Cluster(log_level="info") as cluster:
        runtime = cluster.start_runtime()
        first = cluster.start_router("router-first")
        async with grpc.aio.insecure_channel(first.endpoint) as channel:
            await mm_grpc.ModelMeshStub(channel).registerModel(mm.RegisterModelRequest(
                modelId="hot", modelInfo=mm.ModelInfo(type="sklearn", path=str(model.path)), loadNow=True,
                sync=True), timeout=60)
        store = EtcdStore([cluster.etcd.endpoint], timeout_s=30.0)
        try:
            # Leases long enough to outlive the freeze below; kept alive by ``store``.
            await fill(store, Keys("/mesh/"), models=REGISTRATIONS, copies=COPIES, instances=INSTANCES,
                       lease_ttl_s=60, txn_ops=128)
            port = free_port()
            address = f"127.0.0.1:{port}"
            env = {**os.environ, "MESH_REGISTRY_URL": cluster.etcd.url, "MESH_ROUTER_PORT": str(port),
                   "MESH_ROUTER_HOST": "127.0.0.1", "MESH_ROUTER_METRICS_PORT": "0", "MESH_ROUTER_REST_PORT": "-1",
                   "MESH_PARENT_PID": str(os.getpid()), "MESH_LOG_FORMAT": "json", "MESH_LOG_LEVEL": "info"}
            os.kill(cluster.etcd.pid or 0, signal.SIGSTOP)
            thawed = False
            log_path = tmp_path / "router.log"
            proc = spawn_router(env, log_path)
            try:
                async with grpc.aio.insecure_channel(address) as channel:
                    health = health_pb2_grpc.HealthStub(channel)
                    v2 = pb_grpc.GRPCInferenceServiceStub(channel)

                    async def status() -> int | None:
                        try:
                            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                        except grpc.aio.AioRpcError:
                            return None  # not listening yet
                        return int(reply.status)

                    deadline = time.monotonic() + 60
                    while (seen := await status()) is None:
                        assert proc.poll() is None, log_path.read_text()[-3000:]
                        assert time.monotonic() < deadline, "the router never served its port"
                        await asyncio.sleep(0.05)
                    # Listening, its view not built (etcd is frozen): NOT_SERVING, and honest answers.
                    watched_until = time.monotonic() + FROZEN_S
                    while time.monotonic() < watched_until:
                        assert seen == NOT_SERVING
                        await asyncio.sleep(0.1)
                        seen = await status()
                    assert (await v2.ServerLive(pb.ServerLiveRequest(), timeout=5)).live
                    assert not (await v2.ServerReady(pb.ServerReadyRequest(), timeout=5)).ready
                    request = encode_request(model_name="", inputs={"input-0": model.sample})
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await v2.ModelInfer(request, metadata=(("mm-model-id", "hot"),), timeout=5)
                    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
                    assert "its view of the registry is not built yet" in (refused.value.details() or "")

                    os.kill(cluster.etcd.pid or 0, signal.SIGCONT)
                    thawed = True
                    deadline = time.monotonic() + 60
                    while (seen := await status()) != SERVING:
                        assert seen == NOT_SERVING, seen
                        assert proc.poll() is None, log_path.read_text()[-3000:]
                        assert time.monotonic() < deadline, "the router never became SERVING"
                        await asyncio.sleep(0.05)
                    # Right after SERVING: the view holds every copy, and the loaded copy answers.
                    response = await v2.ModelInfer(request, metadata=(("mm-model-id", "hot"),), timeout=30)
                    np.testing.assert_array_equal(decode_response(response)["predict"], model.expected["predict"])
                    fleet = await st_grpc.ModelMeshStatusStub(channel).getFleetStatus(st.FleetStatusRequest(),
                                                                                      timeout=30)
                    assert fleet.copiesLoaded == COPIES + 1
                    assert len(fleet.instances) == INSTANCES + 1
                    status_hot = await mm_grpc.ModelMeshStub(channel).getModelStatus(
                        mm.GetStatusRequest(modelId="hot"), timeout=10)
                    assert status_hot.status == mm.ModelStatusInfo.LOADED
                log = log_path.read_text()
                # It went to the copy, not to a stand-in instance (their ports are closed).
                assert "instance unreachable" not in log
                assert "registry unreachable at start; the router stays NOT_SERVING and retries" in log
                assert runtime.proc.poll() is None
            finally:
                if not thawed:
                    os.kill(cluster.etcd.pid or 0, signal.SIGCONT)
                terminate(proc, 10.0)
        finally:
            await store.close()
