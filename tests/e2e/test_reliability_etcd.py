"""etcd goes away and comes back, under a real router and real runtimes (processes started the way
`mesh up` starts them, loadtest.cluster), with inference running all along.

Promises (issue 7, item 3):

* etcd stopped for ``OUTAGE_S`` (30 s, longer than the runtimes' lease TTL of 10 s) then restarted
  on the same port with the same data: inference on loaded models keeps answering OK throughout
  (a continuous light load sees zero failures); management calls fail with UNAVAILABLE and a message
  naming the registry, within ``MANAGEMENT_BOUND_S`` (the call's deadline: a hang would be
  DEADLINE_EXCEEDED); after the restart the runtimes' instance records and placements are back,
  every registration made before the outage is still there, and a new registration loads and is
  routable, a new vModel too (the router resolves vModels from its watched view only: the watches
  resumed).
* A router whose watch revision was compacted while it was away relists: changes made meanwhile
  (a vModel deleted, another created) reach it. The router is frozen (SIGSTOP) across an etcd
  restart so that its watches cannot resume before the compaction: deterministic, no race.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import grpc
import numpy as np
import pytest

from loadtest.cluster import Cluster, Server
from mesh.errors import RegistryUnavailable
from mesh.gen.inference import grpc_service_pb2_grpc as pb_grpc
from mesh.gen.mmesh import model_mesh_pb2 as mm
from mesh.gen.mmesh import model_mesh_pb2_grpc as mm_grpc
from mesh.registry import open_store
from mesh.registry.etcd import EtcdStore
from mesh.tensors import decode_response, encode_request
from tests.support.models import ModelArtifact, make_model

pytestmark = pytest.mark.e2e

T = TypeVar("T")
OUTAGE_S = 30.0  # the figure: three lease TTLs, so every lease is lost meanwhile
MANAGEMENT_BOUND_S = 10.0  # deadline of each management call made during the outage
INFER_PERIOD_S = 0.1  # the light load: one request per model per period
RECOVERY_S = 60.0  # bound on each "eventually" after the restart
ST = mm.ModelStatusInfo


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[ModelArtifact]:
    directory = tmp_path_factory.mktemp("models")
    return [make_model("sklearn", directory, seed) for seed in (1, 2, 3)]


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    with Cluster(log_level="info") as c:
        yield c


class Client:
    def __init__(self, endpoint: str) -> None:
        self.channel = grpc.aio.insecure_channel(endpoint)
        self.mesh = mm_grpc.ModelMeshStub(self.channel)
        self.v2 = pb_grpc.GRPCInferenceServiceStub(self.channel)

    async def register(self, model_id: str, model: ModelArtifact, timeout: float = 30) -> None:
        await self.mesh.registerModel(mm.RegisterModelRequest(
            modelId=model_id, modelInfo=mm.ModelInfo(type="sklearn", path=str(model.path)),
            loadNow=True, sync=True), timeout=timeout)

    async def infer(self, model_id: str, model: ModelArtifact, header: str = "mm-model-id") -> None:
        request = encode_request(model_name="", inputs={"input-0": model.sample})
        response = await self.v2.ModelInfer(request, metadata=((header, model_id),), timeout=10)
        np.testing.assert_array_equal(decode_response(response)["predict"], model.expected["predict"])

    async def status(self, model_id: str) -> int:
        return (await self.mesh.getModelStatus(mm.GetStatusRequest(modelId=model_id), timeout=10)).status


async def eventually(op: Callable[[], Awaitable[T]], within_s: float = RECOVERY_S) -> T:
    """``op``'s result once it stops failing (the registry coming back: there is nothing to wait on)."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return await op()
        except (grpc.aio.AioRpcError, AssertionError, RegistryUnavailable):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


class Load:
    """Continuous light inference on loaded models; every answer that is not OK is kept."""

    def __init__(self, client: Client, targets: list[tuple[str, ModelArtifact, str]]) -> None:
        self.client, self.targets = client, targets
        self.ok = 0
        self.failures: list[str] = []
        self._task = asyncio.create_task(self._run(), name="light-load")

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            for model_id, model, header in self.targets:
                try:
                    await self.client.infer(model_id, model, header)
                    self.ok += 1
                except (grpc.aio.AioRpcError, AssertionError) as exc:
                    self.failures.append(f"{model_id}: {exc}")
            await asyncio.sleep(max(0.0, INFER_PERIOD_S - (time.monotonic() - started)))

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def snapshot(store: EtcdStore, prefix: str) -> dict[str, bytes]:
    items, _ = await store.get_prefix(prefix)
    return {kv.key: kv.value for kv in items}


async def expect_unavailable(call: Awaitable[object]) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
    assert "the registry is unavailable" in (err.value.details() or ""), err.value.details()
    assert "etcd://" not in (err.value.details() or "")  # endpoints are for the log, not for clients


def runtime_ids(runtimes: list[Server]) -> set[str]:
    return {f"{r.name}-{os.getpid()}" for r in runtimes}  # Cluster.start_runtime's instance IDs


