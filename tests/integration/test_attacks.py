"""Attacks on where model files come from, against a real router and runtime on 127.0.0.1.

The runtime reads models only under its model roots (``runtime.model_roots``): a pickle whose
``__reduce__`` would create a marker file is placed outside them and reached by every path a client
could try (absolute, ``..``, ``~``, a ``file://`` URI, a symbolic link inside the roots, a directory
holding a link, the runtime's SPI directly): the marker never appears. A runtime that refuses code
formats (``allow_code_formats = false``) refuses pickles and TorchScript even inside the roots, and
serves a skops file. A token bound to a path prefix cannot register models from another tenant's
directory; a model-ID prefix stops at a boundary. A file whose extension is not its type's, or a
directory too large to walk, is refused with the reason, while other models keep answering.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path

import grpc
import joblib
import numpy as np
import pytest

from mesh.gen.mmesh import model_mesh_pb2 as mm
from mesh.gen.mmesh import model_runtime_pb2 as rt
from mesh.gen.mmesh import model_runtime_pb2_grpc as rt_grpc
from mesh.tensors import decode_response, encode_request
from tests.support.inprocess import InProcessMesh, memory_url
from tests.support.models import make_model

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


class Evil:
    """Unpickling this creates ``marker``: the proof that a pickle's code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (str(self.marker), "w"))


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Path]:
    roots = tmp_path / "models"
    (roots / "team-a").mkdir(parents=True)
    (roots / "team-b").mkdir(parents=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    marker = tmp_path / "pwned"
    joblib.dump(Evil(marker), outside / "evil.joblib")
    (roots / "team-a" / "link.joblib").symlink_to(outside / "evil.joblib")
    (roots / "team-a" / "linkdir").mkdir()
    (roots / "team-a" / "linkdir" / "model.joblib").symlink_to(outside / "evil.joblib")
    return {"roots": roots, "outside": outside, "marker": marker, "tmp": tmp_path}


async def _status(mesh: InProcessMesh, model_id: str, path: str) -> tuple[grpc.StatusCode, str]:
    try:
        await mesh.register(model_id, "sklearn", path)
        await mesh.infer(model_id, encode_request(model_name=model_id, inputs={"x": np.zeros((1, 4), np.float32)}))
    except grpc.aio.AioRpcError as err:
        return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


async def test_a_pickle_outside_the_model_roots_never_runs(layout: dict[str, Path]) -> None:
    roots, outside, marker = layout["roots"], layout["outside"], layout["marker"]
    mesh = await InProcessMesh(memory_url(), runtime_overrides={"model_roots": (str(roots),)}).start(runtimes=1)
    try:
        evil = str(outside / "evil.joblib")
        at_registration = {
            "absolute": evil,
            "dotdot": "team-a/../../elsewhere/evil.joblib",
            "dotdot-absolute": f"{roots}/team-a/../../elsewhere/evil.joblib",
            "home": "~/evil.joblib",
            "uri": (outside / "evil.joblib").as_uri(),
            "scheme": "ftp://bucket/evil.joblib",  # s3:// and the like are object storage (mesh.storage)
        }
        for model_id, path in at_registration.items():
            code, message = await _status(mesh, model_id, path)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (model_id, code, message)
            assert "model roots" in message or "'..'" in message or "'~'" in message or "scheme" in message
        for model_id, path in {"symlink": "team-a/link.joblib", "symlink-dir": "team-a/linkdir"}.items():
            code, message = await _status(mesh, model_id, path)  # lexically inside: refused at load
            assert code == grpc.StatusCode.FAILED_PRECONDITION, (model_id, code, message)
            assert "outside the model roots" in message and "symbolic link" in message
        # The runtime's SPI, called directly with a path of the caller's choosing: it loads only
        # what the registry holds, never the caller's type and path.
        async with grpc.aio.insecure_channel(mesh.runtimes[0].endpoint) as channel:
            spi = rt_grpc.ModelRuntimeStub(channel)
            for model_id in ("spi-evil", "symlink"):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await spi.loadModel(rt.LoadModelRequest(modelId=model_id, modelType="sklearn", modelPath=evil),
                                        timeout=10)
                assert caught.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION)
        assert not marker.exists()
        # A model inside the roots still loads and answers.
        good = make_model("sklearn", roots / "team-a", seed=1)
        await mesh.register("good", "sklearn", str(good.path.relative_to(roots)))
        out = decode_response(await mesh.infer("good", encode_request(model_name="good", inputs={"x": good.sample})))
        np.testing.assert_array_equal(out["predict"], good.expected["predict"])
    finally:
        await mesh.stop()


