"""Bulk registration (``registerModels``) against a real router and a real etcd on 127.0.0.1.

Per-item results for a mix of valid, invalid, conflicting and unauthorized items; all-or-nothing;
a call over the bound refused before any write; quotas enforced in bulk as one by one; the pin
index written with the registration; a graph's ID refused; the same results from the memory
registry (both stores implement ``create_many``).
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from mesh.gen.mmesh import model_mesh_pb2 as mm
from mesh.registry import open_store
from mesh.registry.etcd_server import EtcdProcess
from mesh.registry.keys import Keys
from mesh.router.bulk import MAX_ITEMS
from tests.support.inprocess import InProcessMesh, memory_url

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

TENANT = "team-a-token-0123456789"
BIG_KEY = '{"note": "' + "x" * 15_000 + '"}'  # 15 kB: 200 of them are over etcd's 1.5 MiB request limit
ADMIN = "admin-token-0123456789"


def item(model_id: str, path: str = "/m/model.joblib", **info: object) -> mm.RegisterModelsItem:
    return mm.RegisterModelsItem(modelId=model_id, modelInfo=mm.ModelInfo(type=info.pop("type", "sklearn"),  # type: ignore[arg-type]
                                                                         path=path, **info))  # type: ignore[arg-type]


def auth(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture
async def mesh(etcd: EtcdProcess) -> AsyncIterator[InProcessMesh]:
    m = await InProcessMesh(etcd.url).start(runtimes=1)
    try:
        yield m
    finally:
        await m.stop()


async def _in_etcd(url: str, model_ids: list[str]) -> dict[str, bytes | None]:
    store, prefix = open_store(url)
    keys = Keys(prefix)
    try:
        found = await store.get_many([keys.model(m) for m in model_ids])
        return {m: (kv.value if kv else None) for m, kv in zip(model_ids, found, strict=True)}
    finally:
        await store.close()


def codes(response: mm.RegisterModelsResponse) -> list[str]:
    return [r.code for r in response.results]


async def test_each_item_gets_its_own_result_and_only_valid_items_are_written(
        mesh: InProcessMesh, etcd: EtcdProcess) -> None:
    await mesh.register("taken", "sklearn", "/m/other.joblib")
    await mesh.register("same", "sklearn", "/m/model.joblib")
    items = [item(f"bulk-{i}") for i in range(300)]  # more than one etcd transaction (128 items)
    items += [item("same"), item("taken"), item(""), item("bad-type", type=""), item("bulk-3"),
              item("nul\x00id"), item("too-many", minCopies=3, maxCopies=1), item("pinned", minCopies=2)]
    response = await mesh.mesh.registerModels(mm.RegisterModelsRequest(items=items), timeout=30)
    results = response.results
    assert [r.index for r in results] == list(range(len(items)))
    assert codes(response)[:300] == ["OK"] * 300 and all(r.created for r in results[:300])
    by_id = {r.modelId: r for r in results[300:]}
    assert by_id["same"].code == "OK" and not by_id["same"].created
    assert by_id["taken"].code == "ALREADY_EXISTS" and "different definition" in by_id["taken"].message
    assert results[302].code == "INVALID_ARGUMENT" and "no model ID" in results[302].message
    assert by_id["bad-type"].code == "INVALID_ARGUMENT" and "type is required" in by_id["bad-type"].message
    assert results[304].code == "INVALID_ARGUMENT" and "also item 3" in results[304].message
    assert by_id["nul\x00id"].code == "INVALID_ARGUMENT"
    assert by_id["too-many"].code == "INVALID_ARGUMENT" and "above maxCopies" in by_id["too-many"].message
    assert by_id["pinned"].code == "OK" and by_id["pinned"].created

    stored = await _in_etcd(etcd.url, [f"bulk-{i}" for i in range(300)] + ["bad-type", "too-many", "taken"])
    assert all(stored[f"bulk-{i}"] for i in range(300))
    assert stored["bad-type"] is None and stored["too-many"] is None
    assert b"other.joblib" in (stored["taken"] or b"")  # the conflicting item did not overwrite it
    status = await mesh.mesh.getModelStatus(mm.GetStatusRequest(modelId="bulk-299"), timeout=10)
    assert status.status == mm.ModelStatusInfo.NOT_LOADED
    # The pin index is written with the registration (the runtimes keep pinned models loaded).
    store, prefix = open_store(etcd.url)
    try:
        pin = await store.get(Keys(prefix).pin("pinned"))
        assert pin is not None and pin.value == b"2"
    finally:
        await store.close()

    # The same batch again: every valid item is there already, with the same definition: OK, not created.
    again = await mesh.mesh.registerModels(mm.RegisterModelsRequest(items=items[:300]), timeout=30)
    assert codes(again) == ["OK"] * 300 and not any(r.created for r in again.results)


async def test_all_or_nothing_writes_none_when_one_item_fails(mesh: InProcessMesh, etcd: EtcdProcess) -> None:
    await mesh.register("taken", "sklearn", "/m/other.joblib")
    items = [item(f"aon-{i}") for i in range(200)] + [item("taken")]
    response = await mesh.mesh.registerModels(mm.RegisterModelsRequest(items=items, allOrNothing=True), timeout=30)
    assert codes(response)[:200] == ["ABORTED"] * 200
    assert response.results[200].code == "ALREADY_EXISTS"
    assert "item 200" in response.results[0].message
    assert not any(r.created for r in response.results)
    stored = await _in_etcd(etcd.url, [f"aon-{i}" for i in range(200)])
    assert not any(stored.values())  # written, then undone: none stays

    invalid = [item("aon-ok"), item("aon-bad", type="")]
    response = await mesh.mesh.registerModels(mm.RegisterModelsRequest(items=invalid, allOrNothing=True), timeout=10)
    assert codes(response) == ["ABORTED", "INVALID_ARGUMENT"]
    assert (await _in_etcd(etcd.url, ["aon-ok"]))["aon-ok"] is None

    fine = [item(f"aon-{i}") for i in range(10)]
    response = await mesh.mesh.registerModels(mm.RegisterModelsRequest(items=fine, allOrNothing=True), timeout=10)
    assert codes(response) == ["OK"] * 10


async def test_a_call_over_the_bound_is_refused_before_any_write(mesh: InProcessMesh, etcd: EtcdProcess) -> None:
    items = [item(f"over-{i}") for i in range(MAX_ITEMS + 1)]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.mesh.registerModels(mm.RegisterModelsRequest(items=items), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "limit is 1,000" in (err.value.details() or "")
    big = [item(f"big-{i}", key=BIG_KEY) for i in range(300)]  # 4.5 MB: over the byte bound
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.mesh.registerModels(mm.RegisterModelsRequest(items=big), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "bytes" in (err.value.details() or "")
    stored = await _in_etcd(etcd.url, ["over-0", f"over-{MAX_ITEMS}", "big-0"])
    assert not any(stored.values())
    # Under the byte bound but large items: grouped by size too (etcd refuses requests over 1.5 MiB).
    large = [item(f"large-{i}", key=BIG_KEY) for i in range(200)]
    response = await mesh.mesh.registerModels(mm.RegisterModelsRequest(items=large), timeout=30)
    assert codes(response) == ["OK"] * 200, response.results[0].message


async def test_a_graph_id_is_refused_like_one_by_one(mesh: InProcessMesh) -> None:
    from mesh.gen.mmesh import graphs_pb2 as gp
    from mesh.gen.mmesh import graphs_pb2_grpc as gp_grpc

    await mesh.register("g-model", "sklearn", "/m/model.joblib")
    spec = '{"nodes":{"root":{"routerType":"Sequence","steps":[{"serviceName":"g-model"}]}}}'
    assert mesh.channel is not None
    await gp_grpc.ModelMeshGraphsStub(mesh.channel).setGraph(gp.SetGraphRequest(graphId="a-graph", specJson=spec),
                                                            timeout=10)
    response = await mesh.mesh.registerModels(mm.RegisterModelsRequest(items=[item("a-graph"), item("g-2")]),
                                              timeout=10)
    assert codes(response) == ["ALREADY_EXISTS", "OK"]
    assert "inference graph" in response.results[0].message


@pytest.fixture
def tokens(tmp_path: Path) -> Path:
    roots = tmp_path / "models"
    (roots / "team-a").mkdir(parents=True)
    path = tmp_path / "tokens.toml"
    path.write_text(f'''
[[token]]
name = "team-a"
role = "write"
sha256 = "{hashlib.sha256(TENANT.encode()).hexdigest()}"
prefixes = ["team-a"]
paths = ["{roots}/team-a"]
max_models = 5
max_pinned_copies = 3

[[token]]
name = "admin"
role = "write"
token = "{ADMIN}"

[[token]]
name = "reader"
role = "read"
token = "reader-token-0123456789"
''')
    return path


async def test_items_are_authorized_one_by_one_and_quotas_hold_in_bulk(
        etcd: EtcdProcess, tokens: Path) -> None:
    roots = tokens.parent / "models"
    mesh = await InProcessMesh(etcd.url, runtime_overrides={"model_roots": (str(roots),)},
                               extra={"auth": {"tokens_file": str(tokens)}}).start(runtimes=1)
    try:
        ok_path = "team-a/m.joblib"
        # A read token may not call it at all.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await mesh.mesh.registerModels(mm.RegisterModelsRequest(items=[item("team-a/r", ok_path)]),
                                           metadata=auth("reader-token-0123456789"), timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        await mesh.mesh.registerModel(mm.RegisterModelRequest(modelId="team-a/0", modelInfo=mm.ModelInfo(
            type="sklearn", path=ok_path)), metadata=auth(TENANT), timeout=10)
        items = [item("team-a/1", ok_path), item("team-b/1", ok_path),  # outside the token's prefixes
                 item("team-a/2", "team-b/m.joblib"),  # outside its paths
                 item("team-a/3", "s3://bucket/m"),  # object storage: the token has no storage keys
                 item("team-a/4", ok_path, minCopies=2), item("team-a/5", ok_path, minCopies=2),  # pins: 2 + 2 > 3
                 item("team-a/6", ok_path), item("team-a/7", ok_path), item("team-a/8", ok_path),
                 item("team-a/0", ok_path)]  # already there, same definition: free
        response = await mesh.mesh.registerModels(mm.RegisterModelsRequest(items=items), metadata=auth(TENANT),
                                                  timeout=10)
        got = {r.modelId: (r.code, r.message) for r in response.results}
        assert got["team-a/1"][0] == "OK"
        assert got["team-b/1"][0] == "PERMISSION_DENIED" and "prefixes" in got["team-b/1"][1]
        assert got["team-a/2"][0] == "PERMISSION_DENIED" and "outside its paths" in got["team-a/2"][1]
        assert got["team-a/3"][0] == "PERMISSION_DENIED" and "storage" in got["team-a/3"][1]
        assert got["team-a/4"][0] == "OK"
        assert got["team-a/5"][0] == "RESOURCE_EXHAUSTED" and "at most 3 copies" in got["team-a/5"][1]
        # max_models 5: team-a/0 (before), 1, 4, 6, 7 -> the 8th is over.
        assert got["team-a/6"][0] == "OK" and got["team-a/7"][0] == "OK"
        assert got["team-a/8"][0] == "RESOURCE_EXHAUSTED" and "at most 5 models" in got["team-a/8"][1]
        assert got["team-a/0"] == ("OK", "")
        stored = await _in_etcd(etcd.url, ["team-b/1", "team-a/2", "team-a/3", "team-a/5", "team-a/8"])
        assert not any(stored.values())  # refused items are never written
        # The same through registerModel, one by one: the quota is where bulk left it.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await mesh.mesh.registerModel(mm.RegisterModelRequest(modelId="team-a/9", modelInfo=mm.ModelInfo(
                type="sklearn", path=ok_path)), metadata=auth(TENANT), timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # The operator's token has no quota and no prefixes.
        response = await mesh.mesh.registerModels(mm.RegisterModelsRequest(items=[item("team-b/1", ok_path)]),
                                                  metadata=auth(ADMIN), timeout=10)
        assert codes(response) == ["OK"]
    finally:
        await mesh.stop()


async def test_the_memory_registry_gives_the_same_results() -> None:
    mesh = await InProcessMesh(memory_url()).start(runtimes=1)
    try:
        await mesh.register("taken", "sklearn", "/m/other.joblib")
        items = [item(f"mem-{i}") for i in range(150)] + [item("taken"), item("mem-1"), item("x", type="")]
        response = await mesh.mesh.registerModels(mm.RegisterModelsRequest(items=items), timeout=10)
        assert codes(response) == ["OK"] * 150 + ["ALREADY_EXISTS", "INVALID_ARGUMENT", "INVALID_ARGUMENT"]
        again = await mesh.mesh.registerModels(mm.RegisterModelsRequest(items=items[:150]), timeout=10)
        assert codes(again) == ["OK"] * 150 and not any(r.created for r in again.results)
    finally:
        await mesh.stop()


async def test_vmodel_items_set_the_vmodel_as_setvmodel_does(mesh: InProcessMesh) -> None:
    items = [mm.RegisterModelsItem(modelId=f"vm-model-{i}", vModelId=f"vm-{i}", owner="ctl",
                                   autoDeleteTargetModel=True,
                                   modelInfo=mm.ModelInfo(type="sklearn", path="/m/model.joblib")) for i in range(5)]
    response = await mesh.mesh.registerModels(mm.RegisterModelsRequest(items=items), timeout=30)
    assert codes(response) == ["OK"] * 5
    assert response.results[0].vModelStatus.activeModelId == "vm-model-0"
    # Another owner's vModel: refused for that item, as setVModel would.
    clash = [mm.RegisterModelsItem(modelId="vm-model-x", vModelId="vm-0", owner="someone-else",
                                   modelInfo=mm.ModelInfo(type="sklearn", path="/m/model.joblib"))]
    response = await mesh.mesh.registerModels(mm.RegisterModelsRequest(items=clash), timeout=10)
    assert codes(response) == ["ALREADY_EXISTS"] and "owned by" in response.results[0].message
    # The vModel owns the model it created: deleting the vModel deletes it.
    await mesh.mesh.deleteVModel(mm.DeleteVModelRequest(vModelId="vm-1", owner="ctl"), timeout=10)
    status = await mesh.mesh.getModelStatus(mm.GetStatusRequest(modelId="vm-model-1"), timeout=10)
    assert status.status == mm.ModelStatusInfo.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.mesh.registerModels(mm.RegisterModelsRequest(items=items, allOrNothing=True), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("backend", ["etcd", "memory"])
async def test_a_resent_group_finds_its_own_writes_and_counts_them_created(etcd: EtcdProcess, backend: str) -> None:
    """What the etcd store does when a group's answer was lost: it sends the same creates again. The
    items the first send wrote are found with this call's own bytes: created, once, not conflicts."""
    from mesh.registry.records import ModelSpec
    from mesh.registry.registry import Registry

    store, prefix = open_store(etcd.url if backend == "etcd" else memory_url())
    registry = Registry(store, prefix)
    try:
        specs = [ModelSpec(model_id=f"resend-{i}", type="sklearn", path="/m/x", registered_ms=1, min_copies=i % 2)
                 for i in range(300)]
        first = await registry.register_models(specs)
        second = await registry.register_models(specs)  # the same bytes: a re-sent group
        assert all(r.created and r.error is None for r in first + second)
        later = [ModelSpec(model_id=s.model_id, type="sklearn", path="/m/x", registered_ms=2, min_copies=s.min_copies)
                 for s in specs]
        third = await registry.register_models(later)  # another call, same definition: not created
        assert not any(r.created for r in third) and all(r.error is None for r in third)
        kvs = await store.get_many([registry.keys.model(s.model_id) for s in specs])
        assert all(kv is not None and kv.mod_revision == kv.create_revision for kv in kvs)
        assert await registry.pinned_models() == {s.model_id: 1 for s in specs if s.min_copies}
    finally:
        await store.close()


