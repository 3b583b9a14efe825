"""Models in object storage served end to end: a real router and runtime (in the test's event loop),
a real S3 server (moto, with IAM checks on: tests.support.object_stores), storage keys in a folder
laid out as modelmesh-serving mounts its storage-config Secret. Registered by storage key through
the management API exactly as modelmesh-serving's controller registers them; inferred; unloaded and
loaded again with the S3 server gone (the disk cache: no second download); wrong credentials, a
missing object and an unknown key fail the load with a status that says which, never a secret."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from mesh.gen.mmesh import model_mesh_pb2 as mm
from mesh.gen.mmesh import model_runtime_pb2 as rt
from mesh.gen.mmesh import model_runtime_pb2_grpc as rt_grpc
from mesh.tensors import decode_response, encode_request
from tests.support.inprocess import InProcessMesh, memory_url
from tests.support.models import assert_outputs_match, make_model
from tests.support.object_stores import moto_s3

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def _key(storage_key: str, **params: str) -> str:
    """ModelInfo.key as modelmesh-serving's controller writes it."""
    key: dict[str, object] = {"storage_key": storage_key, "model_type": {"name": "sklearn"}}
    if params:
        key["storage_params"] = params
    return json.dumps(key)


async def _failure(mesh: InProcessMesh, model_id: str, sample: object) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await mesh.infer(model_id, encode_request(model_name=model_id, inputs={"input": sample}))
    return f"{caught.value.code().name}: {caught.value.details()}"


@pytest.mark.parametrize("workers", [0, 1])
async def test_a_model_in_s3_is_pulled_once_served_and_reloaded_from_disk(
        tmp_path: Path, workers: int, capfd: pytest.CaptureFixture[str]) -> None:
    model = make_model("sklearn", tmp_path / "trained", seed=3)
    keys = tmp_path / "storage-config"
    keys.mkdir()
    roots = tmp_path / "models"
    roots.mkdir()
    with moto_s3() as s3:
        s3.put("models", "sklearn/iris.joblib", model.file.read_bytes())
        (keys / "localMinIO").write_text(json.dumps(s3.storage_key("models")))
        (keys / "wrong").write_text(json.dumps({**s3.storage_key("models"), "secret_access_key": "s3cr3t-wrong"}))
        mesh = InProcessMesh(memory_url(), runtime_overrides={"workers": workers, "model_roots": (str(roots),)},
                             extra={"storage": {"config_dir": str(keys), "cache_dir": str(tmp_path / "cache")}})
        await mesh.start(runtimes=1)
        try:
            await mesh.register("iris", "sklearn", "sklearn/iris.joblib", key=_key("localMinIO", bucket="models"))
            request = encode_request(model_name="iris", inputs={"input": model.sample})
            assert_outputs_match(decode_response(await mesh.infer("iris", request)), model.expected)

            await mesh.register("denied", "sklearn", "sklearn/iris.joblib", key=_key("wrong"))
            await mesh.register("missing", "sklearn", "sklearn/none.joblib", key=_key("localMinIO"))
            await mesh.register("unknown", "sklearn", "sklearn/iris.joblib", key=_key("nosuchkey"))
            denied = await _failure(mesh, "denied", model.sample)
            assert "access denied: 'sklearn/iris.joblib' in s3 bucket 'models'" in denied
            assert "storage key 'wrong'" in denied and "s3cr3t" not in denied
            assert "object not found: 'sklearn/none.joblib'" in await _failure(mesh, "missing", model.sample)
            assert "storage key 'nosuchkey' is not configured" in await _failure(mesh, "unknown", model.sample)
            status = await mesh.mesh.getModelStatus(mm.GetStatusRequest(modelId="denied"), timeout=10)
            assert status.errors and not any("s3cr3t" in e for e in status.errors)
            logged = "".join(capfd.readouterr())
            assert "load failed" in logged and "storage key 'wrong'" in logged  # the failures were logged...
            assert "s3cr3t" not in logged and s3.secret_access_key not in logged  # ...and no secret
        except BaseException:
            await mesh.stop()
            raise
        pulled = list((tmp_path / "cache").glob("*/*/iris.joblib"))
        assert len(pulled) == 1 and pulled[0].read_bytes() == model.file.read_bytes()
    # The S3 server is gone: a reload after unloading reads the disk cache.
    try:
        runtime = mesh.runtimes[0]
        async with grpc.aio.insecure_channel(runtime.endpoint) as channel:
            await rt_grpc.ModelRuntimeStub(channel).unloadModel(rt.UnloadModelRequest(modelId="iris"), timeout=10)
        assert_outputs_match(decode_response(await mesh.infer("iris", request)), model.expected)
    finally:
        await mesh.stop()