async def test_a_runtime_refusing_code_formats_serves_skops_only(layout: dict[str, Path]) -> None:
    import skops.io as skops_io
    from sklearn.linear_model import LogisticRegression

    roots, marker = layout["roots"], layout["marker"]
    joblib.dump(Evil(marker), roots / "team-a" / "inside.joblib")
    torch_model = make_model("torchscript", roots / "team-a", seed=2)
    x = np.random.default_rng(0).standard_normal((40, 4)).astype(np.float32)
    estimator = LogisticRegression().fit(x, (x[:, 0] > 0).astype(np.int64))
    skops_io.dump(estimator, roots / "team-a" / "safe.skops")
    mesh = await InProcessMesh(memory_url(), runtime_overrides={
        "model_roots": (str(roots),), "allow_code_formats": False}).start(runtimes=1)
    try:
        code, message = await _status(mesh, "pickle", "team-a/inside.joblib")
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert "run code when they are loaded" in message and "skops" in message
        await mesh.register("ts", "torchscript", str(torch_model.path))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await mesh.infer("ts", encode_request(model_name="ts", inputs={"x": torch_model.sample}))
        assert "allow_code_formats = false" in (caught.value.details() or "")
        assert not marker.exists()
        await mesh.register("safe", "sklearn", "team-a/safe.skops")
        out = decode_response(await mesh.infer("safe", encode_request(model_name="safe", inputs={"x": x[:5]})))
        np.testing.assert_array_equal(out["predict"], estimator.predict(x[:5]))
    finally:
        await mesh.stop()


LEAK = """
import sys, torch
class Leak(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_file({secret!r}, shared=False, size=28, dtype=torch.uint8)
torch.jit.script(Leak()).save(sys.argv[1])
"""


async def test_a_torchscript_model_reading_a_secret_file_is_refused(layout: dict[str, Path]) -> None:
    """The issue's attack: a 3-line scripted module whose output is a file it reads (torch.from_file
    maps any regular file the process can read). A runtime refusing code formats never runs it."""
    import subprocess
    import sys

    roots, tmp = layout["roots"], layout["tmp"]
    secret = layout["outside"] / "credentials"
    secret.write_text("etcd-password=hunter2-secret")
    (tmp / "leak.py").write_text(LEAK.format(secret=str(secret)))  # TorchScript compiles from source
    await asyncio.to_thread(subprocess.run, [sys.executable, str(tmp / "leak.py"), str(roots / "team-a" / "leak.pt")],
                            check=True, capture_output=True, timeout=120)
    mesh = await InProcessMesh(memory_url(), runtime_overrides={
        "model_roots": (str(roots),), "allow_code_formats": False}).start(runtimes=1)
    try:
        await mesh.register("leak", "torchscript", "team-a/leak.pt")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await mesh.infer("leak", encode_request(model_name="leak", inputs={"x": np.zeros((1, 1), np.float32)}))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "allow_code_formats = false" in (caught.value.details() or "")
        assert "hunter2" not in (caught.value.details() or "")
    finally:
        await mesh.stop()