@pytest.mark.slow
async def test_an_etcd_outage_keeps_serving_fails_management_fast_and_loses_nothing(
        cluster: Cluster, models: list[ModelArtifact]) -> None:
    runtimes = [cluster.start_runtime(f"runtime-{i}") for i in range(2)]
    client = Client(cluster.start_router().endpoint)
    store, prefix = open_store(cluster.registry_url, timeout_s=2.0)
    assert isinstance(store, EtcdStore)
    load: Load | None = None
    try:
        m1, m2, m3 = models
        await eventually(lambda: client.register("before-1", m1))
        await client.register("before-2", m2)
        await client.mesh.setVModel(mm.SetVModelRequest(vModelId="alias-1", targetModelId="before-1"),
                                    timeout=10)
        await eventually(lambda: client.infer("alias-1", m1, "mm-vmodel-id"))
        registered = await snapshot(store, prefix + "models/")
        aliases = await snapshot(store, prefix + "vmodels/")
        assert {"before-1", "before-2"} <= {k.rsplit("/", 1)[1] for k in registered}

        load = Load(client, [("before-1", m1, "mm-model-id"), ("before-2", m2, "mm-model-id"),
                             ("alias-1", m1, "mm-vmodel-id")])
        await asyncio.sleep(1.0)
        cluster.etcd.stop()
        stopped_at = time.monotonic()

        # Management needs the registry: each call fails fast, naming it.
        await expect_unavailable(client.mesh.registerModel(mm.RegisterModelRequest(
            modelId="during", modelInfo=mm.ModelInfo(type="sklearn", path=str(m3.path))),
            timeout=MANAGEMENT_BOUND_S))
        await expect_unavailable(client.mesh.getModelStatus(mm.GetStatusRequest(modelId="unknown"),
                                                            timeout=MANAGEMENT_BOUND_S))
        await expect_unavailable(client.mesh.setVModel(mm.SetVModelRequest(
            vModelId="alias-1", targetModelId="before-2"), timeout=MANAGEMENT_BOUND_S))

        await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - stopped_at)))
        served_during_outage = load.ok
        assert served_during_outage > 0
        cluster.etcd.restart()

        # The runtimes re-publish under new leases: instance records and placements are back.
        async def republished() -> None:
            instances = await snapshot(store, prefix + "instances/")
            assert {k.rsplit("/", 1)[1] for k in instances} == runtime_ids(runtimes)
            placed = await snapshot(store, prefix + "placements/")
            assert {k.split("/")[-2] for k in placed} >= {"before-1", "before-2"}
        await eventually(republished)
        assert await snapshot(store, prefix + "models/") == registered  # nothing lost
        assert await snapshot(store, prefix + "vmodels/") == aliases

        # New registrations work and are routable; a new vModel reaches the router's view.
        await eventually(lambda: client.register("after-1", m3))
        await client.infer("after-1", m3)
        await client.mesh.setVModel(mm.SetVModelRequest(vModelId="alias-2", targetModelId="after-1"),
                                    timeout=10)
        await eventually(lambda: client.infer("alias-2", m3, "mm-vmodel-id"))
        assert await eventually(lambda: client.status("after-1")) == ST.LOADED
        await asyncio.sleep(2.0)  # the light load runs on across the recovery
        await load.stop()
        assert load.failures == [], load.failures[:5]
        assert load.ok > served_during_outage
    finally:
        if load is not None:
            await load.stop()
        await client.channel.close()
        await store.close()


async def test_a_router_relists_after_its_watch_revision_was_compacted(
        cluster: Cluster, models: list[ModelArtifact]) -> None:
    cluster.start_runtime("runtime-0")
    router = cluster.start_router()
    client = Client(router.endpoint)
    store, prefix = open_store(cluster.registry_url, timeout_s=2.0)
    m1 = models[0]
    try:
        await eventually(lambda: client.register("m1", m1))
        await client.mesh.setVModel(mm.SetVModelRequest(vModelId="old-alias", targetModelId="m1"), timeout=10)
        await eventually(lambda: client.infer("old-alias", m1, "mm-vmodel-id"))

        os.kill(router.pid, signal.SIGSTOP)  # frozen: its watches cannot resume by themselves
        try:
            cluster.etcd.stop()  # cuts the router's watch streams
            cluster.etcd.restart()
            record = await eventually(lambda: store.get(f"{prefix}vmodels/old-alias"))
            assert record is not None
            await store.put(f"{prefix}vmodels/new-alias", record.value.replace(b"old-alias", b"new-alias"))
            await store.delete(f"{prefix}vmodels/old-alias")
            _, revision = await store.get_prefix(prefix, limit=1)
            await store.compact(revision)  # the router's watch revision is history now
        finally:
            os.kill(router.pid, signal.SIGCONT)

        await eventually(lambda: client.infer("new-alias", m1, "mm-vmodel-id"))

        async def old_alias_gone() -> None:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.infer("old-alias", m1, "mm-vmodel-id")
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
        await eventually(old_alias_gone)
        await client.infer("m1", m1)
        assert "mirror reset after compaction" in await asyncio.to_thread(router.log_path.read_text)
    finally:
        await client.channel.close()
        await store.close()
