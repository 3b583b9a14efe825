"""vModel traffic splits (canaries), end to end: a real router and runtime in one process over a
memory:// registry, two small sklearn models trained by the test, inference over gRPC and REST.

- Shares: over N requests without a sticky header, the canary's share is within 4 sigma of its
  weight (binomial: N p, sqrt(N p (1-p))). The runtime names the model that answered
  (``model_name`` of a response to a request that named none), so the shares are observed where
  the work was done, and the router's ``mesh_vmodel_requests_total`` must agree with them.
- Stickiness: one header value always reaches the same model, over gRPC and REST alike; many
  values reach both models, in proportion to the weights (4 sigma again).
- Promote switches to the canary once it is loaded and clears the split; a plain setVModel clears
  a split too; a canary that fails to load gets no traffic (its share goes to the stable model).
- Split targets are referrers (the registry refuses to unregister them), and auto-delete still
  takes only what the vModel created, once nothing refers to it.
- Bad input is refused with the place named; owner and token rules are setVModel's.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import aiohttp
import grpc
import pytest

from mesh.gen.mmesh import model_mesh_pb2 as mm
from mesh.registry.etcd_server import EtcdProcess
from mesh.router.split import bucket
from mesh.tensors import encode_request
from tests.integration.test_metrics import Samples, free_port, scrape
from tests.support.inprocess import InProcessMesh, memory_url
from tests.support.models import ModelArtifact, make_model

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
VS = mm.VModelStatusInfo
ST = mm.ModelStatusInfo


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelArtifact, ModelArtifact]:
    directory = tmp_path_factory.mktemp("models")
    return make_model("sklearn", directory, seed=0), make_model("sklearn", directory, seed=3)  # both iris


@pytest.fixture
async def mesh() -> AsyncIterator[tuple[InProcessMesh, int]]:
    port = free_port()
    # per_model_metrics: mesh_vmodel_requests_total is a per-model label (opt-in, docs/metrics.md)
    m = await InProcessMesh(memory_url(), router_overrides={"metrics_port": port, "per_model_metrics": True}
                            ).start(runtimes=1)
    try:
        yield m, port
    finally:
        await m.stop()


def split(vmodel_id: str, *targets: tuple[str, int], sticky: str = "", owner: str = "",
          sync: bool = True) -> mm.SetVModelSplitRequest:
    return mm.SetVModelSplitRequest(vModelId=vmodel_id, owner=owner, stickyHeader=sticky, sync=sync,
                                    targets=[mm.SplitTarget(modelId=m, weight=w) for m, w in targets])


async def served_by(mesh: InProcessMesh, model: ModelArtifact, vmodel_id: str,
                    headers: tuple[tuple[str, str], ...] = ()) -> str:
    """The model that answered one request to the vModel (the runtime names it)."""
    request = encode_request(model_name="", inputs={"input-0": model.sample})
    response = await mesh.v2.ModelInfer(request, metadata=(("mm-vmodel-id", vmodel_id), *headers), timeout=30)
    return response.model_name


async def code_of(call) -> tuple[grpc.StatusCode, str]:  # type: ignore[no-untyped-def]
    try:
        await call
    except grpc.aio.AioRpcError as err:
        return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


def within_4_sigma(observed: int, n: int, p: float) -> bool:
    return abs(observed - n * p) <= 4 * math.sqrt(n * p * (1 - p))


async def stable_vmodel(mesh: InProcessMesh, models: tuple[ModelArtifact, ModelArtifact]) -> None:
    stable, canary = models
    await mesh.register("stable", "sklearn", str(stable.path))
    await mesh.register("canary", "sklearn", str(canary.path))
    await mesh.mesh.setVModel(mm.SetVModelRequest(vModelId="v", targetModelId="stable", loadNow=True, sync=True),
                              timeout=30)


async def test_shares_follow_the_weights_and_promote_switches(
        mesh: tuple[InProcessMesh, int], models: tuple[ModelArtifact, ModelArtifact]) -> None:
    m, port = mesh
    await stable_vmodel(m, models)
    status = await m.mesh.setVModelSplit(split("v", ("stable", 90), ("canary", 10)), timeout=60)
    assert status.status == VS.DEFINED and status.activeModelId == "stable"
    assert [(t.modelId, t.weight, t.modelStatus.status, t.receivingTraffic) for t in status.splitTargets] == [
        ("stable", 90, ST.LOADED, True), ("canary", 10, ST.LOADED, True)]

    n = 600
    seen = Counter([await served_by(m, models[0], "v") for _ in range(n)])
    assert set(seen) == {"stable", "canary"}
    assert within_4_sigma(seen["canary"], n, 0.10), seen
    # The router's own count agrees with what the runtime served.
    samples: Samples = await scrape(port)
    assert samples("mesh_vmodel_requests_total", vmodel_id="v", model_id="canary") == seen["canary"]
    assert samples("mesh_vmodel_requests_total", vmodel_id="v", model_id="stable") == seen["stable"]
    # A split target is a referrer: it cannot be unregistered.
    assert (await code_of(m.mesh.unregisterModel(mm.UnregisterModelRequest(modelId="canary"), timeout=10)))[0] \
        == grpc.StatusCode.FAILED_PRECONDITION

    # Promote (the canary by default: the target that is not the active model). It is loaded, so
    # the switch is immediate; the split is gone, every request goes to the canary.
    status = await m.mesh.promoteVModel(mm.PromoteVModelRequest(vModelId="v", sync=True), timeout=60)
    assert (status.status, status.activeModelId, status.targetModelId) == (VS.DEFINED, "canary", "canary")
    assert not status.splitTargets and not status.stickyHeader
    assert {await served_by(m, models[0], "v") for _ in range(50)} == {"canary"}
    samples = await scrape(port)
    assert not samples.has("mesh_vmodel_requests_total", vmodel_id="v", model_id="stable")  # series gone
    # Nothing refers to the old stable model now: it may be unregistered.
    await m.mesh.unregisterModel(mm.UnregisterModelRequest(modelId="stable"), timeout=10)


async def test_a_sticky_header_keeps_a_user_on_one_model_over_grpc_and_rest(
        mesh: tuple[InProcessMesh, int], models: tuple[ModelArtifact, ModelArtifact]) -> None:
    m, port = mesh
    await stable_vmodel(m, models)
    status = await m.mesh.setVModelSplit(split("v", ("stable", 90), ("canary", 10), sticky="X-User"), timeout=60)
    assert status.stickyHeader == "x-user"

    # One user: always the same model, whatever the number of requests.
    for user in ("alice", "bob", "carol"):
        assert len({await served_by(m, models[0], "v", (("x-user", user),)) for _ in range(15)}) == 1
    # Many users: both models, in proportion to the weights.
    users = [f"user-{i}" for i in range(500)]
    chosen = {u: await served_by(m, models[0], "v", (("x-user", u),)) for u in users}
    on_canary = sum(1 for c in chosen.values() if c == "canary")
    assert 0 < on_canary < len(users) and within_4_sigma(on_canary, len(users), 0.10), on_canary
    # Without the header a request is drawn at random (both models still reachable).
    assert {await served_by(m, models[0], "v") for _ in range(120)} == {"stable", "canary"}

    # REST, a path naming the vModel: the same user reaches the same model as over gRPC. The
    # router's per-target count says which model each request went to.
    body = {"inputs": [{"name": "input-0", "shape": list(models[0].sample.shape), "datatype": "FP32",
                        "data": models[0].sample.flatten().tolist()}]}
    async with aiohttp.ClientSession() as session:
        for user in users[:20]:
            before = await scrape(port)
            async with session.post(f"{m.rest_url}/v2/models/v/infer", json=body, headers={"X-User": user}) as r:
                assert r.status == 200, await r.text()
            after = await scrape(port)
            went = [t for t in ("stable", "canary")
                    if after("mesh_vmodel_requests_total", vmodel_id="v", model_id=t)
                    > before("mesh_vmodel_requests_total", vmodel_id="v", model_id=t)]
            assert went == [chosen[user]], (user, went)

    # A plain setVModel (ModelMesh's call) clears the split.
    status = await m.mesh.setVModel(mm.SetVModelRequest(vModelId="v", targetModelId="stable"), timeout=30)
    assert not status.splitTargets and status.activeModelId == "stable"
    assert {await served_by(m, models[0], "v") for _ in range(40)} == {"stable"}


async def test_a_failed_canary_gets_no_traffic(
        mesh: tuple[InProcessMesh, int], models: tuple[ModelArtifact, ModelArtifact],
        tmp_path: Path) -> None:
    m, _ = mesh
    await stable_vmodel(m, models)
    corrupt = tmp_path / "corrupt.joblib"
    corrupt.write_bytes(b"this is not a pickle")
    await m.register("broken", "sklearn", str(corrupt))
    await m.mesh.setVModelSplit(split("v", ("stable", 50), ("broken", 50), sync=False), timeout=30)

    async def judged_failed() -> bool:
        s = await m.mesh.getVModelStatus(mm.GetVModelStatusRequest(vModelId="v"), timeout=10)
        return [t.receivingTraffic for t in s.splitTargets] == [True, False]

    await m.wait_for(judged_failed, timeout=30)
    status = await m.mesh.getVModelStatus(mm.GetVModelStatusRequest(vModelId="v"), timeout=10)
    assert status.splitTargets[1].modelStatus.status == ST.LOADING_FAILED
    assert "corrupt.joblib" in status.splitTargets[1].modelStatus.errors[0]
    # Its share goes to the stable (active) model: every request succeeds there.
    assert {await served_by(m, models[0], "v") for _ in range(60)} == {"stable"}
    # The vModel's owner can promote the stable model back (clearing the split).
    status = await m.mesh.promoteVModel(mm.PromoteVModelRequest(vModelId="v", modelId="stable"), timeout=30)
    assert status.activeModelId == "stable" and not status.splitTargets


async def test_promote_waits_for_the_load_and_auto_delete_still_holds(
        mesh: tuple[InProcessMesh, int], models: tuple[ModelArtifact, ModelArtifact]) -> None:
    m, _ = mesh
    stable, canary = models
    # The vModel creates its stable model itself (auto-delete): it goes once nothing refers to it.
    await m.mesh.setVModel(mm.SetVModelRequest(
        vModelId="v", targetModelId="v-1", autoDeleteTargetModel=True, loadNow=True, sync=True,
        modelInfo=mm.ModelInfo(type="sklearn", path=str(stable.path))), timeout=30)
    await m.register("v-2", "sklearn", str(canary.path))
    await m.mesh.setVModelSplit(split("v", ("v-1", 80), ("v-2", 20), sync=False), timeout=30)
    status = await m.mesh.promoteVModel(mm.PromoteVModelRequest(vModelId="v", sync=True), timeout=60)
    assert (status.activeModelId, status.targetModelId, status.status) == ("v-2", "v-2", VS.DEFINED)
    assert not status.splitTargets
    assert {await served_by(m, stable, "v") for _ in range(20)} == {"v-2"}

    async def v1_gone() -> bool:
        s = await m.mesh.getModelStatus(mm.GetStatusRequest(modelId="v-1"), timeout=10)
        return s.status == ST.NOT_FOUND

    await m.wait_for(v1_gone, timeout=10)  # created by the vModel, referred to by nothing: deleted
    s = await m.mesh.getModelStatus(mm.GetStatusRequest(modelId="v-2"), timeout=10)
    assert s.status != ST.NOT_FOUND  # registered by someone else: never auto-deleted


async def test_bad_input_is_refused_with_the_place_named(
        mesh: tuple[InProcessMesh, int], models: tuple[ModelArtifact, ModelArtifact]) -> None:
    m, _ = mesh
    await stable_vmodel(m, models)
    bad = grpc.StatusCode.INVALID_ARGUMENT
    nine = [(f"m{i}", 10) for i in range(9)]
    cases = [
        (split("v", ("stable", 90), ("canary", 20)), bad, "sum to 110"),
        (split("v", ("stable", 90)), bad, "sum to 90"),
        (split("v", ("stable", 101)), bad, "targets[0] 'stable' has weight 101"),
        (split("v", ("stable", 50), ("stable", 50)), bad, "targets[1] 'stable' is named twice"),
        (split("v", *nine), bad, "at most 8 targets"),
        (split("v"), bad, "at least one target"),
        (split("v", ("stable", 90), ("", 10)), bad, "targets[1]"),
        (split("v", ("stable", 90), ("canary", 10), sticky="bad header!"), bad, "stickyHeader"),
        (split("v", ("stable", 90), ("canary", 10), sticky="mm-vmodel-id"), bad, "stickyHeader"),
        (split("v", ("stable", 90), ("ghost", 10)), grpc.StatusCode.NOT_FOUND, "targets[1]: model 'ghost'"),
        (split("nope", ("stable", 90), ("canary", 10)), grpc.StatusCode.NOT_FOUND, "'nope'"),
        (split("v", ("stable", 90), ("canary", 10), owner="team-b"), grpc.StatusCode.ALREADY_EXISTS,
         "without an owner"),
    ]
    for request, code, message in cases:
        got, details = await code_of(m.mesh.setVModelSplit(request, timeout=10))
        assert (got, message in details) == (code, True), (request, got, details)
    # Nothing was changed by the refused calls.
    status = await m.mesh.getVModelStatus(mm.GetVModelStatusRequest(vModelId="v"), timeout=10)
    assert not status.splitTargets

    got, details = await code_of(m.mesh.promoteVModel(mm.PromoteVModelRequest(vModelId="v"), timeout=10))
    assert got == grpc.StatusCode.FAILED_PRECONDITION and "no traffic split" in details
    await m.register("third", "sklearn", str(models[1].path))
    await m.mesh.setVModelSplit(split("v", ("stable", 80), ("canary", 10), ("third", 10), sync=False), timeout=30)
    got, details = await code_of(m.mesh.promoteVModel(mm.PromoteVModelRequest(vModelId="v"), timeout=10))
    assert got == bad and "name the one to promote" in details
    got, details = await code_of(m.mesh.promoteVModel(
        mm.PromoteVModelRequest(vModelId="v", modelId="elsewhere"), timeout=10))
    assert got == bad and "not a target" in details


async def test_owner_and_token_rules_are_set_vmodels(models: tuple[ModelArtifact, ModelArtifact],
                                                     tmp_path: Path) -> None:
    tokens = {"a1": "team-a-one-0123456789", "a2": "team-a-two-0123456789"}
    path = tmp_path / "tokens.toml"
    path.write_text("".join(f'''
[[token]]
name = "{name}"
role = "write"
sha256 = "{hashlib.sha256(token.encode()).hexdigest()}"
prefixes = ["team-a"]
''' for name, token in tokens.items()) + '''
[[token]]
name = "ops"
role = "write"
sha256 = "''' + hashlib.sha256(b"operator-0123456789xx").hexdigest() + '"\n')
    m = await InProcessMesh(memory_url(), extra={"auth": {"tokens_file": str(path)}}).start(runtimes=1)

    def auth(name: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {tokens.get(name, 'operator-0123456789xx')}"),)

    try:
        for model_id, artifact in (("team-a/s", models[0]), ("team-a/c", models[1]), ("team-b/x", models[1])):
            await m.mesh.registerModel(mm.RegisterModelRequest(
                modelId=model_id, modelInfo=mm.ModelInfo(type="sklearn", path=str(artifact.path))),
                metadata=auth("ops" if model_id.startswith("team-b") else "a1"), timeout=10)
        await m.mesh.setVModel(mm.SetVModelRequest(vModelId="team-a/v", targetModelId="team-a/s", owner="app"),
                               metadata=auth("a1"), timeout=10)
        # A target outside the caller's prefixes.
        got, details = await code_of(m.mesh.setVModelSplit(
            split("team-a/v", ("team-a/s", 90), ("team-b/x", 10), owner="app", sync=False),
            metadata=auth("a1"), timeout=10))
        assert got == grpc.StatusCode.PERMISSION_DENIED and "team-b/x" in details
        # Another token of the same team: not the vModel's creator.
        got, _ = await code_of(m.mesh.setVModelSplit(
            split("team-a/v", ("team-a/s", 90), ("team-a/c", 10), owner="app", sync=False),
            metadata=auth("a2"), timeout=10))
        assert got == grpc.StatusCode.PERMISSION_DENIED
        # No owner named: refused as setVModel refuses it.
        got, _ = await code_of(m.mesh.setVModelSplit(
            split("team-a/v", ("team-a/s", 90), ("team-a/c", 10), sync=False), metadata=auth("a1"), timeout=10))
        assert got == grpc.StatusCode.ALREADY_EXISTS
        status = await m.mesh.setVModelSplit(
            split("team-a/v", ("team-a/s", 90), ("team-a/c", 10), owner="app", sync=False),
            metadata=auth("a1"), timeout=10)
        assert [t.modelId for t in status.splitTargets] == ["team-a/s", "team-a/c"]
        got, _ = await code_of(m.mesh.promoteVModel(
            mm.PromoteVModelRequest(vModelId="team-a/v", owner="app"), metadata=auth("a2"), timeout=10))
        assert got == grpc.StatusCode.PERMISSION_DENIED
        status = await m.mesh.promoteVModel(mm.PromoteVModelRequest(vModelId="team-a/v", owner="app"),
                                            metadata=auth("a1"), timeout=30)
        assert status.targetModelId == "team-a/c" and not status.splitTargets
    finally:
        await m.stop()


async def test_weights_of_100_and_0(
        mesh: tuple[InProcessMesh, int], models: tuple[ModelArtifact, ModelArtifact]) -> None:
    """One target at 100 takes all the traffic, the stable model still the active one (it takes
    over if the canary fails); a target at 0 is loaded but gets nothing (a pinned canary)."""
    m, _ = mesh
    await stable_vmodel(m, models)
    await m.mesh.setVModelSplit(split("v", ("canary", 100)), timeout=60)
    assert {await served_by(m, models[0], "v") for _ in range(30)} == {"canary"}
    status = await m.mesh.setVModelSplit(split("v", ("stable", 100), ("canary", 0)), timeout=60)
    assert [(t.modelId, t.modelStatus.status) for t in status.splitTargets] == [
        ("stable", ST.LOADED), ("canary", ST.LOADED)]
    assert {await served_by(m, models[0], "v") for _ in range(30)} == {"stable"}


async def test_cli_split_status_promote_and_errors(
        mesh: tuple[InProcessMesh, int], models: tuple[ModelArtifact, ModelArtifact]) -> None:
    m, _ = mesh
    await stable_vmodel(m, models)
    assert m.router is not None
    endpoint = m.router.endpoint

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "mesh", "vmodel", *args, "--router", endpoint],
                              capture_output=True, text=True, timeout=60)

    r = await asyncio.to_thread(cli, "split", "v", "stable=90", "canary=10", "--sticky-header", "x-user",
                                "--sync")
    assert r.returncode == 0, r.stderr
    assert " 90%  stable  LOADED" in r.stdout and " 10%  canary  LOADED" in r.stdout
    assert "sticky by header x-user" in r.stdout
    r = await asyncio.to_thread(cli, "status", "v", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [(t["modelId"], t["weight"], t["receivingTraffic"]) for t in doc["splitTargets"]] == [
        ("stable", 90, True), ("canary", 10, True)]
    for args, code, words in [
        (("split", "v", "stable=90", "canary"), 2, "MODEL=WEIGHT"),  # usage
        (("split", "v", "stable=ninety"), 2, "MODEL=WEIGHT"),
        (("split", "v", "stable=90", "canary=20"), 1, "sum to 110"),  # the router's answer
        (("split", "v", "stable=90", "ghost=10"), 1, "ghost"),
        (("promote", "v", "elsewhere"), 1, "not a target"),
    ]:
        r = await asyncio.to_thread(cli, *args)
        assert r.returncode == code and words in r.stderr, (args, r.returncode, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    r = await asyncio.to_thread(cli, "promote", "v", "--sync")
    assert r.returncode == 0 and "vmodel v: DEFINED" in r.stdout and "canary" in r.stdout, r.stderr
    assert "split" not in r.stdout


async def test_split_targets_are_referrers_in_etcd(etcd: EtcdProcess,
                                                   models: tuple[ModelArtifact, ModelArtifact]) -> None:
    """On a real etcd, the refs index counts split targets: unregistering one is refused in the
    delete's own transaction; once the split is cleared (promote), the model left out may go."""
    m = await InProcessMesh(etcd.url).start(runtimes=1)
    try:
        await stable_vmodel(m, models)
        await m.mesh.setVModelSplit(split("v", ("stable", 70), ("canary", 30)), timeout=60)
        got, details = await code_of(m.mesh.unregisterModel(mm.UnregisterModelRequest(modelId="canary"), timeout=10))
        assert got == grpc.StatusCode.FAILED_PRECONDITION and "vModel(s) v" in details
        assert {await served_by(m, models[0], "v") for _ in range(80)} == {"stable", "canary"}
        await m.mesh.promoteVModel(mm.PromoteVModelRequest(vModelId="v", modelId="stable"), timeout=30)
        await m.mesh.unregisterModel(mm.UnregisterModelRequest(modelId="canary"), timeout=10)
        status = await m.mesh.getModelStatus(mm.GetStatusRequest(modelId="canary"), timeout=10)
        assert status.status == ST.NOT_FOUND
    finally:
        await m.stop()