async def test_a_full_etcd_answers_resource_exhausted_per_item(tmp_path: Path) -> None:
    """etcd at its space quota (16 MiB): the call succeeds, its items answer RESOURCE_EXHAUSTED with
    the cause (RegistryFull), as registerModel would, and the controller's retry rule recognises it."""
    from mesh.errors import RegistryFull

    server = EtcdProcess(tmp_path / "etcd", quota_bytes=16 * 2**20)
    server.start()
    mesh = await InProcessMesh(server.url).start(runtimes=0)
    try:
        codes_seen: set[str] = set()
        message = ""
        for n in range(40):  # 250 items of 15 kB a call: the quota is passed within a few calls
            items = [item(f"full-{n:02d}-{i:03d}", key=BIG_KEY) for i in range(250)]
            response = await mesh.mesh.registerModels(mm.RegisterModelsRequest(items=items), timeout=60)
            codes_seen |= set(codes(response))
            refused = [r for r in response.results if r.code == "RESOURCE_EXHAUSTED"]
            if refused:
                message = refused[0].message
                break
        assert message.startswith(RegistryFull.CAUSE), (codes_seen, message)
        assert codes_seen <= {"OK", "RESOURCE_EXHAUSTED"}
    finally:
        await mesh.stop()
        server.stop()


