"""The router and runtimes as real gRPC servers on 127.0.0.1, in one process, sharing a memory://
registry: the data plane, the management API and its errors, end to end through gRPC."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from mesh.gen.inference import grpc_service_pb2 as pb
from mesh.gen.mmesh import model_mesh_pb2 as mm
from mesh.registry import open_store
from mesh.registry.registry import Registry
from mesh.tensors import decode_response, encode_request
from tests.support.inprocess import InProcessMesh, memory_url
from tests.support.models import ModelArtifact, make_model

pytestmark = pytest.mark.integration

ST = mm.ModelStatusInfo


@pytest.fixture
async def mesh() -> AsyncIterator[InProcessMesh]:
    m = await InProcessMesh(memory_url()).start(runtimes=1)
    try:
        yield m
    finally:
        await m.stop()


@pytest.fixture(scope="module")
def sklearn_model(tmp_path_factory: pytest.TempPathFactory) -> ModelArtifact:
    return make_model("sklearn", tmp_path_factory.mktemp("models"), seed=1)


def request_for(model: ModelArtifact, name: str = "") -> pb.ModelInferRequest:
    return encode_request(model_name=name, inputs={"input-0": model.sample})


async def test_register_then_infer_matches_the_models_own_predict(mesh: InProcessMesh,
                                                                  sklearn_model: ModelArtifact) -> None:
    status = await mesh.register("iris-a", "sklearn", str(sklearn_model.path))
    assert status.status == ST.NOT_LOADED
    response = await mesh.infer("iris-a", request_for(sklearn_model))
    outputs = decode_response(response)
    np.testing.assert_array_equal(outputs["predict"], sklearn_model.expected["predict"])
    # model_name (field 1) routes as well as the header does
    response = await mesh.infer("", request_for(sklearn_model, name="iris-a"), header="")
    np.testing.assert_array_equal(decode_response(response)["predict"], sklearn_model.expected["predict"])
    status = await mesh.mesh.getModelStatus(mm.GetStatusRequest(modelId="iris-a"))
    assert status.status == ST.LOADED
    assert len(status.modelCopyInfos) == 1 and status.modelCopyInfos[0].sizeBytes > 0


async def test_unknown_model_is_not_found_and_named(mesh: InProcessMesh, sklearn_model: ModelArtifact) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.infer("no-such-model", request_for(sklearn_model))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-model" in (err.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.infer("no-such-alias", request_for(sklearn_model), header="mm-vmodel-id")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "vModel 'no-such-alias'" in (err.value.details() or "")
    status = await mesh.mesh.getModelStatus(mm.GetStatusRequest(modelId="no-such-model"))
    assert status.status == ST.NOT_FOUND


async def test_malformed_requests_are_invalid_argument_and_the_router_survives(
        mesh: InProcessMesh, sklearn_model: ModelArtifact) -> None:
    await mesh.register("m", "sklearn", str(sklearn_model.path))
    bad = request_for(sklearn_model)
    bad.raw_input_contents[0] = bad.raw_input_contents[0][:-4]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.infer("m", bad)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input-0" in (err.value.details() or "")
    wrong_features = encode_request(model_name="", inputs={"x": np.zeros((1, 2), np.float32)})
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.infer("m", wrong_features)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # bytes that are not a protobuf message at all, sent to the router's byte-forwarding path
    assert mesh.channel is not None
    raw_call = mesh.channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    for garbage in (b"\xff\xff\xff", b"\x0a\x05ab", b"\x0a\x02\xc3\x28"):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await raw_call(garbage, timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await raw_call(b"", timeout=5)  # no model named anywhere
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # still serving
    response = await mesh.infer("m", request_for(sklearn_model))
    assert decode_response(response)["predict"].shape[0] == sklearn_model.sample.shape[0]


async def test_a_model_that_fails_to_load_reports_the_loaders_reason(mesh: InProcessMesh,
                                                                     tmp_path: Path,
                                                                     sklearn_model: ModelArtifact) -> None:
    corrupt = tmp_path / "corrupt.joblib"
    corrupt.write_bytes(b"this is not a pickle")
    await mesh.register("broken", "sklearn", str(corrupt))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.infer("broken", request_for(sklearn_model))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "corrupt.joblib" in (err.value.details() or "")

    async def failed() -> bool:
        s = await mesh.mesh.getModelStatus(mm.GetStatusRequest(modelId="broken"))
        return s.status == ST.LOADING_FAILED

    await mesh.wait_for(failed)
    status = await mesh.mesh.getModelStatus(mm.GetStatusRequest(modelId="broken"))
    assert status.errors and "corrupt.joblib" in status.errors[0]
    # the next request fails fast on the failure record instead of loading again
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.infer("broken", request_for(sklearn_model))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # and the runtime is fine
    await mesh.register("good", "sklearn", str(sklearn_model.path))
    await mesh.infer("good", request_for(sklearn_model))


async def test_registration_rules(mesh: InProcessMesh, sklearn_model: ModelArtifact) -> None:
    await mesh.register("dup", "sklearn", str(sklearn_model.path))
    again = await mesh.register("dup", "sklearn", str(sklearn_model.path))  # same definition: fine
    assert again.status == ST.NOT_LOADED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.register("dup", "sklearn", "/elsewhere/model.joblib")
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    for bad_id in ("", "x" * 2000):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await mesh.register(bad_id, "sklearn", str(sklearn_model.path))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.register("no-type", "", str(sklearn_model.path))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_ensure_loaded_sync_then_unregister_unloads(mesh: InProcessMesh,
                                                          sklearn_model: ModelArtifact) -> None:
    await mesh.register("e", "sklearn", str(sklearn_model.path))
    status = await mesh.mesh.ensureLoaded(mm.EnsureLoadedRequest(modelId="e", sync=True), timeout=30)
    assert status.status == ST.LOADED
    await mesh.mesh.unregisterModel(mm.UnregisterModelRequest(modelId="e"))

    async def gone() -> bool:
        s = await mesh.mesh.getModelStatus(mm.GetStatusRequest(modelId="e"))
        return s.status == ST.NOT_FOUND and not s.modelCopyInfos

    await mesh.wait_for(gone)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.mesh.ensureLoaded(mm.EnsureLoadedRequest(modelId="e"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_list_models_pages_through_everything(mesh: InProcessMesh, sklearn_model: ModelArtifact) -> None:
    ids = [f"tenant/{i:03d}" for i in range(25)]
    await asyncio.gather(*(mesh.register(i, "sklearn", str(sklearn_model.path)) for i in ids))
    seen, token = [], ""
    while True:
        page = await mesh.mesh.listModels(mm.ListModelsRequest(prefix="tenant/", pageSize=10,
                                                               pageToken=token))
        seen += [m.modelId for m in page.models]
        token = page.nextPageToken
        if not token:
            break
    assert seen == ids


async def test_vmodel_switches_only_once_the_new_target_is_loaded(mesh: InProcessMesh,
                                                                   tmp_path: Path) -> None:
    v1 = make_model("sklearn", tmp_path, seed=3)
    v2 = make_model("sklearn", tmp_path, seed=4)
    status = await mesh.mesh.setVModel(mm.SetVModelRequest(
        vModelId="churn", targetModelId="churn-v1", owner="team-a", autoDeleteTargetModel=True,
        modelInfo=mm.ModelInfo(type="sklearn", path=str(v1.path)), loadNow=True, sync=True), timeout=30)
    assert status.status == mm.VModelStatusInfo.DEFINED and status.activeModelId == "churn-v1"
    out = decode_response(await mesh.infer("churn", request_for(v1), header="mm-vmodel-id"))
    np.testing.assert_array_equal(out["predict"], v1.expected["predict"])
    # address the vModel by model_name, as modelmesh-serving's clients do with a Predictor's name
    out = decode_response(await mesh.infer("", request_for(v1, name="churn"), header=""))
    np.testing.assert_array_equal(out["predict"], v1.expected["predict"])

    status = await mesh.mesh.setVModel(mm.SetVModelRequest(
        vModelId="churn", targetModelId="churn-v2", owner="team-a", autoDeleteTargetModel=True,
        modelInfo=mm.ModelInfo(type="sklearn", path=str(v2.path)), sync=True), timeout=30)
    assert status.status == mm.VModelStatusInfo.DEFINED, status
    assert status.activeModelId == "churn-v2"
    out = decode_response(await mesh.infer("churn", request_for(v2), header="mm-vmodel-id"))
    np.testing.assert_array_equal(out["predict"], v2.expected["predict"])
    # the old target was created with auto-delete: unreferenced now, so it is gone
    old = await mesh.mesh.getModelStatus(mm.GetStatusRequest(modelId="churn-v1"))
    assert old.status == ST.NOT_FOUND
    # another owner may not take it over, nor delete it
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.mesh.setVModel(mm.SetVModelRequest(vModelId="churn", targetModelId="churn-v2",
                                                      owner="team-b"))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    # a model in use by a vModel cannot be unregistered
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.mesh.unregisterModel(mm.UnregisterModelRequest(modelId="churn-v2"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    await mesh.mesh.deleteVModel(mm.DeleteVModelRequest(vModelId="churn", owner="team-a"))
    gone = await mesh.mesh.getVModelStatus(mm.GetVModelStatusRequest(vModelId="churn"))
    assert gone.status == mm.VModelStatusInfo.NOT_FOUND
    assert (await mesh.mesh.getModelStatus(mm.GetStatusRequest(modelId="churn-v2"))).status == ST.NOT_FOUND


async def test_model_too_large_for_every_instance_is_resource_exhausted(
        mesh: InProcessMesh, sklearn_model: ModelArtifact) -> None:
    await mesh.register("huge", "sklearn", str(sklearn_model.path), sizeHintBytes=1 << 50)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.infer("huge", request_for(sklearn_model))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_server_metadata_and_readiness(mesh: InProcessMesh, sklearn_model: ModelArtifact) -> None:
    assert (await mesh.v2.ServerLive(pb.ServerLiveRequest())).live
    assert (await mesh.v2.ServerReady(pb.ServerReadyRequest())).ready
    assert (await mesh.v2.ServerMetadata(pb.ServerMetadataRequest())).name == "mesh-serving"
    await mesh.register("meta", "sklearn", str(sklearn_model.path))
    assert not (await mesh.v2.ModelReady(pb.ModelReadyRequest(name="meta"))).ready
    meta = await mesh.v2.ModelMetadata(pb.ModelMetadataRequest(name="meta"))
    assert meta.inputs and meta.outputs
    assert (await mesh.v2.ModelReady(pb.ModelReadyRequest(name="meta"))).ready


async def test_inline_inference_answers_the_same(sklearn_model: ModelArtifact) -> None:
    """runtime.inline_predict_ms > 0: quick models are predicted on the event loop after their
    first (threaded, measured) inference; answers must not change."""
    m = await InProcessMesh(memory_url(), runtime_overrides={"inline_predict_ms": 100.0}).start(runtimes=1)
    try:
        await m.register("inline", "sklearn", str(sklearn_model.path))
        for _ in range(5):
            out = decode_response(await m.infer("inline", request_for(sklearn_model)))
            np.testing.assert_array_equal(out["predict"], sklearn_model.expected["predict"])
        bad = request_for(sklearn_model)
        bad.raw_input_contents[0] = b"\x00"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await m.infer("inline", bad)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await m.stop()


async def test_a_hot_model_gets_a_second_copy_on_its_next_instance(sklearn_model: ModelArtifact) -> None:
    """Copy scaling in the real router: past the rate threshold a second copy is loaded on the other
    runtime; a model asked for once stays at one copy."""
    m = InProcessMesh(memory_url(), router_overrides={"scale_rps_threshold": 5.0})
    await m.start(runtimes=2)
    try:
        await m.register("hot", "sklearn", str(sklearn_model.path))
        request = request_for(sklearn_model)

        async def two_copies() -> bool:
            await asyncio.gather(*(m.infer("hot", request) for _ in range(10)))
            status = await m.mesh.getModelStatus(mm.GetStatusRequest(modelId="hot"))
            return sum(c.copyStatus == ST.LOADED for c in status.modelCopyInfos) == 2

        await m.wait_for(two_copies, timeout=20)
        cold_model = "cold"
        await m.register(cold_model, "sklearn", str(sklearn_model.path))
        await m.infer(cold_model, request)
        await asyncio.sleep(1.5)  # a scaling round passes: one request does not make a model hot
        status = await m.mesh.getModelStatus(mm.GetStatusRequest(modelId=cold_model))
        assert sum(c.copyStatus == ST.LOADED for c in status.modelCopyInfos) == 1
    finally:
        await m.stop()


async def test_min_copies_are_loaded_without_traffic_and_never_evicted(sklearn_model: ModelArtifact) -> None:
    """A registration with minCopies=2 gets two loaded copies although nobody sends it a request, on
    the first two instances of its rendezvous order; unregistering it drops the router's duty."""
    m = InProcessMesh(memory_url(), router_overrides={"min_copies_check_s": 0.2})
    await m.start(runtimes=3)
    try:
        await m.register("kept", "sklearn", str(sklearn_model.path), minCopies=2)

        async def copies() -> int:
            status = await m.mesh.getModelStatus(mm.GetStatusRequest(modelId="kept"))
            return sum(c.copyStatus == ST.LOADED for c in status.modelCopyInfos)

        async def two() -> bool:
            return await copies() == 2

        await m.wait_for(two, timeout=20)
        await asyncio.sleep(1.0)  # later rounds see two copies and add none
        assert await copies() == 2
        store, prefix = open_store(m.registry_url)
        registry = Registry(store, prefix)
        assert await registry.pinned_models() == {"kept": 2}
        await m.mesh.unregisterModel(mm.UnregisterModelRequest(modelId="kept"))
        assert await registry.pinned_models() == {}
    finally:
        await m.stop()