# --- the review's findings (canary-fix) ---------------------------------------------------------------
def rest_body(model: ModelArtifact) -> dict[str, object]:
    return {"inputs": [{"name": "input-0", "shape": list(model.sample.shape), "datatype": "FP32",
                        "data": model.sample.flatten().tolist()}]}


async def test_a_sticky_header_is_read_only_for_its_own_vmodel_over_rest(
        mesh: tuple[InProcessMesh, int], models: tuple[ModelArtifact, ModelArtifact]) -> None:
    """One tenant's sticky header name changes nothing for other requests; an unusable value of it
    is a random draw, never a 400; credentials and standard headers are refused as sticky headers."""
    m, port = mesh
    await stable_vmodel(m, models)
    await m.mesh.setVModelSplit(split("v", ("stable", 50), ("canary", 50), sticky="x-user"), timeout=60)
    await m.mesh.ensureLoaded(mm.EnsureLoadedRequest(modelId="stable", sync=True), timeout=30)
    bad = {"X-User": "x" * 1500}  # too long for gRPC metadata as the REST edge checks it
    async with aiohttp.ClientSession() as s:
        # Another model's request carrying that header: not looked at.
        async with s.post(f"{m.rest_url}/v2/models/stable/infer", json=rest_body(models[0]), headers=bad) as r:
            assert r.status == 200, await r.text()
        # The split vModel's own request with an unusable value: served, by a random draw.
        for _ in range(40):
            async with s.post(f"{m.rest_url}/v2/models/v/infer", json=rest_body(models[0]), headers=bad) as r:
                assert r.status == 200, await r.text()
    samples = await scrape(port)  # both targets drawn (a sticky value would have kept to one)
    assert all(samples("mesh_vmodel_requests_total", vmodel_id="v", model_id=t) > 0 for t in ("stable", "canary"))
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{m.rest_url}/v2/models/v/ready", headers=bad) as r:
            assert r.status in (200, 400) and "ready" in await r.json()
    for name in ("Cookie", "authorization", "User-Agent", "content-type", "x-api-key", "host"):
        code, details = await code_of(m.mesh.setVModelSplit(
            split("v", ("stable", 90), ("canary", 10), sticky=name), timeout=10))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "stickyHeader" in details, (name, details)


