"""vModels and the models they refer to, as tenants sharing a mesh would attack them: real routers
over one registry (memory://, and a real etcd where transactions matter), real runtimes.

- Auto-delete removes only the models an auto-deleting setVModel of that vModel created, never a
  model it found registered: a tenant retargeting its alias away from a shared base model does not
  delete the base model.
- An owned vModel is changed or deleted only by a call naming its owner (an empty owner is not a
  wildcard); an unowned one is not adopted; with tokens, only the creating token (or one without
  prefixes) may change it.
- A model a vModel refers to cannot be unregistered, whichever router wrote the vModel and whatever
  the unregistering router's view says: the registry checks its refs index in the delete's
  transaction. vModels written before the index existed get their refs when a router starts.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import grpc
import pytest

from mesh.gen.mmesh import model_mesh_pb2 as mm
from mesh.gen.mmesh import model_mesh_pb2_grpc as mm_grpc
from mesh.registry import open_store
from mesh.registry.etcd_server import EtcdProcess
from mesh.registry.records import VModelRecord
from mesh.registry.registry import Registry
from mesh.router.app import serve_router
from tests.support.inprocess import InProcessMesh, memory_url, start
from tests.support.models import make_model

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
ST = mm.ModelStatusInfo


async def _status(mesh: InProcessMesh, model_id: str) -> int:
    return (await mesh.mesh.getModelStatus(mm.GetStatusRequest(modelId=model_id), timeout=10)).status


async def _code(call) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    try:
        await call
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def test_auto_delete_takes_only_what_the_vmodel_created(tmp_path: Path) -> None:
    mesh = await InProcessMesh(memory_url()).start(runtimes=1)
    try:
        base, mine = make_model("sklearn", tmp_path, seed=1), make_model("sklearn", tmp_path, seed=2)
        await mesh.register("shared/base", "sklearn", str(base.path))
        # Team A points an auto-deleting alias at the shared model (registered already, same definition).
        await mesh.mesh.setVModel(mm.SetVModelRequest(
            vModelId="team-a/alias", targetModelId="shared/base", owner="team-a", autoDeleteTargetModel=True,
            modelInfo=mm.ModelInfo(type="sklearn", path=str(base.path))), timeout=10)
        # ...then retargets it to a model of its own: the shared model must survive.
        await mesh.mesh.setVModel(mm.SetVModelRequest(
            vModelId="team-a/alias", targetModelId="team-a/own", owner="team-a", autoDeleteTargetModel=True,
            force=True, modelInfo=mm.ModelInfo(type="sklearn", path=str(mine.path))), timeout=10)
        assert await _status(mesh, "shared/base") != ST.NOT_FOUND
        # The model the alias created is auto-deleted when the alias goes.
        await mesh.mesh.deleteVModel(mm.DeleteVModelRequest(vModelId="team-a/alias", owner="team-a"), timeout=10)
        assert await _status(mesh, "team-a/own") == ST.NOT_FOUND
        assert await _status(mesh, "shared/base") != ST.NOT_FOUND
    finally:
        await mesh.stop()


async def test_owners_are_not_wildcards_and_not_adopted(tmp_path: Path) -> None:
    mesh = await InProcessMesh(memory_url()).start(runtimes=1)
    try:
        m = make_model("sklearn", tmp_path, seed=3)
        await mesh.register("m", "sklearn", str(m.path))
        await mesh.mesh.setVModel(mm.SetVModelRequest(vModelId="owned", targetModelId="m", owner="team-a"))
        await mesh.mesh.setVModel(mm.SetVModelRequest(vModelId="loose", targetModelId="m"))
        for request, code in [
            (mm.DeleteVModelRequest(vModelId="owned"), grpc.StatusCode.FAILED_PRECONDITION),  # no owner named
            (mm.DeleteVModelRequest(vModelId="owned", owner="team-b"), grpc.StatusCode.FAILED_PRECONDITION),
        ]:
            assert await _code(mesh.mesh.deleteVModel(request, timeout=10)) == code
        assert await _code(mesh.mesh.setVModel(mm.SetVModelRequest(
            vModelId="owned", targetModelId="m", force=True), timeout=10)) == grpc.StatusCode.ALREADY_EXISTS
        assert await _code(mesh.mesh.setVModel(mm.SetVModelRequest(
            vModelId="loose", targetModelId="m", owner="team-b"), timeout=10)) == grpc.StatusCode.ALREADY_EXISTS
        loose = await mesh.mesh.getVModelStatus(mm.GetVModelStatusRequest(vModelId="loose"), timeout=10)
        assert loose.owner == ""  # not adopted
        assert await _code(mesh.mesh.deleteVModel(mm.DeleteVModelRequest(vModelId="owned", owner="team-a"),
                                                  timeout=10)) == grpc.StatusCode.OK
    finally:
        await mesh.stop()


async def test_only_the_creating_token_changes_a_vmodel(tmp_path: Path) -> None:
    tokens = {"a1": "team-a-one-0123456789", "a2": "team-a-two-0123456789", "ops": "operator-0123456789xx"}
    entries = "".join(f'''
[[token]]
name = "{name}"
role = "write"
sha256 = "{hashlib.sha256(token.encode()).hexdigest()}"
{'prefixes = ["team-a"]' if name != "ops" else ""}
''' for name, token in tokens.items())
    path = tmp_path / "tokens.toml"
    path.write_text(entries)
    mesh = await InProcessMesh(memory_url(), extra={"auth": {"tokens_file": str(path)}}).start(runtimes=1)

    def auth(name: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {tokens[name]}"),)

    try:
        m = make_model("sklearn", tmp_path, seed=4)
        await mesh.mesh.registerModel(mm.RegisterModelRequest(
            modelId="team-a/m", modelInfo=mm.ModelInfo(type="sklearn", path=str(m.path))), metadata=auth("a1"))
        await mesh.mesh.setVModel(mm.SetVModelRequest(vModelId="team-a/v", targetModelId="team-a/m", owner="app"),
                                  metadata=auth("a1"), timeout=10)
        # Same prefixes, same owner string, another token: refused.
        assert await _code(mesh.mesh.deleteVModel(mm.DeleteVModelRequest(vModelId="team-a/v", owner="app"),
                                                  metadata=auth("a2"), timeout=10)) == grpc.StatusCode.PERMISSION_DENIED
        # An operator's token (no prefixes) may.
        assert await _code(mesh.mesh.deleteVModel(mm.DeleteVModelRequest(vModelId="team-a/v", owner="app"),
                                                  metadata=auth("ops"), timeout=10)) == grpc.StatusCode.OK
    finally:
        await mesh.stop()


async def test_a_referenced_model_cannot_be_unregistered_whatever_a_router_sees(
        etcd: EtcdProcess, tmp_path: Path) -> None:
    """Router B writes a vModel; router A, whose view may not have it yet, is asked at once to
    unregister its target: refused, in the delete's own transaction. And a vModel written straight
    into the registry without refs (as before the index) gets them when a router starts."""
    mesh = await InProcessMesh(etcd.url).start(runtimes=1)
    second = await start(serve_router, mesh.settings())
    channel_b = grpc.aio.insecure_channel(second.endpoint)
    store, prefix = open_store(etcd.url)
    try:
        m = make_model("sklearn", tmp_path, seed=5)
        await mesh.register("target", "sklearn", str(m.path))
        b = mm_grpc.ModelMeshStub(channel_b)
        for i in range(5):
            await b.setVModel(mm.SetVModelRequest(vModelId=f"race-{i}", targetModelId="target"), timeout=10)
            assert await _code(mesh.mesh.unregisterModel(mm.UnregisterModelRequest(modelId="target"),
                                                         timeout=10)) == grpc.StatusCode.FAILED_PRECONDITION
            await b.deleteVModel(mm.DeleteVModelRequest(vModelId=f"race-{i}"), timeout=10)

        registry = Registry(store, prefix)
        legacy = VModelRecord(vmodel_id="legacy", active_model_id="target", target_model_id="target")
        await store.put(registry.keys.vmodel("legacy"), legacy.to_json())  # no refs: an old router wrote it
        third = await start(serve_router, mesh.settings())  # a starting router repairs the index
        try:
            assert await registry.referrers("target") == ["legacy"]
            assert await _code(mesh.mesh.unregisterModel(mm.UnregisterModelRequest(modelId="target"),
                                                         timeout=10)) == grpc.StatusCode.FAILED_PRECONDITION
        finally:
            await third.stop()
    finally:
        await channel_b.close()
        await second.stop()
        await store.close()
        await mesh.stop()
