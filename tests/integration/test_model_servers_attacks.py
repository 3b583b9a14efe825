"""External model servers behind the runtime, attacked: what a client's request, a tenant's model
folder or a slow model can make the adapters (mesh.runtime.servers) do, against real server
processes (``tests.support.spi_server``, ``tests.support.triton_standin``) and, end to end, through
a router. Each test is a review finding: it failed before the fix next to it.

- A request whose last field is left open swallows the ``model_name`` the runtime appends, so the
  server reads the client's own ``model_name``: a client routed to its model reached another
  tenant's model on the same server.
- A Triton-layout folder's config.pbtxt named files outside its folder (``default_model_filename:
  "../../.."``), referred to other models (ensembles), or was read whole whatever its size.
- A model ID equal to an entry of the repository that the mesh did not write had that entry
  deleted.
- A client's ``model_version`` the server lacks made the server answer "unknown model", which the
  runtime took for a lost copy: each such request unloaded and reloaded the model.
- One slow load held every other load of the server (a lock for RSS measurement, striped name
  locks), so that loads of other models failed at their deadline.
- A custom MLServer model-settings.json pointed MLServer at an environment outside the roots.
- Repository entries of copies lost with their server stayed behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import time
import zlib
from pathlib import Path

import grpc
import pytest

from mesh.errors import InvalidArgument, ModelLoadError
from mesh.gen.inference import grpc_service_pb2 as pb
from mesh.registry.records import ModelSpec
from mesh.runtime.forwarding import CopyLost
from mesh.runtime.servers.base import field_one
from mesh.tensors import decode_response, encode_request
from tests.support.inprocess import InProcessMesh, memory_url
from tests.support.model_servers import running
from tests.support.models import ModelArtifact, assert_outputs_match, make_model
from tests.support.server_adapters import adapter

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
INFER = "/inference.GRPCInferenceService/ModelInfer"
STRIPES = 64  # the adapter's name locks were striped so, before the fix


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("roots")


@pytest.fixture(scope="module")
def team_a(models: Path) -> ModelArtifact:
    return make_model("onnx", models / "team-a", seed=1)


@pytest.fixture(scope="module")
def team_b(models: Path) -> ModelArtifact:
    return make_model("onnx", models / "team-b", seed=2)


@pytest.fixture(scope="module")
def sklearn_model(tmp_path_factory: pytest.TempPathFactory) -> ModelArtifact:
    return make_model("sklearn", tmp_path_factory.mktemp("sk"), seed=0)


def open_tail(swallow: int) -> bytes:
    """An unknown field 99 (length-delimited) whose length covers the next ``swallow`` bytes."""
    return bytes([0x9A, 0x06, swallow])


# --- the name the runtime appends ----------------------------------------------------------------
async def test_a_request_cannot_swallow_the_model_name_the_runtime_appends(team_a: ModelArtifact,
                                                                           team_b: ModelArtifact,
                                                                           tmp_path: Path) -> None:
    """Team A may infer on "team-a" only (the router checks the mm-model-id header); its request
    names "team-b" in model_name and ends with a field whose length covers the model_name the
    runtime appends. Before the fix Triton served team-b's model to team A."""
    repo = tmp_path / "repo"
    repo.mkdir()
    with running("tests.support.triton_standin", "--repository", str(repo)) as (port, _):
        mesh = InProcessMesh(memory_url(), runtime_overrides={
            "server": "triton", "server_address": f"127.0.0.1:{port}", "server_repository": str(repo)})
        await mesh.start(runtimes=1)
        try:
            await mesh.register("team-a", "onnx", str(team_a.path))
            await mesh.register("team-b", "onnx", str(team_b.path))
            own = encode_request(model_name="", inputs={"input": team_b.sample})
            assert_outputs_match(decode_response(await mesh.infer("team-b", own)), team_b.expected)  # B's use
            assert mesh.channel is not None
            raw = mesh.channel.unary_unary(INFER)
            body = encode_request(model_name="team-b", inputs={"input": team_b.sample}).SerializeToString()
            for tail in (open_tail(len(field_one("team-a"))),  # swallows the appended name exactly
                         open_tail(100),  # runs past the end
                         b"\x9b\x06",  # a group never closed
                         b"\x98"):  # a tag cut short
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    answer = await raw(body + tail, metadata=(("mm-model-id", "team-a"),), timeout=20)
                    pytest.fail(f"answered by {pb.ModelInferResponse.FromString(answer).model_name!r}")
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
                assert "malformed request" in (err.value.details() or "")
            # A well-formed request naming another model in model_name reaches the routed one.
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await raw(body, metadata=(("mm-model-id", "team-a"),), timeout=20)
            assert "'team-a'" in (err.value.details() or "")  # team-a's own complaint about B's input
            answer = await raw(encode_request(model_name="team-b", inputs={"input": team_a.sample})
                               .SerializeToString(), metadata=(("mm-model-id", "team-a"),), timeout=20)
            response = pb.ModelInferResponse.FromString(answer)
            assert response.model_name == "team-a"
            assert_outputs_match(decode_response(response), team_a.expected)
        finally:
            await mesh.stop()