async def test_rest_ready_and_v1_follow_the_sticky_header_and_count_inference_once(
        mesh: tuple[InProcessMesh, int], models: tuple[ModelArtifact, ModelArtifact]) -> None:
    m, port = mesh
    await stable_vmodel(m, models)
    await m.mesh.setVModelSplit(split("v", ("stable", 50), ("canary", 50), sticky="x-user"), timeout=60)
    user = next(u for u in (f"u{i}" for i in range(100)) if bucket(u) < 50)  # sticky on "stable"

    async def counts() -> dict[str, float]:
        samples = await scrape(port)
        return {t: samples("mesh_vmodel_requests_total", vmodel_id="v", model_id=t)
                if samples.has("mesh_vmodel_requests_total", vmodel_id="v", model_id=t) else 0.0
                for t in ("stable", "canary")}

    async with aiohttp.ClientSession() as s:
        c0 = await counts()
        for _ in range(30):
            async with s.get(f"{m.rest_url}/v2/models/v/ready", headers={"X-User": user}) as r:
                assert r.status == 200
            async with s.get(f"{m.rest_url}/v1/models/v", headers={"X-User": user}) as r:
                assert r.status == 200 and (await r.json())["ready"] is True
        c1 = await counts()
        assert c1 == c0  # readiness is no inference: not counted
        for _ in range(30):
            async with s.post(f"{m.rest_url}/v1/models/v:predict", json={"instances": models[0].sample[:1].tolist()},
                              headers={"X-User": user}) as r:
                assert r.status == 200, await r.text()
        c2 = await counts()
        # One V1 predict: one resolution, one count, on the user's own target (metadata and
        # inference both went there).
        assert {k: c2[k] - c1[k] for k in c2} == {"stable": 30, "canary": 0}


