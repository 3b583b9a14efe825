"""etcd at its space quota, under a real router and a real runtime (issue 22, part 6).

etcd refuses writes once its database reaches ``--quota-backend-bytes`` and raises its NOSPACE alarm;
the alarm stays until an operator disarms it. Promises, with a 16 MiB quota:

* Registrations through the router fail with RESOURCE_EXHAUSTED and a message that names the cause
  and the remedy (``etcd database space exceeded ... --quota-backend-bytes``); the CLI prints it as
  its one line with exit status 1; other writes (setVModel) get the same answer.
* Meanwhile inference goes on: a model loaded before keeps answering, a model registered before
  and never loaded loads on its first request and answers (its placement cannot be published: the
  runtime keeps it queued), the runtime's lease is kept alive past its TTL, router and runtime stay
  SERVING, neither crashes nor spins (their CPU over an idle stretch is far from a core).
* The operator's recovery from docs/operations.md ("etcd at its quota": ``etcdctl compact``,
  ``etcdctl defrag``, ``etcdctl alarm disarm``) makes registration work again, and the runtime's
  queued placement reaches the router's view.

The database is brought near its quota by history, as placement churn leaves it: one scratch key
rewritten with 256 KiB values (kept until compaction, like every placement rewrite), then filled
with registrations through the router until etcd refuses. Compaction frees the history; the
registrations themselves are live data that only unregistering (or a larger quota) makes room for.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loadtest.cluster import Cluster, Server
from mesh.errors import RegistryFull
from mesh.gen.inference import grpc_service_pb2_grpc as pb_grpc
from mesh.gen.mmesh import model_mesh_pb2 as mm
from mesh.gen.mmesh import model_mesh_pb2_grpc as mm_grpc
from mesh.registry.etcd import EtcdStore
from mesh.registry.etcd_server import find_etcd_binary
from mesh.registry.keys import Keys
from mesh.tensors import decode_response, encode_request
from tests.support.models import ModelArtifact, make_model

pytestmark = pytest.mark.e2e

QUOTA = 16 * 2**20
HEADROOM = 3 * 2**19  # room left for registrations after the history (a few thousand of them)
CHURN_VALUE = b"h" * (256 * 2**10)
LEASE_TTL_S = 3  # short, so that outliving it several times is quick
ETCDCTL = str(find_etcd_binary().parent / "etcdctl")
ST = mm.ModelStatusInfo


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[ModelArtifact]:
    directory = tmp_path_factory.mktemp("models")
    return [make_model("sklearn", directory, seed) for seed in (1, 2)]


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    with Cluster(log_level="info", etcd_quota_bytes=QUOTA) as c:
        yield c


def etcdctl(endpoint: str, *args: str) -> str:
    out = subprocess.run([ETCDCTL, "--endpoints", endpoint, *args], capture_output=True, text=True, timeout=60,
                         check=True)
    return out.stdout.strip()


async def infer(v2: pb_grpc.GRPCInferenceServiceStub, model_id: str, model: ModelArtifact) -> None:
    request = encode_request(model_name="", inputs={"input-0": model.sample})
    response = await v2.ModelInfer(request, metadata=(("mm-model-id", model_id),), timeout=30)
    np.testing.assert_array_equal(decode_response(response)["predict"], model.expected["predict"])


async def serving(endpoint: str) -> bool:
    async with grpc.aio.insecure_channel(endpoint) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def cpu_seconds(*servers: Server) -> float:
    return sum(s.cpu_seconds() for s in servers)


async def fill_until_refused(mesh: mm_grpc.ModelMeshStub, path: Path) -> tuple[int, grpc.aio.AioRpcError]:
    """Register models, 32 in flight, until one is refused; (registered, the refusal)."""
    registered = 0
    refusal: grpc.aio.AioRpcError | None = None

    async def one(i: int) -> None:
        nonlocal registered, refusal
        try:
            await mesh.registerModel(mm.RegisterModelRequest(
                modelId=f"fill/model-{i:06d}", modelInfo=mm.ModelInfo(type="sklearn", path=str(path))), timeout=30)
            registered += 1
        except grpc.aio.AioRpcError as err:
            refusal = refusal or err

    batch = 0
    while refusal is None:  # the quota is checked against batched commits: a few pass it
        assert batch < 600, "etcd took 19,200 registrations without refusing one"
        await asyncio.gather(*(one(batch * 32 + i) for i in range(32)))
        batch += 1
    return registered, refusal


async def test_a_full_etcd_refuses_writes_with_resource_exhausted_and_inference_goes_on(
        cluster: Cluster, models: list[ModelArtifact]) -> None:
    env = {"MESH_REGISTRY_LEASE_TTL_S": str(LEASE_TTL_S)}
    runtime = cluster.start_runtime(extra_env=env)
    router = cluster.start_router(extra_env=env)
    loaded, cold = models
    store = EtcdStore([cluster.etcd.endpoint], timeout_s=10.0)
    keys = Keys("/mesh/")
    try:
        async with grpc.aio.insecure_channel(router.endpoint) as channel:
            mesh = mm_grpc.ModelMeshStub(channel)
            v2 = pb_grpc.GRPCInferenceServiceStub(channel)
            await mesh.registerModel(mm.RegisterModelRequest(
                modelId="loaded", modelInfo=mm.ModelInfo(type="sklearn", path=str(loaded.path)),
                loadNow=True, sync=True), timeout=60)
            await mesh.registerModel(mm.RegisterModelRequest(
                modelId="cold", modelInfo=mm.ModelInfo(type="sklearn", path=str(cold.path))), timeout=60)
            await infer(v2, "loaded", loaded)

            # History, as placement churn leaves it, up to HEADROOM below the quota (counted, not
            # read: etcd's reported size follows its batched commits, in jumps).
            with contextlib.suppress(RegistryFull):  # bolt's page overhead varies: full early is fine
                for _ in range((QUOTA - HEADROOM) // len(CHURN_VALUE)):
                    await store.put("/scratch/churn", CHURN_VALUE)
            _, refusal = await fill_until_refused(mesh, loaded.path)
            assert refusal.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refusal
            details = refusal.details() or ""
            assert re.match(r"etcd database space exceeded \(database at its quota: 1[67]\.\d MiB\)", details), details
            assert "compact and defragment" in details and "--quota-backend-bytes" in details, details
            assert "NOSPACE" in etcdctl(cluster.etcd.endpoint, "alarm", "list")

            # The CLI: one line, exit status 1 (an error from the mesh), the same message.
            argv = [sys.executable, "-m", "mesh", "model", "register", "by-cli", "--type", "sklearn",
                    "--path", str(loaded.path), "--router", router.endpoint]
            cli = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, timeout=60,
                                          env={**os.environ, "MESH_TOKEN": ""})
            assert cli.returncode == 1, (cli.stdout, cli.stderr)
            lines = cli.stderr.strip().splitlines()
            assert lines == [f"mesh: error: RESOURCE_EXHAUSTED: {details}"], cli.stderr
            # Other writes: the same answer.
            with pytest.raises(grpc.aio.AioRpcError) as vmodel:
                await mesh.setVModel(mm.SetVModelRequest(vModelId="v", targetModelId="loaded"), timeout=30)
            assert vmodel.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

            # Inference goes on: the loaded model, and a registered one loaded now (cold start).
            await infer(v2, "loaded", loaded)
            await infer(v2, "cold", cold)
            # Past several lease TTLs, idle but for a request a second: leases kept alive, both
            # components SERVING, nothing crashed, nothing spins.
            cpu_before, started = cpu_seconds(runtime, router), time.monotonic()
            for _ in range(3 * LEASE_TTL_S):
                await infer(v2, "loaded", loaded)
                await infer(v2, "cold", cold)
                await asyncio.sleep(1.0)
            busy = (cpu_seconds(runtime, router) - cpu_before) / (time.monotonic() - started)
            assert busy < 0.5, f"router and runtime used {busy:.2f} cores while the registry was full"
            assert await serving(router.endpoint) and await serving(runtime.endpoint)
            assert runtime.proc.poll() is None and router.proc.poll() is None
            instances, _ = await store.get_prefix(keys.instances)
            assert len(instances) == 1, "the runtime's instance record went: its lease was not kept alive"
            assert not runtime.events("registry lease lost; re-publishing under a new lease")
            # The cold model's placement could not be published: the router does not see it yet.
            placements, _ = await store.get_prefix(keys.placements_of("cold"))
            assert not placements
            assert runtime.events("publishing to the registry failed; will retry") or \
                runtime.events("could not announce a load before it starts")

            # The operator's recovery (docs/operations.md, "etcd at its quota").
            status = json.loads(etcdctl(cluster.etcd.endpoint, "endpoint", "status", "-w", "json"))
            revision = status[0]["Status"]["header"]["revision"]
            etcdctl(cluster.etcd.endpoint, "compact", str(revision))
            etcdctl(cluster.etcd.endpoint, "defrag")
            etcdctl(cluster.etcd.endpoint, "alarm", "disarm")
            assert await store.db_size() < QUOTA - HEADROOM
            await mesh.registerModel(mm.RegisterModelRequest(
                modelId="after-recovery", modelInfo=mm.ModelInfo(type="sklearn", path=str(loaded.path))),
                timeout=30)
            # The runtime's queued placement is published now (its session retries with backoff).
            deadline = time.monotonic() + 30
            while (await mesh.getModelStatus(mm.GetStatusRequest(modelId="cold"), timeout=10)).status \
                    != ST.LOADED:
                assert time.monotonic() < deadline, "the cold model's placement never reached the router"
                await asyncio.sleep(0.2)
            await infer(v2, "cold", cold)
    finally:
        await store.close()
