"""Readiness on the standard gRPC health service follows reality; liveness stays up.

A router and a runtime against a real etcd: SERVING; etcd stopped: NOT_SERVING within a bounded time
(the registry connection is lost), while ``liveness`` stays SERVING; etcd restarted on the same data
and ports: SERVING again. And a router without any runtime is alive but not ready.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh.gen.inference import grpc_service_pb2 as pb
from mesh.registry.etcd_server import EtcdProcess
from tests.support.inprocess import InProcessMesh, memory_url

pytestmark = pytest.mark.integration

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
DOWN_WITHIN_S = 5.0  # a broken watch is noticed at once; readiness is re-checked every 0.5 s
UP_WITHIN_S = 20.0  # etcd's restart, the watches' reconnect backoff (2 s at most), a lease re-grant


class Health:
    def __init__(self, endpoint: str) -> None:
        self.channel = grpc.aio.insecure_channel(endpoint)
        self.stub = health_pb2_grpc.HealthStub(self.channel)

    async def status(self, service: str = "") -> int:
        reply = await self.stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
        return int(reply.status)

    async def becomes(self, wanted: int, within_s: float, service: str = "") -> float:
        """Seconds until ``service`` reports ``wanted``; fails after ``within_s``."""
        started = time.monotonic()
        while (status := await self.status(service)) != wanted:
            if time.monotonic() - started > within_s:
                pytest.fail(f"health of {service!r} still {status} after {within_s} s, wanted {wanted}")
            await asyncio.sleep(0.1)
        return time.monotonic() - started


@pytest.fixture
async def mesh(etcd: EtcdProcess) -> AsyncIterator[InProcessMesh]:
    m = await InProcessMesh(etcd.url).start(runtimes=1)
    try:
        yield m
    finally:
        await m.stop()


async def test_readiness_follows_the_registry_connection(etcd: EtcdProcess, mesh: InProcessMesh) -> None:
    assert mesh.router is not None
    router, runtime = Health(mesh.router.endpoint), Health(mesh.runtimes[0].endpoint)
    try:
        for health, services in ((router, ("inference.GRPCInferenceService", "mmesh.ModelMesh")),
                                 (runtime, ("inference.GRPCInferenceService", "mmesh.ModelRuntime"))):
            for service in ("", *services):
                await health.becomes(SERVING, UP_WITHIN_S, service)

        etcd.stop()
        for health in (router, runtime):
            await health.becomes(NOT_SERVING, DOWN_WITHIN_S)
            assert await health.status("inference.GRPCInferenceService") == NOT_SERVING
            assert await health.status("liveness") == SERVING  # alive: do not restart it
        assert not (await mesh.v2.ServerReady(pb.ServerReadyRequest(), timeout=2)).ready

        etcd.restart()
        for health in (router, runtime):
            await health.becomes(SERVING, UP_WITHIN_S)
            assert await health.status("inference.GRPCInferenceService") == SERVING
        assert (await mesh.v2.ServerReady(pb.ServerReadyRequest(), timeout=2)).ready
    finally:
        await router.channel.close()
        await runtime.channel.close()


async def test_router_without_runtimes_is_alive_but_not_ready() -> None:
    m = await InProcessMesh(memory_url()).start(runtimes=0)
    assert m.router is not None
    router = Health(m.router.endpoint)
    try:
        assert await router.status("liveness") == SERVING
        await asyncio.sleep(0.6)  # a readiness round
        assert await router.status() == NOT_SERVING
        runtime = await m.add_runtime()
        await router.becomes(SERVING, 10)
        await runtime.stop()  # it leaves the registry: no runtime in the view any more
        await router.becomes(NOT_SERVING, 10)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await router.status("no.such.Service")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await router.channel.close()
        await m.stop()