async def test_a_weight_0_target_is_not_reloaded_by_the_routers(
        mesh: tuple[InProcessMesh, int], models: tuple[ModelArtifact, ModelArtifact]) -> None:
    """Only targets with a weight are kept loaded: a weight-0 one evicted is left to on-demand
    loading (no pin outside max_pinned_copies); one with a weight is loaded again."""
    from mesh.gen.mmesh import model_runtime_pb2 as spi
    from mesh.gen.mmesh import model_runtime_pb2_grpc as spi_grpc
    m, _ = mesh
    await stable_vmodel(m, models)
    await m.mesh.setVModelSplit(split("v", ("stable", 100), ("canary", 0)), timeout=60)
    channel = grpc.aio.insecure_channel(m.runtimes[0].endpoint)
    runtime = spi_grpc.ModelRuntimeStub(channel)  # type: ignore[no-untyped-call]

    async def status(model_id: str) -> int:
        return (await m.mesh.getModelStatus(mm.GetStatusRequest(modelId=model_id), timeout=5)).status

    async def unloaded(model_id: str) -> bool:
        return await status(model_id) != ST.LOADED

    try:
        assert await status("canary") == ST.LOADED  # loaded when the split was set
        await runtime.unloadModel(spi.UnloadModelRequest(modelId="canary"), timeout=10)  # as an eviction
        await m.wait_for(lambda: unloaded("canary"), timeout=10)
        await asyncio.sleep(3.5)  # three rounds of drive_transitions (every 1 s)
        assert await status("canary") != ST.LOADED
        # Control: with a weight, the same eviction is repaired by the routers.
        await m.mesh.setVModelSplit(split("v", ("stable", 50), ("canary", 50), sync=False), timeout=60)
        await m.wait_for(lambda: _is(status("canary"), ST.LOADED), timeout=20)
    finally:
        await channel.close()


