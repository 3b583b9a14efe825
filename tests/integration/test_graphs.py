"""Inference graphs end to end in one process: a real router and runtime on 127.0.0.1 (``memory://``
registry), real scikit-learn models trained here, graphs defined through ``mmesh.ModelMeshGraphs``
and run over gRPC V2 and REST.

The models are linear maps with known weights, so every answer is checked against numpy:

- ``a``: 4 features -> 3 (a multi-output regressor: FP64 [n, 3], output ``predict``);
- ``b``: 3 features -> 1 (FP64 [n]): fits ``a``'s output, for a Sequence a -> b;
- ``c``: 4 features -> 1 (FP64 [n]);
- ``bad``: a file that is not a model (its load fails), for failing steps.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import numpy as np
import pytest

from mesh.gen.inference import grpc_service_pb2 as pb
from mesh.gen.inference import grpc_service_pb2_grpc as pb_grpc
from mesh.gen.mmesh import graphs_pb2 as gp
from mesh.gen.mmesh import graphs_pb2_grpc as gp_grpc
from mesh.gen.mmesh import model_mesh_pb2 as mm
from mesh.registry.memory import MemoryBackend
from mesh.tensors import decode_response, encode_request
from tests.support.inprocess import InProcessMesh, memory_url

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

W_A = np.array([[1.0, 0.5, -1.0], [2.0, 0.0, 1.0], [0.0, -1.5, 0.5], [1.0, 1.0, 1.0]])  # 4 -> 3
W_B = np.array([0.5, -2.0, 1.0])  # 3 -> 1
W_C = np.array([-1.0, 0.25, 3.0, 0.5])  # 4 -> 1
X = np.array([[0.1, 0.2, 0.3, 0.4], [1.0, -1.0, 2.0, 0.5], [3.0, 0.0, -2.0, 1.0]])


def _fit(directory: Path, name: str, weights: np.ndarray) -> Path:
    """A LinearRegression trained on exact data y = x @ weights (so it reproduces the weights)."""
    import joblib
    from sklearn.linear_model import LinearRegression

    rng = np.random.default_rng(len(name))
    x = rng.normal(size=(64, weights.shape[0]))
    model = LinearRegression(fit_intercept=False).fit(x, x @ weights)
    path = directory / name
    path.mkdir()
    joblib.dump(model, path / "model.joblib")
    return path


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.joblib").write_bytes(b"this is not a pickle")
    return {"a": _fit(tmp_path, "a", W_A), "b": _fit(tmp_path, "b", W_B), "c": _fit(tmp_path, "c", W_C),
            "bad": bad}


@pytest.fixture
async def mesh(models: dict[str, Path]) -> Any:
    m = await InProcessMesh(memory_url()).start(runtimes=1)
    try:
        for name, path in models.items():
            await m.register(name, "sklearn", str(path))
        yield m
    finally:
        await m.stop()


def graphs(m: InProcessMesh) -> gp_grpc.ModelMeshGraphsStub:
    assert m.channel is not None
    return gp_grpc.ModelMeshGraphsStub(m.channel)  # type: ignore[no-untyped-call]


async def set_graph(m: InProcessMesh, graph_id: str, spec: dict[str, Any],
                    metadata: tuple[tuple[str, str], ...] = ()) -> gp.GraphStatusInfo:
    return await graphs(m).setGraph(gp.SetGraphRequest(graphId=graph_id, specJson=json.dumps(spec)),
                                    metadata=metadata, timeout=10)


def request(name: str, x: np.ndarray = X, **parameters: str) -> pb.ModelInferRequest:
    req = encode_request(model_name=name, inputs={"x": x}, raw=False)
    for key, value in parameters.items():
        req.parameters[key].string_param = value
    return req


async def infer(m: InProcessMesh, name: str, x: np.ndarray = X, **parameters: str) -> dict[str, np.ndarray]:
    """A request naming the graph by ``model_name`` alone (no header), as a V2 client sends it."""
    response = await m.infer(name, request(name, x, **parameters), header="")
    assert response.model_name == name
    return decode_response(response)


async def error_of(call: Any) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.aio.AioRpcError as err:
        return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


def seq(*steps: dict[str, Any], router: str = "Sequence") -> dict[str, Any]:
    return {"nodes": {"root": {"routerType": router, "steps": list(steps)}}}


# --- semantics ----------------------------------------------------------------------------------
async def test_sequence_feeds_a_into_b_over_grpc_and_rest(mesh: InProcessMesh) -> None:
    # b is reached through a vModel: a step's serviceName resolves like a request's name.
    await mesh.mesh.setVModel(mm.SetVModelRequest(vModelId="vb", targetModelId="b"), timeout=10)
    status = await set_graph(mesh, "seq", seq({"serviceName": "a"}, {"serviceName": "vb", "data": "$response"}))
    assert status.status in (gp.GraphStatusInfo.DEFINED, gp.GraphStatusInfo.READY)
    assert {(e.modelId, e.isVModel, e.activeModelId) for e in status.models} == {("a", False, ""), ("vb", True, "b")}

    expected = X @ W_A @ W_B
    out = await infer(mesh, "seq")
    assert list(out) == ["predict"]
    np.testing.assert_allclose(out["predict"], expected, rtol=1e-9, atol=1e-9)

    # REST: the same graph through POST /v2/models/{graph}/infer.
    body = {"inputs": [{"name": "x", "shape": list(X.shape), "datatype": "FP64", "data": X.ravel().tolist()}]}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{mesh.rest_url}/v2/models/seq/infer", json=body,
                                timeout=aiohttp.ClientTimeout(total=30)) as response:
            assert response.status == 200, await response.text()
            answer = await response.json()
        assert answer["model_name"] == "seq"
        np.testing.assert_allclose(np.asarray(answer["outputs"][0]["data"]), expected, rtol=1e-9, atol=1e-9)
        # KServe V1: the rows become the graph's input, the first model's answer goes on to the next.
        async with session.post(f"{mesh.rest_url}/v1/models/seq:predict", json={"instances": X.tolist()}) as response:
            assert response.status == 200, await response.text()
            np.testing.assert_allclose((await response.json())["predictions"], expected, rtol=1e-9, atol=1e-9)
        async with session.get(f"{mesh.rest_url}/v2/models/seq/ready") as response:
            assert response.status == 200  # both models were loaded by the requests above
        async with session.get(f"{mesh.rest_url}/v2/models/seq") as response:
            meta = await response.json()
            assert (meta["name"], meta["platform"]) == ("seq", "inference-graph"), meta

    # Ready once every model it names has a copy; getGraphStatus says so too.
    assert (await mesh.v2.ModelReady(pb.ModelReadyRequest(name="seq"), timeout=10)).ready
    status = await graphs(mesh).getGraphStatus(gp.GetGraphStatusRequest(graphId="seq"), timeout=10)
    assert status.status == gp.GraphStatusInfo.READY
    assert json.loads(status.specJson)["nodes"]["root"]["routerType"] == "Sequence"
    listed = await graphs(mesh).listGraphs(gp.ListGraphsRequest(), timeout=10)
    assert [(g.graphId, g.nodes, list(g.models)) for g in listed.graphs] == [("seq", 1, ["a", "vb"])]
    # A header always names a model: mm-model-id "a" is model a, whatever graphs exist.
    direct = decode_response(await mesh.infer("a", request("seq")))
    np.testing.assert_allclose(direct["predict"], X @ W_A, rtol=1e-9, atol=1e-9)


async def test_switch_routes_on_a_request_parameter_and_on_an_input_name(mesh: InProcessMesh) -> None:
    await set_graph(mesh, "sw", seq(
        {"serviceName": "a", "condition": '[@this].#(parameters.route=="wide")'},
        {"serviceName": "c", "condition": "inputs.#(name==narrow)"},
        router="Switch"))
    out = await infer(mesh, "sw", route="wide")
    np.testing.assert_allclose(out["predict"], X @ W_A, rtol=1e-9, atol=1e-9)
    # No parameter: the first condition does not hold; the second looks at the input's name.
    response = await mesh.infer("sw", encode_request(model_name="sw", inputs={"narrow": X}, raw=False), header="")
    np.testing.assert_allclose(decode_response(response)["predict"], X @ W_C, rtol=1e-9, atol=1e-9)
    # Neither: no step runs, and the client is told so (not handed its own request back).
    code, message = await error_of(mesh.infer("sw", request("sw", route="other"), header=""))
    assert code == grpc.StatusCode.NOT_FOUND and "'sw'" in message, message


async def test_ensemble_combines_both_models_outputs(mesh: InProcessMesh) -> None:
    await set_graph(mesh, "ens", seq({"serviceName": "a"}, {"serviceName": "c"}, router="Ensemble"))
    out = await infer(mesh, "ens")
    assert list(out) == ["a.predict", "c.predict"]
    np.testing.assert_allclose(out["a.predict"], X @ W_A, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(out["c.predict"], X @ W_C, rtol=1e-9, atol=1e-9)


async def test_splitter_shares_follow_the_weights(mesh: InProcessMesh) -> None:
    await set_graph(mesh, "split", seq({"serviceName": "a", "weight": 30}, {"serviceName": "c", "weight": 70},
                                       router="Splitter"))
    n, share = 300, 0.3
    to_a = 0
    for _ in range(n):
        out = await infer(mesh, "split", X[:1])
        to_a += out["predict"].shape == (1, 3)  # a answers [1, 3], c answers [1]
    sigma = math.sqrt(n * share * (1 - share))
    assert abs(to_a - n * share) <= 4 * sigma, (to_a, n * share, sigma)


async def test_hard_step_failure_names_the_step_and_a_soft_one_is_skipped(mesh: InProcessMesh) -> None:
    await set_graph(mesh, "hard", seq({"serviceName": "bad", "name": "broken", "dependency": "Hard"},
                                      {"serviceName": "c"}))
    code, message = await error_of(mesh.infer("hard", request("hard"), header=""))
    assert code == grpc.StatusCode.FAILED_PRECONDITION, (code, message)
    assert "graph 'hard', node 'root', step 'broken'" in message and "'bad'" in message, message

    # Soft (KServe's default): skipped, the Sequence goes on with the node's input.
    await set_graph(mesh, "soft", seq({"serviceName": "bad"}, {"serviceName": "c", "data": "$response"}))
    np.testing.assert_allclose((await infer(mesh, "soft"))["predict"], X @ W_C, rtol=1e-9, atol=1e-9)
    # ...and an Ensemble answers without it.
    await set_graph(mesh, "soft-ens", seq({"serviceName": "a"}, {"serviceName": "bad"}, router="Ensemble"))
    assert list(await infer(mesh, "soft-ens")) == ["a.predict"]


async def test_deleted_graph_is_not_found(mesh: InProcessMesh) -> None:
    await set_graph(mesh, "gone", seq({"serviceName": "c"}))
    np.testing.assert_allclose((await infer(mesh, "gone"))["predict"], X @ W_C, rtol=1e-9, atol=1e-9)
    await graphs(mesh).deleteGraph(gp.DeleteGraphRequest(graphId="gone"), timeout=10)
    await graphs(mesh).deleteGraph(gp.DeleteGraphRequest(graphId="gone"), timeout=10)  # idempotent
    code, _ = await error_of(mesh.infer("gone", request("gone"), header=""))
    assert code == grpc.StatusCode.NOT_FOUND
    status = await graphs(mesh).getGraphStatus(gp.GetGraphStatusRequest(graphId="gone"), timeout=10)
    assert status.status == gp.GraphStatusInfo.NOT_FOUND


@pytest.mark.parametrize(("spec", "code", "place"), [
    ({"nodes": {"root": {"routerType": "Sequence", "steps": [{"nodeName": "x"}]},
                "x": {"routerType": "Sequence", "steps": [{"nodeName": "root"}]}}},
     grpc.StatusCode.INVALID_ARGUMENT, "root -> x -> root"),
    (seq({"serviceName": "a"}, {"serviceName": "nope"}), grpc.StatusCode.NOT_FOUND,
     "graph 'g': node 'root', step 2 ('nope')"),
    (seq({"serviceName": "a", "condition": "#(bad"}, router="Switch"), grpc.StatusCode.INVALID_ARGUMENT,
     "step 1"),
    (seq({"serviceName": "a", "weight": 50}, {"serviceName": "c", "weight": 40}, router="Splitter"),
     grpc.StatusCode.INVALID_ARGUMENT, "100"),
    ({"nodes": {"other": {"routerType": "Sequence", "steps": [{"serviceName": "a"}]}}},
     grpc.StatusCode.INVALID_ARGUMENT, "root"),
])
async def test_bad_definitions_are_refused_naming_the_place(mesh: InProcessMesh, spec: dict[str, Any],
                                                            code: grpc.StatusCode, place: str) -> None:
    got, message = await error_of(set_graph(mesh, "g", spec))
    assert got == code, (got, message)
    assert place in message, message
    assert (await graphs(mesh).getGraphStatus(gp.GetGraphStatusRequest(graphId="g"), timeout=10)).status \
        == gp.GraphStatusInfo.NOT_FOUND


async def test_bad_requests_to_the_api(mesh: InProcessMesh) -> None:
    stub = graphs(mesh)
    for req, code, words in [
        (gp.SetGraphRequest(graphId="g", specJson="{nodes"), grpc.StatusCode.INVALID_ARGUMENT, "not valid JSON"),
        (gp.SetGraphRequest(graphId="g", specJson=""), grpc.StatusCode.INVALID_ARGUMENT, "no spec"),
        (gp.SetGraphRequest(graphId="", specJson="{}"), grpc.StatusCode.INVALID_ARGUMENT, "graph"),
        (gp.SetGraphRequest(graphId="g", specJson=json.dumps({"nodes": {"root": {"routerType": "Sequence", "steps": [
            {"serviceName": "a", "name": "x" * 300_000}]}}})), grpc.StatusCode.INVALID_ARGUMENT, "limit"),
        # A graph may not take a model's name: a request naming it could not tell which is meant.
        (gp.SetGraphRequest(graphId="a", specJson=json.dumps(seq({"serviceName": "c"}))),
         grpc.StatusCode.ALREADY_EXISTS, "'a'"),
    ]:
        got, message = await error_of(stub.setGraph(req, timeout=10))
        assert (got, words in message) == (code, True), (req.graphId, got, message)


async def test_one_access_line_and_one_payload_record_pair_per_graph_request(
        models: dict[str, Path], logs: list[dict[str, Any]]) -> None:
    from tests.integration.test_payloads import SinkServer, eventually

    sink = await SinkServer().start()
    m = await InProcessMesh(memory_url(), log_overrides={"access_log": True},
                            router_overrides={"payload_processors": (sink.url,)}).start(runtimes=1)
    try:
        for name in ("a", "b"):
            await m.register(name, "sklearn", str(models[name]))
        await set_graph(m, "obs", seq({"serviceName": "a"}, {"serviceName": "b", "data": "$response"}))
        await infer(m, "obs")
        await eventually(lambda: len(sink.events) >= 2)
    finally:
        await m.stop()
        await sink.stop()
    routed = [e for e in logs if e["event"] == "request" and e.get("method") == "ModelInfer"]
    assert [(e["model_id"], e["code"]) for e in routed] == [("obs", "OK")], routed
    assert len([e for e in logs if e["event"] == "inference"]) == 2  # the runtime answered both steps
    assert len(sink.events) == 2 and {h["modelid"] for h, _ in sink.events} == {"obs"}, sink.events
    answer = decode_response(pb.ModelInferResponse.FromString(next(
        body for h, body in sink.events if "ModelInferResponse" in h["datacontenttype"])))
    np.testing.assert_allclose(answer["predict"], X @ W_A @ W_B, rtol=1e-9, atol=1e-9)


# --- the hot path -------------------------------------------------------------------------------
async def test_graph_requests_read_nothing_from_the_registry(mesh: InProcessMesh,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    await set_graph(mesh, "hot", seq({"serviceName": "a"}, {"serviceName": "b", "data": "$response"}))
    await infer(mesh, "hot")  # loads both models (reads their registrations once)
    reads: list[str] = []
    original_get, original_range = MemoryBackend.get, MemoryBackend.range

    def get(self: MemoryBackend, key: str) -> Any:
        reads.append(key)
        return original_get(self, key)

    def range_(self: MemoryBackend, prefix: str, limit: int = 0, start_after: str = "") -> Any:
        reads.append(prefix)
        return original_range(self, prefix, limit, start_after)

    monkeypatch.setattr(MemoryBackend, "get", get)
    monkeypatch.setattr(MemoryBackend, "range", range_)
    for _ in range(20):
        await infer(mesh, "hot")
    assert [k for k in reads if "/graphs/" in k or "/models/" in k or "/vmodels/" in k] == []
    # The patch does see registry reads: a status call reads the graph's record.
    await graphs(mesh).getGraphStatus(gp.GetGraphStatusRequest(graphId="hot"), timeout=10)
    assert any("/graphs/" in k for k in reads), reads


# --- auth ---------------------------------------------------------------------------------------
TOKENS = {"team-a": ("write", '["team-a"]'), "reader": ("read", ""), "ops": ("write", "")}


def _token(name: str) -> str:
    return f"{name}-token-0123456789abcdef"


def _auth(name: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {_token(name)}"),)


@pytest.fixture
def tokens_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "tokens.toml"
    path.write_text("".join(f'''
[[token]]
name = "{name}"
role = "{role}"
sha256 = "{hashlib.sha256(_token(name).encode()).hexdigest()}"
{f"prefixes = {prefixes}" if prefixes else ""}
''' for name, (role, prefixes) in TOKENS.items()))
    yield path


async def test_auth_covers_the_graph_and_every_model_it_names(models: dict[str, Path], tokens_file: Path) -> None:
    mesh = await InProcessMesh(memory_url(), extra={"auth": {"tokens_file": str(tokens_file)}}).start(runtimes=1)
    try:
        for name in ("team-a/a", "other/c"):
            await mesh.mesh.registerModel(mm.RegisterModelRequest(modelId=name, modelInfo=mm.ModelInfo(
                type="sklearn", path=str(models[name.rpartition("/")[2]]))), metadata=_auth("ops"), timeout=10)
        # A step naming a model outside the token's prefixes: refused, naming the step.
        code, message = await error_of(set_graph(
            mesh, "team-a/g", seq({"serviceName": "team-a/a"}, {"serviceName": "other/c"}), _auth("team-a")))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "step 2" in message and "other/c" in message, message
        # A graph ID outside its prefixes.
        code, _ = await error_of(set_graph(mesh, "other/g", seq({"serviceName": "team-a/a"}), _auth("team-a")))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        # A read token may look, not define.
        code, message = await error_of(set_graph(mesh, "team-a/g", seq({"serviceName": "team-a/a"}), _auth("reader")))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "setGraph" in message, message
        code, _ = await error_of(set_graph(mesh, "team-a/g", seq({"serviceName": "team-a/a"})))  # no token
        assert code == grpc.StatusCode.UNAUTHENTICATED
        # Inside its prefixes: defined, readable by the read token, and it runs.
        await set_graph(mesh, "team-a/g", seq({"serviceName": "team-a/a"}), _auth("team-a"))
        status = await graphs(mesh).getGraphStatus(gp.GetGraphStatusRequest(graphId="team-a/g"),
                                                   metadata=_auth("reader"), timeout=10)
        assert status.status != gp.GraphStatusInfo.NOT_FOUND
        out = decode_response(await mesh.v2.ModelInfer(request("team-a/g"), timeout=30))
        np.testing.assert_allclose(out["predict"], X @ W_A, rtol=1e-9, atol=1e-9)
        code, _ = await error_of(graphs(mesh).deleteGraph(gp.DeleteGraphRequest(graphId="team-a/g"),
                                                          metadata=_auth("reader"), timeout=10))
        assert code == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await mesh.stop()


# --- the controller's client --------------------------------------------------------------------
async def test_the_controllers_router_client_sets_reads_and_deletes_graphs(mesh: InProcessMesh) -> None:
    from mesh.controller.router_client import RouterClient, RouterError
    from mesh.errors import Code

    assert mesh.router is not None
    client = RouterClient(mesh.router.endpoint)
    try:
        state = await client.set_graph("ig", seq({"serviceName": "a"}, {"serviceName": "b", "data": "$response"}),
                                       owner="controller")
        assert state.status in ("DEFINED", "READY") and state.owner == "controller"
        assert [(m.model_id, m.status) for m in state.models] == [("a", "NOT_LOADED"), ("b", "NOT_LOADED")]
        await infer(mesh, "ig")
        state = await client.graph_status("ig")
        assert state.status == "READY" and {m.status for m in state.models} == {"LOADED"}
        with pytest.raises(RouterError) as refused:  # a step naming an unregistered model
            await client.set_graph("ig", seq({"serviceName": "later"}), owner="controller")
        assert refused.value.code is Code.NOT_FOUND and "step 1 ('later')" in refused.value.message
        with pytest.raises(RouterError) as refused:  # owned: only calls naming the owner change it
            await client.delete_graph("ig")
        assert refused.value.code is Code.FAILED_PRECONDITION
        await client.delete_graph("ig", owner="controller")
        await client.delete_graph("ig", owner="controller")  # idempotent
        assert (await client.graph_status("ig")).status == "NOT_FOUND"
    finally:
        await client.close()


# --- several routers ----------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["memory", "etcd"])
async def test_a_graph_defined_on_one_router_runs_on_another(models: dict[str, Path], backend: str,
                                                              request: pytest.FixtureRequest) -> None:
    """The second router learns graphs from its watch on ``graphs/`` (the first primes its own view),
    drops a deleted one, and skips a stored spec that does not parse (NOT_FOUND, not a crash)."""
    from mesh.registry import open_store
    from mesh.registry.records import GraphRecord
    from mesh.registry.registry import Registry
    from mesh.router.app import serve_router
    from tests.support.inprocess import start

    url = request.getfixturevalue("etcd").url if backend == "etcd" else memory_url()
    m = await InProcessMesh(url).start(runtimes=1)
    other = await start(serve_router, m.settings())
    channel = grpc.aio.insecure_channel(other.endpoint)
    store, prefix = open_store(url)
    try:
        for name in ("a", "b"):
            await m.register(name, "sklearn", str(models[name]))
        v2 = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]

        async def answer(name: str) -> tuple[grpc.StatusCode, Any]:
            try:
                return grpc.StatusCode.OK, decode_response(await v2.ModelInfer(request_(name), timeout=30))
            except grpc.aio.AioRpcError as err:
                return err.code(), None

        await set_graph(m, "shared", seq({"serviceName": "a"}, {"serviceName": "b", "data": "$response"}))
        await m.wait_for(lambda: _ok(answer("shared")))
        np.testing.assert_allclose((await answer("shared"))[1]["predict"], X @ W_A @ W_B, rtol=1e-9, atol=1e-9)

        # A record no router would accept (written past the API): skipped, so NOT_FOUND.
        await Registry(store, prefix).put_graph(GraphRecord("odd", {"nodes": {"x": {}}}), expected_revision=None)
        await set_graph(m, "marker", seq({"serviceName": "a"}))  # written after it: seen means "odd" was seen
        await m.wait_for(lambda: _ok(answer("marker")))
        assert (await answer("odd"))[0] == grpc.StatusCode.NOT_FOUND

        await graphs(m).deleteGraph(gp.DeleteGraphRequest(graphId="shared"), timeout=10)
        await m.wait_for(lambda: _code(answer("shared"), grpc.StatusCode.NOT_FOUND))
    finally:
        await store.close()
        await channel.close()
        await other.stop()
        await m.stop()


def request_(name: str) -> pb.ModelInferRequest:
    return request(name)  # for a test whose ``request`` is pytest's fixture


async def _ok(call: Any) -> bool:
    return bool((await call)[0] == grpc.StatusCode.OK)


async def _code(call: Any, code: grpc.StatusCode) -> bool:
    return bool((await call)[0] == code)


# --- bounds (the attacker review's findings 1, 5 and 6) -----------------------------------------
async def test_each_step_counts_against_the_routers_in_flight_limit(models: dict[str, Path]) -> None:
    """One request may not take the router past ``max_inflight_requests``: each step call is counted
    (the client's request holds one; 3 steps fit a limit of 4; the fourth is refused), and the graph
    fails RESOURCE_EXHAUSTED instead of answering a partial Ensemble (Soft steps skipped). Counted,
    not timed: the steps start in one loop turn, before any answer can come back."""
    m = await InProcessMesh(memory_url(), router_overrides={"max_inflight_requests": 4}).start(runtimes=1)
    try:
        await m.register("a", "sklearn", str(models["a"]))
        wide = {"nodes": {"root": {"routerType": "Ensemble",
                                   "steps": [{"serviceName": "a", "name": f"s{i}"} for i in range(8)]}}}
        await set_graph(m, "wide", wide)
        await set_graph(m, "narrow", seq({"serviceName": "a"}))
        np.testing.assert_allclose((await infer(m, "narrow"))["predict"], X @ W_A, rtol=1e-9, atol=1e-9)
        code, message = await error_of(m.infer("wide", request("wide"), header=""))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, message)
        assert message.startswith("graph 'wide', node 'root', step 's3' (model 'a'): this server has 4 requests")
        # The counts were given back: the 3 admitted steps and the failed request left nothing held.
        for _ in range(3):
            np.testing.assert_allclose((await infer(m, "narrow"))["predict"], X @ W_A, rtol=1e-9, atol=1e-9)
        # An Ensemble within the limit runs.
        await set_graph(m, "fits", {"nodes": {"root": {"routerType": "Ensemble", "steps": [
            {"serviceName": "a", "name": f"s{i}"} for i in range(3)]}}})
        assert sorted(await infer(m, "fits")) == ["s0.predict", "s1.predict", "s2.predict"]
    finally:
        await m.stop()


async def test_a_graph_over_the_call_bound_is_refused_with_its_cost(mesh: InProcessMesh) -> None:
    levels = {f"n{i}": {"routerType": "Ensemble", "steps": [{"nodeName": f"n{i + 1}", "name": f"s{j}"}
                                                           for j in range(4)]} for i in range(4)}
    levels["n4"] = {"routerType": "Ensemble", "steps": [{"serviceName": "a", "name": f"s{j}"} for j in range(4)]}
    levels["root"] = {"routerType": "Sequence", "steps": [{"nodeName": "n0"}]}
    code, message = await error_of(set_graph(mesh, "bomb", {"nodes": levels}))  # 4^5 = 1024 calls
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "graph 'bomb': one request may make up to 1,024 model calls" in message
    assert "the limit is 256 calls per request" in message


async def test_a_model_or_vmodel_never_takes_a_graphs_id(mesh: InProcessMesh, models: dict[str, Path]) -> None:
    from mesh.registry import open_store
    from mesh.registry.records import GraphRecord
    from mesh.registry.registry import Registry

    await set_graph(mesh, "pipeline", seq({"serviceName": "a"}))
    code, message = await error_of(mesh.mesh.setVModel(mm.SetVModelRequest(
        vModelId="pipeline", targetModelId="c", owner="mesh-controller/other-ns/isvc"), timeout=10))
    assert code == grpc.StatusCode.ALREADY_EXISTS and "vModel ID 'pipeline' is already an inference graph's" in message
    code, message = await error_of(mesh.register("pipeline", "sklearn", str(models["c"])))
    assert code == grpc.StatusCode.ALREADY_EXISTS and "model ID 'pipeline'" in message
    code, _ = await error_of(mesh.mesh.setVModel(mm.SetVModelRequest(
        vModelId="v", targetModelId="pipeline", modelInfo=mm.ModelInfo(type="sklearn", path=str(models["c"]))),
        timeout=10))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    # The graph still answers.
    np.testing.assert_allclose((await infer(mesh, "pipeline"))["predict"], X @ W_A, rtol=1e-9, atol=1e-9)

    # A graph this router has not seen yet (written past the API, as another router would, just
    # now): the registration's own transaction finds it, and writes nothing.
    store, prefix = open_store(mesh.registry_url)
    try:
        registry = Registry(store, prefix)
        await registry.put_graph(GraphRecord("elsewhere", seq({"serviceName": "a"})), expected_revision=None)
        code, message = await error_of(mesh.register("elsewhere", "sklearn", str(models["c"])))
        assert code == grpc.StatusCode.ALREADY_EXISTS
        assert "model ID 'elsewhere' is already an inference graph's" in message
        assert await registry.get_model("elsewhere") is None
        from mesh.errors import AlreadyExists
        from mesh.registry.records import ModelSpec
        with pytest.raises(AlreadyExists, match="already an inference graph's ID"):  # the transaction's check itself
            await registry.register_model(ModelSpec("elsewhere", "sklearn", path="/m"), graph_free=True)
        assert await registry.get_model("elsewhere") is None
    finally:
        await store.close()

    # Two routers racing can still make a vModel and a graph of one ID (written here past the API,
    # as the other router would): the graph's status says SHADOWED, and a split is refused.
    await mesh.mesh.setVModel(mm.SetVModelRequest(vModelId="raced", targetModelId="c"), timeout=10)
    store, prefix = open_store(mesh.registry_url)
    try:
        await Registry(store, prefix).put_graph(GraphRecord("raced", seq({"serviceName": "a"})),
                                                expected_revision=None)
    finally:
        await store.close()
    status = await graphs(mesh).getGraphStatus(gp.GetGraphStatusRequest(graphId="raced"), timeout=10)
    assert status.status == gp.GraphStatusInfo.SHADOWED
    code, message = await error_of(mesh.mesh.setVModelSplit(mm.SetVModelSplitRequest(
        vModelId="raced", targets=[mm.SplitTarget(modelId="c", weight=50), mm.SplitTarget(modelId="a", weight=50)]),
        timeout=10))
    assert code == grpc.StatusCode.ALREADY_EXISTS and "'raced' is already an inference graph's" in message


async def test_the_number_of_graphs_is_bounded(models: dict[str, Path]) -> None:
    m = await InProcessMesh(memory_url(), router_overrides={"max_graphs": 2}).start(runtimes=1)
    try:
        await m.register("a", "sklearn", str(models["a"]))
        await set_graph(m, "g1", seq({"serviceName": "a"}))
        await set_graph(m, "g2", seq({"serviceName": "a"}))
        code, message = await error_of(set_graph(m, "g3", seq({"serviceName": "a"})))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "graph 'g3': the mesh holds 2 graphs, its limit (router.max_graphs) is 2" in message
        await set_graph(m, "g1", seq({"serviceName": "a"}, {"serviceName": "a", "name": "again"}))  # a change fits
        await graphs(m).deleteGraph(gp.DeleteGraphRequest(graphId="g2"), timeout=10)
        await set_graph(m, "g3", seq({"serviceName": "a"}))
    finally:
        await m.stop()
