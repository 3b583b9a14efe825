"""MLServer (from PyPI, in its own virtualenv: loadtest/peers/setup.py) as the model server behind
a runtime (``runtime.server = mlserver``), end to end: a V2 client through the router gets what
the model itself predicts, the runtime wrote MLServer's model-settings into the repository and
removes them at unload, MLServer unloads the model when it is unregistered, and a load MLServer
refuses is LOADING_FAILED with MLServer's reason and leaves no placement.

Slow: the first run builds the venv (about 35 s here); MLServer takes a few seconds to start.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import numpy as np
import pytest

from mesh.gen.inference import grpc_service_pb2 as pb
from mesh.gen.inference import grpc_service_pb2_grpc as pb_grpc
from mesh.gen.mmesh import model_mesh_pb2 as mm
from mesh.registry import open_store
from mesh.registry.registry import Registry
from mesh.tensors import decode_response, encode_request
from tests.support.inprocess import InProcessMesh, memory_url
from tests.support.models import make_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
ST = mm.ModelStatusInfo.ModelStatus


async def test_mlserver_behind_the_mesh(tmp_path: Path) -> None:
    from loadtest.peers import mlserver_app

    models = [make_model("sklearn", tmp_path / "models", seed) for seed in (0, 2, 6)]  # .joblib files
    peer, repo = await asyncio.to_thread(mlserver_app.start_empty, tmp_path / "mlserver")
    mesh = InProcessMesh(memory_url(), runtime_overrides={
        "server": "mlserver", "server_address": peer.grpc_target, "server_repository": str(repo),
        "model_roots": (str(tmp_path),)})
    try:
        await mesh.start(runtimes=1)
        for i, model in enumerate(models):
            await mesh.register(f"m{i}", "sklearn", str(model.file))
        for _ in range(3):
            for i, model in enumerate(models):
                response = await mesh.infer(f"m{i}", encode_request(model_name="", inputs={"x": model.sample}))
                # MLServer's scikit-learn runtime answers a column: [rows, 1].
                np.testing.assert_array_equal(decode_response(response)["predict"].ravel(),
                                              model.expected["predict"])
        written = {json.loads(p.read_text())["name"] for p in repo.glob("mm-*/model-settings.json")}
        assert written == {"m0", "m1", "m2"}

        # Unregistered: MLServer unloads it and its entry is gone from the repository.
        await mesh.mesh.unregisterModel(mm.UnregisterModelRequest(modelId="m0"), timeout=10)
        async with grpc.aio.insecure_channel(peer.grpc_target) as channel:
            direct = pb_grpc.GRPCInferenceServiceStub(channel)

            async def unloaded() -> bool:
                try:
                    return not (await direct.ModelReady(pb.ModelReadyRequest(name="m0"), timeout=5)).ready
                except grpc.aio.AioRpcError as exc:  # MLServer 1.7 answers UNKNOWN "... not found"
                    return "not found" in (exc.details() or "")
            await mesh.wait_for(unloaded, timeout=20)
            assert (await direct.ModelReady(pb.ModelReadyRequest(name="m1"), timeout=5)).ready
        assert {json.loads(p.read_text())["name"] for p in repo.glob("mm-*/model-settings.json")} == {"m1", "m2"}

        # A file MLServer cannot load: LOADING_FAILED with its reason, no placement left.
        bad = tmp_path / "bad" / "model.joblib"
        bad.parent.mkdir()
        bad.write_bytes(b"this is not a pickle")
        await mesh.register("bad", "sklearn", str(bad))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await mesh.infer("bad", encode_request(model_name="", inputs={"x": models[0].sample}), timeout=60)
        assert "mlserver model server refused to load 'bad'" in (err.value.details() or "")

        async def failed() -> bool:
            status = await mesh.mesh.getModelStatus(mm.GetStatusRequest(modelId="bad"), timeout=10)
            return status.status == ST.LOADING_FAILED
        await mesh.wait_for(failed, timeout=20)
        store, prefix = open_store(mesh.registry_url)
        assert await Registry(store, prefix).placements_of("bad") == []
        assert not any(json.loads(p.read_text())["name"] == "bad" for p in repo.glob("mm-*/model-settings.json"))
    finally:
        await mesh.stop()
        survivors = await asyncio.to_thread(peer.stop)
        assert survivors == []