async def _is(value: Awaitable[int], wanted: int) -> bool:
    return await value == wanted


async def test_a_model_registered_again_by_someone_else_is_not_auto_deleted(
        mesh: tuple[InProcessMesh, int], models: tuple[ModelArtifact, ModelArtifact]) -> None:
    m, _ = mesh
    a, b = models

    async def state(model_id: str) -> int:
        return (await m.mesh.getModelStatus(mm.GetStatusRequest(modelId=model_id), timeout=5)).status

    for target, art in (("m1", a), ("m2", b)):
        await m.mesh.setVModel(mm.SetVModelRequest(
            vModelId="v", targetModelId=target, autoDeleteTargetModel=True, loadNow=True, sync=True,
            modelInfo=mm.ModelInfo(type="sklearn", path=str(art.path))), timeout=30)
    await m.wait_for(lambda: _is(state("m1"), ST.NOT_FOUND), timeout=10)  # the vModel's own: auto-deleted
    await m.register("m1", "sklearn", str(a.path))  # someone's own model now, under the same ID
    await m.mesh.setVModelSplit(split("v", ("m2", 90), ("m1", 10)), timeout=30)
    await m.mesh.promoteVModel(mm.PromoteVModelRequest(vModelId="v", modelId="m2", sync=True), timeout=30)
    await asyncio.sleep(0.5)
    assert await state("m1") != ST.NOT_FOUND  # not the vModel's: kept
    # And the vModel's own model still goes when the vModel does.
    await m.mesh.deleteVModel(mm.DeleteVModelRequest(vModelId="v"), timeout=10)
    await m.wait_for(lambda: _is(state("m2"), ST.NOT_FOUND), timeout=10)