# --- Triton layouts: what a tenant's config.pbtxt may say ----------------------------------------
def triton_layout(root: Path, name: str, model: ModelArtifact, config: str | bytes) -> Path:
    folder = root / name
    (folder / "1").mkdir(parents=True)
    shutil.copy(model.file, folder / "1" / "model.onnx")
    if isinstance(config, str):
        (folder / "config.pbtxt").write_text(config)
    else:
        (folder / "config.pbtxt").write_bytes(config)
    return folder


@pytest.mark.parametrize("filename", [
    '"../../../team-b/onnx-2/model.onnx"',  # from <repo>/<name>/1 (a link into the folder) to B's file
    r'"\x2e\x2e/\056\056/../team-b/onnx-2/model.onnx"',  # the same, escaped
    '"../../" # a comment between the halves\n "../team-b/onnx-2/model.onnx"',  # adjacent strings join
])
async def test_triton_config_may_not_name_files_outside_its_folder(models: Path, team_a: ModelArtifact,
                                                                   team_b: ModelArtifact, tmp_path: Path,
                                                                   filename: str) -> None:
    """Team A's folder in Triton's layout; its config points Triton at team B's model file (inside
    the roots, outside team A's folder, which is all team A's token lets it register). Before the
    fix the stand-in, as Triton, loaded and served team B's model under team A's ID."""
    folder = triton_layout(models / "team-a", f"layout-{zlib.crc32(filename.encode())}", team_a,
                           f'backend: "onnxruntime"\nmax_batch_size: 0\ndefault_model_filename: {filename}\n')
    repo = tmp_path / "repo"
    repo.mkdir()
    with running("tests.support.triton_standin", "--repository", str(repo)) as (port, _):
        server = adapter("triton", port, repository=str(repo), roots=(str(models),))
        with pytest.raises(ModelLoadError, match="names a path outside the model's folder"):
            model = await asyncio.to_thread(server.load, ModelSpec(model_id="a", type="onnx", path=str(folder)),
                                            "ram")
            answer = await model.forward(encode_request(model_name="", inputs={"input": team_b.sample})
                                         .SerializeToString())
            assert_outputs_match(decode_response(pb.ModelInferResponse.FromString(answer)), team_b.expected)
            pytest.fail("team A's registration served team B's model file")
        assert list(repo.iterdir()) == []
        await server.aclose()


