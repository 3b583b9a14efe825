"""Load failures, end to end: a real router and three real runtimes (gRPC servers on 127.0.0.1) over
a real etcd, and a model file that is garbage.

Promises (issue 7, item 4): the client gets a clear error quickly, naming the model and the loader's
reason; getModelStatus says LOADING_FAILED with the reason in ``errors``; the load is tried on at
most ``MAX_LOAD_FAILURES`` distinct instances, not retried forever, however hard clients insist; the
failure records expire after ``registry.failure_ttl_s``, after which the fixed file loads and serves.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from mesh.gen.mmesh import model_mesh_pb2 as mm
from mesh.registry.etcd_server import EtcdProcess
from mesh.registry.records import ModelSpec
from mesh.router.routing import MAX_LOAD_FAILURES
from mesh.runtime import app as runtime_app
from mesh.tensors import decode_response, encode_request
from tests.support.inprocess import InProcessMesh
from tests.support.models import ModelArtifact, make_model

pytestmark = pytest.mark.integration

ST = mm.ModelStatusInfo
RUNTIMES = 3
FAILURE_TTL_S = 3  # small, so that the expiry is part of the test
QUICK_S = 10.0  # "quickly": the bound on each failing request (a garbage file fails at once)


@pytest.fixture
def load_calls(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Every load a runtime of this process starts, by model ID (the runtimes are in process)."""
    calls: Counter[str] = Counter()
    real = runtime_app.load_model

    def counting(spec: ModelSpec, device: str, **kw: object) -> object:
        calls[spec.model_id] += 1
        return real(spec, device, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(runtime_app, "load_model", counting)
    return calls


@pytest.fixture
async def mesh(etcd: EtcdProcess, load_calls: Counter[str]) -> AsyncIterator[InProcessMesh]:
    # A lease TTL longer than InProcessMesh's 2 s: loads share this process's GIL with the
    # keep-alives, and on a busy machine a first import of scikit-learn can stall them that long.
    m = InProcessMesh(etcd.url, extra={"registry": {"failure_ttl_s": FAILURE_TTL_S, "lease_ttl_s": 10}})
    try:
        await m.start(runtimes=RUNTIMES)
        yield m
    finally:
        await m.stop()


@pytest.fixture
def good_model(tmp_path: Path) -> ModelArtifact:
    return make_model("sklearn", tmp_path / "good", seed=1)


def corrupt_dir(tmp_path: Path) -> Path:
    model_dir = tmp_path / "corrupt"
    model_dir.mkdir()
    (model_dir / "model.joblib").write_bytes(b"\x00garbage, not a pickle\xff" * 64)
    return model_dir


async def status_of(mesh: InProcessMesh, model_id: str) -> mm.ModelStatusInfo:
    return await mesh.mesh.getModelStatus(mm.GetStatusRequest(modelId=model_id), timeout=10)


async def test_corrupt_file_fails_clearly_bounded_then_expires_and_the_fixed_file_serves(
        mesh: InProcessMesh, tmp_path: Path, good_model: ModelArtifact, load_calls: Counter[str]) -> None:
    model_dir = corrupt_dir(tmp_path)
    await mesh.register("broken", "sklearn", str(model_dir))
    request = encode_request(model_name="", inputs={"input-0": good_model.sample})

    # A client that insists: 4x as many requests as the bound, back to back and concurrently.
    async def one() -> grpc.aio.AioRpcError:
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await mesh.infer("broken", request, timeout=QUICK_S + 5)
        assert time.monotonic() - started < QUICK_S, "a failing load must answer quickly"
        return err.value

    errors = [await one() for _ in range(MAX_LOAD_FAILURES * 2)]
    errors += await asyncio.gather(*(one() for _ in range(MAX_LOAD_FAILURES * 2)))
    for error in errors:
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error
        details = error.details() or ""
        assert "'broken'" in details, details
        assert "load" in details and "model.joblib: KeyError" in details, details  # the loader's reason

    # The status says LOADING_FAILED, with the loader's reason per instance that tried.
    await mesh.wait_for(lambda: _failed_on(mesh, "broken", MAX_LOAD_FAILURES), timeout=10)
    status = await status_of(mesh, "broken")
    assert status.status == ST.LOADING_FAILED
    assert len(status.errors) == min(MAX_LOAD_FAILURES, RUNTIMES)
    assert all("cannot load" in e and "model.joblib: KeyError" in e for e in status.errors), status.errors
    tried = {e.split(":", 1)[0] for e in status.errors}
    assert len(tried) == len(status.errors)  # distinct instances
    # Bounded: one load per instance, not one per request.
    assert load_calls["broken"] <= min(MAX_LOAD_FAILURES, RUNTIMES), load_calls

    # The failure records expire on their own; meanwhile the file is fixed.
    shutil.copy(good_model.file, model_dir / "model.joblib")
    await mesh.wait_for(lambda: _no_failures(mesh, "broken"), timeout=FAILURE_TTL_S + 10)
    assert (await status_of(mesh, "broken")).status == ST.NOT_LOADED
    response = await mesh.infer("broken", request, timeout=30)
    np.testing.assert_array_equal(decode_response(response)["predict"], good_model.expected["predict"])
    await mesh.wait_for(lambda: _loaded(mesh, "broken"), timeout=10)


async def test_ensure_loaded_of_a_corrupt_file_reports_the_reason(
        mesh: InProcessMesh, tmp_path: Path, load_calls: Counter[str]) -> None:
    model_dir = corrupt_dir(tmp_path)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.mesh.registerModel(mm.RegisterModelRequest(
            modelId="broken-now", modelInfo=mm.ModelInfo(type="sklearn", path=str(model_dir)),
            loadNow=True, sync=True), timeout=QUICK_S)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "'broken-now'" in (err.value.details() or "")
    await mesh.wait_for(lambda: _failed_on(mesh, "broken-now", 1), timeout=10)
    status = await status_of(mesh, "broken-now")
    assert status.status == ST.LOADING_FAILED and status.errors


async def _failed_on(mesh: InProcessMesh, model_id: str, at_least: int) -> bool:
    status = await status_of(mesh, model_id)
    return len(status.errors) >= min(at_least, RUNTIMES)


async def _no_failures(mesh: InProcessMesh, model_id: str) -> bool:
    return not (await status_of(mesh, model_id)).errors


async def _loaded(mesh: InProcessMesh, model_id: str) -> bool:
    return (await status_of(mesh, model_id)).status == ST.LOADED