async def test_all_or_nothing_undoes_an_item_whose_write_went_unanswered(monkeypatch: pytest.MonkeyPatch) -> None:
    """The review's case: etcd applied a group but the answer for one item was lost (UNAVAILABLE,
    "may have been written"); an all-or-nothing call must not leave that item behind. A memory
    registry stands in for the lost answer (the store writes, then reports the last item unanswered)."""
    from mesh.errors import RegistryUnavailable
    from mesh.registry.base import Created
    from mesh.registry.memory import MemoryStore

    real = MemoryStore.create_many

    async def lossy(self: MemoryStore, items: list) -> list[Created]:  # type: ignore[type-arg]
        answers = await real(self, items)
        if len(items) > 1:
            answers[-1] = Created(False, error=RegistryUnavailable("registry unavailable: answer lost (test)"))
        return answers

    mesh = await InProcessMesh(memory_url()).start(runtimes=1)
    try:
        monkeypatch.setattr(MemoryStore, "create_many", lossy)
        response = await mesh.mesh.registerModels(mm.RegisterModelsRequest(
            items=[item("aon-0"), item("aon-1"), item("aon-2")], allOrNothing=True), timeout=10)
        assert codes(response)[-1] == "UNAVAILABLE" and not any(r.created for r in response.results)
        monkeypatch.setattr(MemoryStore, "create_many", real)
        listed = await mesh.mesh.listModels(mm.ListModelsRequest(prefix="aon-"), timeout=10)
        assert [m.modelId for m in listed.models] == []  # the unanswered one was written, then undone
    finally:
        await mesh.stop()
