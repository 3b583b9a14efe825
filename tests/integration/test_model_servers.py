"""External model servers behind the runtime (mesh.runtime.servers), against real server processes.

The ModelMesh runtime-SPI server (``tests.support.spi_server``) and the Triton stand-in
(``tests.support.triton_standin``: there is no Triton binary for this machine, so a small server
speaking Triton's repository API and V2 inference with onnxruntime stands in for it) run as
processes of their own; MLServer itself runs in ``test_mlserver_behind_the_mesh``. Asserted at the
adapter: loads, sizes, forwarded inference equal to the model's own answers, unloads (also of an
evicted copy superseded by a newer one), refusals, hung loads and a server that dies, each with a
precise error; then end to end through a router, a registry and a runtime with
``runtime.server`` set: a V2 client's answers, LOADING_FAILED with the server's reason and no
placement left, and a server restarted under the mesh.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from mesh.errors import DeadlineExceeded, InvalidArgument, ModelLoadError, NotHere, Unavailable
from mesh.gen.mmesh import model_mesh_pb2 as mm
from mesh.gen.mmesh import model_runtime_pb2 as spb
from mesh.registry.records import ModelSpec
from mesh.runtime.forwarding import CopyLost
from mesh.runtime.servers import ExternalServer
from mesh.runtime.servers.base import field_one
from mesh.tensors import decode_response, encode_request
from mesh.transport.model_server import ServerCallError
from tests.support.inprocess import InProcessMesh, memory_url
from tests.support.model_servers import running, start_server, stop_server
from tests.support.models import ModelArtifact, assert_outputs_match, make_model
from tests.support.server_adapters import adapter

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
ST = mm.ModelStatusInfo.ModelStatus


@pytest.fixture(scope="module")
def sklearn_model(tmp_path_factory: pytest.TempPathFactory) -> ModelArtifact:
    return make_model("sklearn", tmp_path_factory.mktemp("models"), seed=0)


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> ModelArtifact:
    return make_model("onnx", tmp_path_factory.mktemp("models"), seed=1)


def request(artifact: ModelArtifact, name: str = "whatever") -> bytes:
    return encode_request(model_name=name, inputs={"input-0": artifact.sample}).SerializeToString()


async def predict(model: object, artifact: ModelArtifact) -> dict[str, np.ndarray]:
    from mesh.gen.inference import grpc_service_pb2 as pb

    answer = await model.forward(request(artifact))  # type: ignore[attr-defined]
    return decode_response(pb.ModelInferResponse.FromString(answer))


def test_field_one_replaces_the_model_name() -> None:
    from mesh.gen.inference import grpc_service_pb2 as pb

    body = encode_request(model_name="client-said", inputs={"x": np.ones((1, 2), np.float32)}).SerializeToString()
    for name in ("m", "é" * 100, "x" * 300):  # one- and two-byte lengths
        parsed = pb.ModelInferRequest.FromString(body + field_one(name))
        assert parsed.model_name == name and parsed.inputs[0].name == "x"


# --- ModelMesh runtime SPI -------------------------------------------------------------------------
async def test_spi_load_forward_size_and_unload(sklearn_model: ModelArtifact) -> None:
    with running("tests.support.spi_server") as (port, _):
        server = adapter("spi", port, types=("sklearn",))
        spec = ModelSpec(model_id="iris/lr:1", type="sklearn", path=str(sklearn_model.file))
        model = await asyncio.to_thread(server.load, spec, "ram")
        # The size is the server's own report (its modelSize answers the same).
        assert model.footprint_bytes() == size_on_server(server, spec.model_id) > 0
        assert_outputs_match(await predict(model, sklearn_model), sklearn_model.expected)
        await asyncio.to_thread(model.close)
        with pytest.raises(ServerCallError, match="NOT_FOUND"):  # unloaded on the server
            size_on_server(server, spec.model_id)
        with pytest.raises(NotHere):
            await predict(model, sklearn_model)
        await server.aclose()


async def test_spi_an_evicted_copy_never_unloads_a_newer_one(sklearn_model: ModelArtifact) -> None:
    with running("tests.support.spi_server") as (port, _):
        server = adapter("spi", port, types=("sklearn",))
        spec = ModelSpec(model_id="m", type="sklearn", path=str(sklearn_model.file))
        old = await asyncio.to_thread(server.load, spec, "ram")
        new = await asyncio.to_thread(server.load, spec, "ram")
        await asyncio.to_thread(old.close)  # the evicted copy closes after the new one loaded
        assert size_on_server(server, "m") > 0  # still loaded there
        assert_outputs_match(await predict(new, sklearn_model), sklearn_model.expected)
        await asyncio.to_thread(new.close)
        with pytest.raises(ServerCallError, match="NOT_FOUND"):
            size_on_server(server, "m")
        await server.aclose()


def size_on_server(server: ExternalServer, model_id: str) -> int:
    return int(server.channel.call("/mmesh.ModelRuntime/modelSize", spb.ModelSizeRequest(modelId=model_id),
                                   spb.ModelSizeResponse, 5).sizeInBytes)


async def test_spi_refusals_hangs_and_wrong_types_fail_the_load_precisely(sklearn_model: ModelArtifact,
                                                                          tmp_path: Path) -> None:
    spec = ModelSpec(model_id="m", type="sklearn", path=str(sklearn_model.file))
    with running("tests.support.spi_server", "--fail-loads", "out of GPU memory on device 3") as (port, _):
        server = adapter("spi", port, types=("sklearn", "xgboost"))
        with pytest.raises(ModelLoadError, match="out of GPU memory on device 3"):
            await asyncio.to_thread(server.load, spec, "ram")
        with pytest.raises(ModelLoadError, match="does not serve type 'onnx'"):
            await asyncio.to_thread(server.load, ModelSpec(model_id="o", type="onnx", path=str(sklearn_model.file)),
                                    "ram")
        await server.aclose()
    with running("tests.support.spi_server", "--hang-loads") as (port, _):
        server = adapter("spi", port, types=("sklearn",), load_timeout_s=2)
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded, match="did not load 'm' within 2 s"):
            await asyncio.to_thread(server.load, spec, "ram")
        assert time.monotonic() - started < 10
        await server.aclose()
    with running("tests.support.spi_server") as (port, _):  # the server's own refusal of a bad file
        bad = tmp_path / "bad.joblib"
        bad.write_bytes(b"not a pickle")
        server = adapter("spi", port, types=("sklearn",))
        with pytest.raises(ModelLoadError, match="refused to load 'b'"):
            await asyncio.to_thread(server.load, ModelSpec(model_id="b", type="sklearn", path=str(bad)), "ram")
        model = await asyncio.to_thread(server.load, spec, "ram")
        from mesh.gen.inference import grpc_service_pb2 as pb
        wrong = encode_request(model_name="m", inputs={"x": np.ones((2, 99), np.float32)}).SerializeToString()
        with pytest.raises(InvalidArgument):
            pb.ModelInferResponse.FromString(await model.forward(wrong))
        await server.aclose()


async def test_spi_a_dead_server_loses_its_copies_and_loads_retry_a_bounded_time(
        sklearn_model: ModelArtifact) -> None:
    lost: list[str] = []
    spec = ModelSpec(model_id="m", type="sklearn", path=str(sklearn_model.file))
    with running("tests.support.spi_server") as (port, proc):
        server = adapter("spi", port, types=("sklearn",), load_timeout_s=8, lost=lost)
        model = await asyncio.to_thread(server.load, spec, "ram")
        supervisor = asyncio.create_task(server.supervise())
        proc.send_signal(signal.SIGKILL)  # type: ignore[attr-defined]
        proc.wait()  # type: ignore[attr-defined]
        with pytest.raises(NotHere):  # the router retries elsewhere
            await predict(model, sklearn_model)
        for _ in range(150):  # the supervisor notices within DOWN_AFTER polls
            if lost:
                break
            await asyncio.sleep(0.1)
        assert lost == ["m"] and server.down and model.lost
        with pytest.raises(Unavailable, match="does not answer"):  # not the model's failure
            await asyncio.to_thread(server.load, spec, "ram")
        supervisor.cancel()
        server.down = False  # as if the supervisor had not noticed yet: the load retries, then fails
        started = time.monotonic()
        with pytest.raises(ModelLoadError, match="UNAVAILABLE"):
            await asyncio.to_thread(server.load, spec, "ram")
        assert 1.0 < time.monotonic() - started < 8  # three tries with a backoff, within the load timeout
        await server.aclose()


# --- Triton (stand-in) -----------------------------------------------------------------------------
async def test_triton_repository_load_forward_unload(onnx_model: ModelArtifact, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    stale = repo / "old-model"
    stale.mkdir(parents=True)
    (stale / ".mesh-serving").write_text("old")
    (repo / "users-own").mkdir()
    with running("tests.support.triton_standin", "--repository", str(repo)) as (port, _):
        server = adapter("triton", port, repository=str(repo))
        assert not stale.exists() and (repo / "users-own").exists()  # only our own entries are cleared
        for model_id in ("plain-name.v1", "tenant/odd id"):
            spec = ModelSpec(model_id=model_id, type="onnx", path=str(onnx_model.path))
            model = await asyncio.to_thread(server.load, spec, "ram")
            name = server.server_name(model_id)
            assert (name == model_id) == (model_id == "plain-name.v1")
            assert (repo / name / "config.pbtxt").read_text().startswith(f'name: "{name}"')
            assert [t.name for t in model.inputs] == ["input"] and model.platform == "onnxruntime_onnx"
            assert model.footprint_bytes() >= onnx_model.file.stat().st_size  # measured or predicted, floored
            from mesh.gen.inference import grpc_service_pb2 as pb
            answer = await model.forward(encode_request(model_name="x", inputs={"input": onnx_model.sample})
                                         .SerializeToString())
            assert_outputs_match(decode_response(pb.ModelInferResponse.FromString(answer)), onnx_model.expected)
            await asyncio.to_thread(model.close)
            assert not (repo / name).exists()
            with pytest.raises(NotHere):
                await model.forward(b"")
        sklearn = ModelSpec(model_id="s", type="sklearn", path=str(onnx_model.file))
        with pytest.raises(ModelLoadError, match=r"does not serve type 'sklearn' \(runtime.server_types: onnx\)"):
            await asyncio.to_thread(server.load, sklearn, "ram")
        await server.aclose()
        told = adapter("triton", port, repository=str(repo), types=("onnx", "sklearn"))  # a misconfiguration
        with pytest.raises(ModelLoadError, match="no Triton backend is known for type 'sklearn'"):
            await asyncio.to_thread(told.load, sklearn, "ram")
        assert [p.name for p in repo.iterdir()] == ["users-own"]  # nothing left behind
        await told.aclose()


async def test_triton_layout_folders_load_and_links_out_of_the_roots_are_refused(onnx_model: ModelArtifact,
                                                                                   tmp_path: Path) -> None:
    import shutil

    roots = tmp_path / "models"
    own = roots / "own-layout"
    (own / "3").mkdir(parents=True)
    shutil.copy(onnx_model.file, own / "3" / "model.onnx")
    (own / "config.pbtxt").write_text('name: "whatever-the-user-wrote"\nbackend: "onnxruntime"\nmax_batch_size: 0\n')
    sneaky = roots / "sneaky"
    (sneaky / "1").mkdir(parents=True)
    (sneaky / "config.pbtxt").write_text('backend: "onnxruntime"\n')
    (sneaky / "1" / "model.onnx").symlink_to(onnx_model.file)  # a real model, but outside the roots
    repo = tmp_path / "repo"
    repo.mkdir()
    with running("tests.support.triton_standin", "--repository", str(repo)) as (port, _):
        server = adapter("triton", port, repository=str(repo), roots=(str(roots),))
        model = await asyncio.to_thread(server.load, ModelSpec(model_id="own", type="onnx", path=str(own)), "ram")
        assert (repo / "own" / "config.pbtxt").read_text().startswith('name: "own"\n')
        from mesh.gen.inference import grpc_service_pb2 as pb
        answer = await model.forward(encode_request(model_name="x", inputs={"input": onnx_model.sample})
                                     .SerializeToString())
        assert_outputs_match(decode_response(pb.ModelInferResponse.FromString(answer)), onnx_model.expected)
        with pytest.raises(ModelLoadError, match="leads outside the model roots"):
            await asyncio.to_thread(server.load, ModelSpec(model_id="s", type="onnx", path=str(sneaky)), "ram")
        assert not (repo / "s").exists()
        await server.aclose()


@pytest.mark.parametrize("code", ["UNAVAILABLE", "NOT_FOUND"])  # Triton 20.x, and Triton since
async def test_triton_copy_lost_when_the_server_forgets_it(onnx_model: ModelArtifact, tmp_path: Path,
                                                           code: str) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    with running("tests.support.triton_standin", "--repository", str(repo), "--unknown-model-code", code) \
            as (port, _):
        server = adapter("triton", port, repository=str(repo))
        model = await asyncio.to_thread(server.load, ModelSpec(model_id="m", type="onnx", path=str(onnx_model.file)),
                                        "ram")
        server._unload("m", 5)  # as a restarted server would: it no longer has the model
        with pytest.raises(CopyLost):
            await model.forward(encode_request(model_name="x", inputs={"input": onnx_model.sample})
                                .SerializeToString())
        await server.aclose()


# --- end to end through a router -----------------------------------------------------------------
async def _status(mesh: InProcessMesh, model_id: str) -> mm.ModelStatusInfo:
    return await mesh.mesh.getModelStatus(mm.GetStatusRequest(modelId=model_id), timeout=10)


async def test_end_to_end_through_the_router_with_an_spi_server(sklearn_model: ModelArtifact) -> None:
    with running("tests.support.spi_server") as (port, _):
        mesh = InProcessMesh(memory_url(), runtime_overrides={
            "server": "spi", "server_address": f"127.0.0.1:{port}", "server_types": ("sklearn",)})
        await mesh.start(runtimes=1)
        try:
            await mesh.register("iris", "sklearn", str(sklearn_model.file))
            body = encode_request(model_name="", inputs={"input-0": sklearn_model.sample})
            assert_outputs_match(decode_response(await mesh.infer("iris", body)), sklearn_model.expected)
            metadata = await mesh.v2.ModelMetadata(mm_metadata_request("iris"), metadata=(("mm-model-id", "iris"),),
                                                   timeout=10)
            assert metadata.name == "iris"
            # A type the server does not serve: no runtime for it, said precisely.
            await mesh.register("x", "xgboost", str(sklearn_model.file))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await mesh.infer("x", body, timeout=10)
            assert "xgboost" in (err.value.details() or "")
        finally:
            await mesh.stop()


def mm_metadata_request(name: str) -> object:
    from mesh.gen.inference import grpc_service_pb2 as pb
    return pb.ModelMetadataRequest(name=name)


async def test_end_to_end_a_refused_load_is_loading_failed_with_no_placement(sklearn_model: ModelArtifact) -> None:
    with running("tests.support.spi_server", "--fail-loads", "model format v7 unsupported") as (port, _):
        mesh = InProcessMesh(memory_url(), runtime_overrides={
            "server": "spi", "server_address": f"127.0.0.1:{port}", "server_types": ("sklearn",)})
        await mesh.start(runtimes=1)
        try:
            await mesh.register("iris", "sklearn", str(sklearn_model.file))
            body = encode_request(model_name="", inputs={"input-0": sklearn_model.sample})
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await mesh.infer("iris", body, timeout=20)
            assert "model format v7 unsupported" in (err.value.details() or "")

            async def failed() -> bool:
                return (await _status(mesh, "iris")).status == ST.LOADING_FAILED
            await mesh.wait_for(failed, timeout=10)
            status = await _status(mesh, "iris")
            assert any("model format v7 unsupported" in e for e in status.errors), status.errors
            from mesh.registry import open_store
            from mesh.registry.registry import Registry
            store, prefix = open_store(mesh.registry_url)
            assert await Registry(store, prefix).placements_of("iris") == []
        finally:
            await mesh.stop()


async def test_end_to_end_a_restarted_server_is_loaded_again(sklearn_model: ModelArtifact) -> None:
    proc, port = start_server("tests.support.spi_server", "--port", "0")
    mesh = InProcessMesh(memory_url(), runtime_overrides={
        "server": "spi", "server_address": f"127.0.0.1:{port}", "server_types": ("sklearn",)})
    try:
        await mesh.start(runtimes=1)
        await mesh.register("iris", "sklearn", str(sklearn_model.file))
        body = encode_request(model_name="", inputs={"input-0": sklearn_model.sample})
        assert_outputs_match(decode_response(await mesh.infer("iris", body)), sklearn_model.expected)
        stop_server(proc)  # the server restarts on the same port, without its models
        proc, _ = start_server("tests.support.spi_server", "--port", str(port))
        for _ in range(5):  # the copy was lost: the runtime loads it again under the request
            assert_outputs_match(decode_response(await mesh.infer("iris", body)), sklearn_model.expected)
    finally:
        await mesh.stop()
        stop_server(proc)


async def test_end_to_end_a_server_that_is_down_takes_no_loads_until_it_is_back(sklearn_model: ModelArtifact) -> None:
    proc, port = start_server("tests.support.spi_server", "--port", "0")
    mesh = InProcessMesh(memory_url(), runtime_overrides={
        "server": "spi", "server_address": f"127.0.0.1:{port}", "server_types": ("sklearn",)})
    try:
        await mesh.start(runtimes=1)
        await mesh.register("iris", "sklearn", str(sklearn_model.file))
        body = encode_request(model_name="", inputs={"input-0": sklearn_model.sample})
        assert_outputs_match(decode_response(await mesh.infer("iris", body)), sklearn_model.expected)
        stop_server(proc)

        async def refused() -> bool:  # the supervisor noticed: the copy is gone, loads are refused
            try:
                await mesh.infer("iris", body, timeout=10)
            except grpc.aio.AioRpcError as exc:
                return exc.code() == grpc.StatusCode.UNAVAILABLE
            return False
        await mesh.wait_for(refused, timeout=20)
        # Not the model's failure: nothing is remembered against it.
        assert (await _status(mesh, "iris")).status != ST.LOADING_FAILED
        proc, _ = start_server("tests.support.spi_server", "--port", str(port))

        async def served() -> bool:
            try:
                response = await mesh.infer("iris", body, timeout=10)
            except grpc.aio.AioRpcError:
                return False
            assert_outputs_match(decode_response(response), sklearn_model.expected)
            return True
        await mesh.wait_for(served, timeout=20)
    finally:
        await mesh.stop()
        stop_server(proc)


async def test_a_runtime_stops_promptly_when_its_server_hangs_on_unloads(sklearn_model: ModelArtifact) -> None:
    """Three loaded models, a server that never answers an unload: the runtime's shutdown waits
    STOP_UNLOAD_S once, not 30 s per model."""
    with running("tests.support.spi_server", "--hang-unloads") as (port, _):
        mesh = InProcessMesh(memory_url(), runtime_overrides={
            "server": "spi", "server_address": f"127.0.0.1:{port}", "server_types": ("sklearn",)})
        await mesh.start(runtimes=1)
        try:
            body = encode_request(model_name="", inputs={"input-0": sklearn_model.sample})
            for i in range(3):
                await mesh.register(f"m{i}", "sklearn", str(sklearn_model.file))
                await mesh.infer(f"m{i}", body)
        finally:
            started = time.monotonic()
            await mesh.stop()
            assert time.monotonic() - started < 20  # drain and re-homing included; 3 x 30 s before