async def test_tokens_bound_to_paths_and_prefixes_keep_tenants_apart(layout: dict[str, Path]) -> None:
    roots = layout["roots"]
    team_a = "team-a-token-0123456789"
    tokens = layout["tmp"] / "tokens.toml"
    tokens.write_text(f'''
[[token]]
name = "team-a"
role = "write"
sha256 = "{hashlib.sha256(team_a.encode()).hexdigest()}"
prefixes = ["team-a"]
paths = ["{roots}/team-a"]
''')
    b_model = make_model("sklearn", roots / "team-b", seed=3)
    a_model = make_model("sklearn", roots / "team-a", seed=4)
    mesh = await InProcessMesh(memory_url(), runtime_overrides={"model_roots": (str(roots),)},
                               extra={"auth": {"tokens_file": str(tokens)}}).start(runtimes=1)
    auth = (("authorization", f"Bearer {team_a}"),)
    try:
        async def register(model_id: str, path: str) -> grpc.StatusCode:
            try:
                await mesh.mesh.registerModel(mm.RegisterModelRequest(
                    modelId=model_id, modelInfo=mm.ModelInfo(type="sklearn", path=path)), metadata=auth, timeout=10)
            except grpc.aio.AioRpcError as err:
                return err.code()
            return grpc.StatusCode.OK

        assert await register("team-a/mine", str(a_model.path.relative_to(roots))) == grpc.StatusCode.OK
        # Team B's file, under team A's model ID: by absolute path, relative path, and through '..'.
        assert await register("team-a/theirs", str(b_model.path)) == grpc.StatusCode.PERMISSION_DENIED
        assert await register("team-a/theirs", str(b_model.path.relative_to(roots))) == \
            grpc.StatusCode.PERMISSION_DENIED
        assert await register("team-a/theirs", f"team-a/../team-b/{b_model.path.name}") == \
            grpc.StatusCode.INVALID_ARGUMENT
        # A model-ID prefix stops at a boundary: "team-a" does not cover "team-ab/...".
        assert await register("team-ab/x", str(a_model.path.relative_to(roots))) == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await mesh.stop()


async def test_token_quotas_bound_registered_models_and_pinned_copies(layout: dict[str, Path]) -> None:
    roots = layout["roots"]
    tenant, admin = "team-a-token-0123456789", "admin-token-0123456789"
    tokens = layout["tmp"] / "tokens.toml"
    tokens.write_text(f'''
[[token]]
name = "team-a"
role = "write"
sha256 = "{hashlib.sha256(tenant.encode()).hexdigest()}"
prefixes = ["team-a"]
max_models = 2
max_pinned_copies = 2

[[token]]
name = "admin"
role = "write"
token = "{admin}"
''')
    path = str(make_model("sklearn", roots / "team-a", seed=5).path.relative_to(roots))
    mesh = await InProcessMesh(memory_url(), runtime_overrides={"model_roots": (str(roots),)},
                               extra={"auth": {"tokens_file": str(tokens)}}).start(runtimes=1)

    async def register(token: str, model_id: str, min_copies: int = 0) -> tuple[grpc.StatusCode, str]:
        try:
            await mesh.mesh.registerModel(mm.RegisterModelRequest(
                modelId=model_id, modelInfo=mm.ModelInfo(type="sklearn", path=path, minCopies=min_copies)),
                metadata=(("authorization", f"Bearer {token}"),), timeout=10)
        except grpc.aio.AioRpcError as err:
            return err.code(), err.details() or ""
        return grpc.StatusCode.OK, ""

    try:
        exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (await register(admin, "team-ab/x"))[0] == grpc.StatusCode.OK  # not under "team-a"
        assert (await register(tenant, "team-a/1"))[0] == grpc.StatusCode.OK
        assert (await register(tenant, "team-a/2", min_copies=2))[0] == grpc.StatusCode.OK
        code, details = await register(tenant, "team-a/3")
        assert code == exhausted and "at most 2 models" in details and "2 are" in details, details
        assert (await register(tenant, "team-a/1"))[0] == grpc.StatusCode.OK  # the same again is free
        # setVModel with a modelInfo registers too, within the same quota.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await mesh.mesh.setVModel(mm.SetVModelRequest(
                vModelId="team-a/v", targetModelId="team-a/4", modelInfo=mm.ModelInfo(type="sklearn", path=path)),
                metadata=(("authorization", f"Bearer {tenant}"),), timeout=10)
        assert err.value.code() == exhausted
        await mesh.mesh.unregisterModel(mm.UnregisterModelRequest(modelId="team-a/1"),
                                        metadata=(("authorization", f"Bearer {tenant}"),), timeout=10)
        code, details = await register(tenant, "team-a/3", min_copies=1)
        assert code == exhausted and "at most 2 copies" in details, details
        assert (await register(tenant, "team-a/3"))[0] == grpc.StatusCode.OK
        assert (await register(admin, "team-a/5"))[0] == grpc.StatusCode.OK  # quotas are the tenant's
    finally:
        await mesh.stop()