async def test_a_split_can_register_its_canary_as_the_vmodels_own(
        mesh: tuple[InProcessMesh, int], models: tuple[ModelArtifact, ModelArtifact]) -> None:
    """SplitTarget.modelInfo: the canary registered and split in one call (no transition away from
    the stable model ever), auto-deleted when the canary is abandoned; nothing registered when the
    call is refused."""
    m, _ = mesh
    stable, canary = models

    async def state(model_id: str) -> int:
        return (await m.mesh.getModelStatus(mm.GetStatusRequest(modelId=model_id), timeout=5)).status

    await m.register("s", "sklearn", str(stable.path))
    await m.mesh.setVModel(mm.SetVModelRequest(vModelId="v", targetModelId="s", owner="me", loadNow=True, sync=True),
                           timeout=30)
    info = mm.ModelInfo(type="sklearn", path=str(canary.path))
    request = mm.SetVModelSplitRequest(vModelId="v", owner="me", stableModelId="s", sync=True, targets=[
        mm.SplitTarget(modelId="s", weight=80), mm.SplitTarget(modelId="c", weight=20, modelInfo=info)])
    bad = mm.SetVModelSplitRequest()
    bad.CopyFrom(request)
    bad.owner = "someone-else"
    assert (await code_of(m.mesh.setVModelSplit(bad, timeout=10)))[0] == grpc.StatusCode.ALREADY_EXISTS  # owner
    assert await state("c") == ST.NOT_FOUND  # refused: nothing registered
    status = await m.mesh.setVModelSplit(request, timeout=60)
    assert status.activeModelId == "s" and status.targetModelId == "s"
    assert [(t.modelId, t.weight, t.modelStatus.status) for t in status.splitTargets] == [
        ("s", 80, ST.LOADED), ("c", 20, ST.LOADED)]
    again = await m.mesh.setVModelSplit(request, timeout=60)  # idempotent: found registered, still its own
    assert len(again.splitTargets) == 2
    # Abandoned: a plain setVModel of the stable model clears the split; the canary goes.
    await m.mesh.setVModel(mm.SetVModelRequest(vModelId="v", targetModelId="s", owner="me"), timeout=30)
    await m.wait_for(lambda: _is(state("c"), ST.NOT_FOUND), timeout=10)
    assert await state("s") != ST.NOT_FOUND  # registered by hand: never auto-deleted