async def test_triton_ensembles_and_unreadable_or_huge_configs_are_refused(models: Path, team_a: ModelArtifact,
                                                                            tmp_path: Path) -> None:
    """An ensemble names other models of the server (another tenant's, or models the mesh evicts
    on its own terms); a config of 512 MiB was read whole into memory (in the runtime), and one
    that is not UTF-8 failed with a bare UnicodeDecodeError."""
    tenant = models / "team-a"
    ensemble = triton_layout(tenant, "ensemble", team_a, (
        'platform: "ensemble"\nmax_batch_size: 0\nensemble_scheduling { step [ { model_name: "team-b" '
        'model_version: -1 input_map { key: "input" value: "input" } } ] }\n'))
    huge = triton_layout(tenant, "huge", team_a, 'backend: "onnxruntime"\n')
    os.truncate(huge / "config.pbtxt", 512 << 20)  # sparse: no disk used, but a read_text() reads it all
    binary = triton_layout(tenant, "binary", team_a, b'backend: "onnxruntime"\n# \xff\xfe\n')
    repo = tmp_path / "repo"
    repo.mkdir()
    with running("tests.support.triton_standin", "--repository", str(repo)) as (port, _):
        server = adapter("triton", port, repository=str(repo), roots=(str(models),))
        refusals = ((ensemble, "an ensemble: it would call other models"), (huge, "larger than 65536 bytes"),
                    (binary, "not UTF-8"))
        for folder, why in refusals:
            with pytest.raises(ModelLoadError, match=why):
                await asyncio.to_thread(server.load, ModelSpec(model_id=folder.name, type="onnx", path=str(folder)),
                                        "ram")
        assert list(repo.iterdir()) == []
        # A plain config in the same layout still loads, even with a file named as the mesh's mark
        # among its entries (before: FileExistsError, quoting the repository's path to the client).
        plain = triton_layout(tenant, "plain", team_a, 'backend: "onnxruntime" # "../not/a/path" in a comment\n'
                                                       'max_batch_size: 0\n')
        (plain / ".mesh-serving").write_text("the tenant's")
        model = await asyncio.to_thread(server.load, ModelSpec(model_id="plain", type="onnx", path=str(plain)), "ram")
        answer = await model.forward(encode_request(model_name="", inputs={"input": team_a.sample})
                                     .SerializeToString())
        assert_outputs_match(decode_response(pb.ModelInferResponse.FromString(answer)), team_a.expected)
        await asyncio.to_thread(model.close)
        await server.aclose()


async def test_triton_a_model_id_naming_an_entry_the_mesh_did_not_write_leaves_it_alone(
        team_a: ModelArtifact, tmp_path: Path) -> None:
    """The operator keeps a model of its own in Triton's repository; a tenant registers a model
    with that directory's name. Before the fix the runtime deleted the operator's directory and
    put the tenant's model in its place."""
    repo = tmp_path / "repo"
    operators = repo / "resnet"
    (operators / "1").mkdir(parents=True)
    (operators / "config.pbtxt").write_text('backend: "onnxruntime"\n')
    (operators / "1" / "model.onnx").write_bytes(b"the operator's weights")
    with running("tests.support.triton_standin", "--repository", str(repo)) as (port, _):
        server = adapter("triton", port, repository=str(repo))
        with pytest.raises(ModelLoadError, match="repository holds an entry 'resnet' that the mesh did not write"):
            await asyncio.to_thread(server.load, ModelSpec(model_id="resnet", type="onnx", path=str(team_a.path)),
                                    "ram")
        assert (operators / "1" / "model.onnx").read_bytes() == b"the operator's weights"
        assert (operators / "config.pbtxt").read_text() == 'backend: "onnxruntime"\n'
        # An ID Triton would refuse as a name ('..' in it) is served under a hashed name.
        model = await asyncio.to_thread(server.load, ModelSpec(model_id="a..b", type="onnx", path=str(team_a.path)),
                                        "ram")
        assert model.name.startswith("mm-")
        await asyncio.to_thread(model.close)
        await server.aclose()


# --- error mapping --------------------------------------------------------------------------------
@pytest.mark.parametrize("code", ["UNAVAILABLE", "NOT_FOUND"])
async def test_a_version_the_server_lacks_is_the_clients_error_not_a_lost_copy(team_a: ModelArtifact,
                                                                               tmp_path: Path, code: str) -> None:
    """Triton answers a model_version it does not have with its "unknown model" error. Before the
    fix that was CopyLost: the runtime unloaded and reloaded the model for every such request (on
    every runtime the router then tried), a reload per request any inference client could send."""
    repo = tmp_path / "repo"
    repo.mkdir()
    with running("tests.support.triton_standin", "--repository", str(repo), "--unknown-model-code", code) \
            as (port, _):
        server = adapter("triton", port, repository=str(repo))
        model = await asyncio.to_thread(server.load, ModelSpec(model_id="m", type="onnx", path=str(team_a.path)),
                                        "ram")
        request = encode_request(model_name="", inputs={"input": team_a.sample})
        request.model_version = "7"
        with pytest.raises(InvalidArgument, match="version 7 is not found") as err:
            await model.forward(request.SerializeToString())
        assert not isinstance(err.value, CopyLost)
        request.model_version = ""
        answer = await model.forward(request.SerializeToString())
        assert_outputs_match(decode_response(pb.ModelInferResponse.FromString(answer)), team_a.expected)
        server._unload("m", 5)  # as a restarted server would: then it is a lost copy
        with pytest.raises(CopyLost):
            await model.forward(request.SerializeToString())
        await server.aclose()