async def test_wrong_extensions_and_huge_directories_are_refused_without_stalling_others(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The directory walk is made slow (a slow mount, 1.5 s) to show where it runs: requests for
    another model answer meanwhile, which they could not if it ran on the event loop."""
    from mesh.runtime.loaders import base

    walk_fast = base._walk

    def walk_slow(path: Path) -> list[Path]:
        time.sleep(1.5)
        return walk_fast(path)

    monkeypatch.setattr(base, "_walk", walk_slow)
    mesh = await InProcessMesh(memory_url()).start(runtimes=1)
    try:
        good = make_model("sklearn", tmp_path, seed=5)
        await mesh.register("good", "sklearn", str(good.path))
        request = encode_request(model_name="good", inputs={"x": good.sample})
        await mesh.infer("good", request)
        text = tmp_path / "notes.txt"
        text.write_text("not a model")
        code, message = await _status(mesh, "txt", str(text))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "is not a .joblib/.pkl/.pickle/.skops file" in message
        big = tmp_path / "big"
        big.mkdir()
        for i in range(10_050):
            (big / f"f{i}").touch()

        async def walk() -> tuple[grpc.StatusCode, str]:
            return await _status(mesh, "big", str(big))

        async def meanwhile() -> float:
            await asyncio.sleep(0.3)  # the walk has begun
            slowest = 0.0
            for _ in range(10):
                started = time.perf_counter()
                await mesh.infer("good", request)
                slowest = max(slowest, time.perf_counter() - started)
            return slowest

        (code, message), slowest = await asyncio.gather(walk(), meanwhile())
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "holds more than 10000 entries" in message
        assert slowest < 1.0  # never waited for the 1.5 s walk: it ran in the load's thread
    finally:
        await mesh.stop()


async def test_refused_tokens_are_counted_and_logged(tmp_path: Path) -> None:
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    reader = "a-reader-token-0123456789"
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(f'''
[[token]]
name = "reader"
role = "read"
sha256 = "{hashlib.sha256(reader.encode()).hexdigest()}"
''')
    mesh = await InProcessMesh(memory_url(), router_overrides={"metrics_port": port},
                               extra={"auth": {"tokens_file": str(tokens)}}).start(runtimes=1)
    try:
        info = mm.ModelInfo(type="sklearn", path="/m.joblib")
        for metadata in [(), (("authorization", "Bearer wrong-token-000000000"),)] * 3:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await mesh.mesh.registerModel(mm.RegisterModelRequest(modelId="m", modelInfo=info),
                                              metadata=metadata, timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await mesh.mesh.registerModel(mm.RegisterModelRequest(modelId="m", modelInfo=info),
                                          metadata=(("authorization", f"Bearer {reader}"),), timeout=10)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED

        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                return r.read().decode()

        text = await asyncio.to_thread(scrape)
        counts = {line.split('"')[1]: float(line.split()[-1]) for line in text.splitlines()
                  if line.startswith("mesh_auth_failures_total{")}
        assert counts["unauthenticated"] >= 6 and counts["permission_denied"] >= 1, counts
    finally:
        await mesh.stop()


async def test_client_credentials_never_reach_a_runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Headers that carry a client's credentials (authorization, cookies, API keys) stop at the
    router; what a runtime receives is only what it needs."""
    from mesh.runtime import servicer

    seen: list[tuple[tuple[str, object], ...]] = []
    real_bind = servicer.bind_request

    def recording(model_id: str, metadata):  # type: ignore[no-untyped-def]
        seen.append(tuple(metadata))
        return real_bind(model_id, metadata)

    monkeypatch.setattr(servicer, "bind_request", recording)
    mesh = await InProcessMesh(memory_url()).start(runtimes=1)
    try:
        model = make_model("sklearn", tmp_path, seed=6)
        await mesh.register("m", "sklearn", str(model.path))
        secrets = (("authorization", "Bearer abc"), ("cookie", "session=xyz"), ("x-api-key", "k123"),
                   ("proxy-authorization", "Basic zz"), ("x-request-id", "r-1"))
        await mesh.v2.ModelInfer(encode_request(model_name="m", inputs={"x": model.sample}),
                                 metadata=(("mm-model-id", "m"), *secrets), timeout=10)
        assert seen, "the runtime saw no request"
        keys = {k for md in seen for k, _ in md}
        assert keys.isdisjoint({"authorization", "cookie", "x-api-key", "proxy-authorization"}), keys
        assert "x-request-id" in keys  # what is not a credential still passes
    finally:
        await mesh.stop()