async def test_a_graph_step_naming_a_sticky_split_vmodel_follows_the_header_over_rest(
        mesh: tuple[InProcessMesh, int], models: tuple[ModelArtifact, ModelArtifact]) -> None:
    from mesh.gen.mmesh import graphs_pb2 as gp
    from mesh.gen.mmesh import graphs_pb2_grpc as gp_grpc
    m, port = mesh
    await stable_vmodel(m, models)
    await m.mesh.setVModelSplit(split("v", ("stable", 50), ("canary", 50), sticky="x-user"), timeout=60)
    spec = {"nodes": {"root": {"routerType": "Sequence", "steps": [{"serviceName": "v"}]}}}
    assert m.channel is not None
    await gp_grpc.ModelMeshGraphsStub(m.channel).setGraph(  # type: ignore[no-untyped-call]
        gp.SetGraphRequest(graphId="g", specJson=json.dumps(spec)), timeout=10)
    user = next(u for u in (f"u{i}" for i in range(100)) if bucket(u) >= 50)  # sticky on "canary"
    async with aiohttp.ClientSession() as s:
        for _ in range(20):
            async with s.post(f"{m.rest_url}/v2/models/g/infer", json=rest_body(models[0]),
                              headers={"X-User": user}) as r:
                assert r.status == 200, await r.text()
    samples = await scrape(port)
    assert samples("mesh_vmodel_requests_total", vmodel_id="v", model_id="canary") == 20
    assert not samples.has("mesh_vmodel_requests_total", vmodel_id="v", model_id="stable") or \
        samples("mesh_vmodel_requests_total", vmodel_id="v", model_id="stable") == 0