async def test_register_answers_from_the_view_with_unchanged_semantics(mesh: InProcessMesh,
                                                                      tmp_path: Path) -> None:
    """registerModel builds its answer from the router's view (no read-back of the registration):
    NOT_LOADED for a new or identical registration, the copies of a loaded one, ALREADY_EXISTS for a
    different definition."""
    model = make_model("sklearn", tmp_path, seed=3)
    first = await mesh.register("pinned", "sklearn", str(model.path))
    assert first.status == ST.NOT_LOADED and not first.modelCopyInfos
    again = await mesh.register("pinned", "sklearn", str(model.path))
    assert again.status == ST.NOT_LOADED
    loaded = await mesh.mesh.ensureLoaded(mm.EnsureLoadedRequest(modelId="pinned", sync=True), timeout=30)
    assert loaded.status == ST.LOADED
    # Registering the same definition of a loaded model reports its copies, as getModelStatus does.
    again = await mesh.register("pinned", "sklearn", str(model.path))
    status = await mesh.mesh.getModelStatus(mm.GetStatusRequest(modelId="pinned"))
    assert again.status == status.status == ST.LOADED
    assert [c.location for c in again.modelCopyInfos] == [c.location for c in status.modelCopyInfos]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.register("pinned", "sklearn", "/elsewhere/model.joblib")
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    # loadNow + sync still answers LOADED once the copy is in the view
    now = await mesh.mesh.registerModel(mm.RegisterModelRequest(
        modelId="pinned-now", modelInfo=mm.ModelInfo(type="sklearn", path=str(model.path)),
        loadNow=True, sync=True), timeout=30)
    assert now.status == ST.LOADED