# --- loads that hold up other loads ---------------------------------------------------------------
def same_stripe() -> tuple[str, str]:
    seen: dict[int, str] = {}
    for i in range(10_000):
        name = f"tenant-{i}"
        stripe = zlib.crc32(name.encode()) % STRIPES
        if stripe in seen:
            return seen[stripe], name
        seen[stripe] = name
    raise AssertionError("no two names share a stripe")


async def test_a_slow_load_does_not_hold_up_the_loads_of_other_models(sklearn_model: ModelArtifact) -> None:
    """Every load takes 2 s on the server, the load timeout is 3.5 s, and two models load at once.
    Before the fix the second waited for the first (loads measured by RSS ran one at a time, and
    names sharing a lock stripe too) and failed at its deadline, blamed on the model."""
    first, second = same_stripe()
    with running("tests.support.spi_server", "--load-delay-s", "2") as (port, _):
        server = adapter("spi", port, types=("sklearn",), load_timeout_s=3.5)
        assert server._server_rss() is not None  # the same host: loads are measured by RSS

        def load(model_id: str) -> object:
            return server.load(ModelSpec(model_id=model_id, type="sklearn", path=str(sklearn_model.file)), "ram")
        started = time.monotonic()
        loaded = await asyncio.gather(asyncio.to_thread(load, first), asyncio.to_thread(load, second))
        assert time.monotonic() - started < 3.5
        for model in loaded:
            await asyncio.to_thread(model.close)  # type: ignore[attr-defined]
        await server.aclose()


# --- MLServer custom model settings ----------------------------------------------------------------
@pytest.mark.parametrize("key", ["environment_tarball", "environment_path"])
async def test_mlserver_custom_settings_may_not_point_outside_the_roots(models: Path, tmp_path: Path,
                                                                        key: str) -> None:
    """MLServer unpacks ``environment_tarball`` and runs the model with the Python of
    ``environment_path``: a custom model's settings naming one outside the roots made MLServer
    read (and run) files no registration may name. The MLServer adapter is pointed at the Triton
    stand-in: it serves the same repository RPCs, and the check comes before any of them."""
    folder = models / "team-a" / f"custom-{key}"
    folder.mkdir(parents=True)
    (folder / "model.joblib").write_bytes(b"weights")
    outside = tmp_path / "elsewhere" / "env.tar.gz"
    outside.parent.mkdir()
    outside.write_bytes(b"an environment")
    (folder / "model-settings.json").write_text(json.dumps({
        "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": "model.joblib", key: str(outside)}}))
    repo = tmp_path / "repo"
    repo.mkdir()
    with running("tests.support.triton_standin", "--repository", str(repo)) as (port, _):
        server = adapter("mlserver", port, repository=str(repo), roots=(str(models),))
        with pytest.raises(ModelLoadError, match=f"{key}.*outside the model roots"):
            await asyncio.to_thread(server.load, ModelSpec(model_id="c", type="sklearn", path=str(folder)), "ram")
        assert list(repo.iterdir()) == []
        await server.aclose()


# --- clean-up --------------------------------------------------------------------------------------
async def test_repository_entries_of_copies_lost_with_their_server_are_removed(team_a: ModelArtifact,
                                                                               tmp_path: Path) -> None:
    """The server went down: its copies are lost and their unload is not sent. Before the fix the
    entries the runtime wrote for them stayed in the repository until that model loaded again."""
    repo = tmp_path / "repo"
    repo.mkdir()
    lost: list[str] = []

    async def on_lost(ids: list[str]) -> None:
        lost.extend(ids)

    with running("tests.support.triton_standin", "--repository", str(repo)) as (port, proc):
        server = adapter("triton", port, repository=str(repo))
        server.on_lost = on_lost
        model = await asyncio.to_thread(server.load, ModelSpec(model_id="m", type="onnx", path=str(team_a.path)),
                                        "ram")
        assert (repo / "m").is_dir()
        supervisor = asyncio.create_task(server.supervise())
        proc.send_signal(signal.SIGKILL)  # type: ignore[attr-defined]
        proc.wait()  # type: ignore[attr-defined]
        for _ in range(150):
            if lost:
                break
            await asyncio.sleep(0.1)
        assert lost == ["m"] and model.lost
        supervisor.cancel()
        await asyncio.to_thread(model.close)
        assert not (repo / "m").exists()
        await server.aclose()
