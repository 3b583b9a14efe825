"""The router's REST front end (mesh/rest) against a real mesh on 127.0.0.1, with models the test
trains: Triton's own HTTP client (``tritonclient.http``, sync and asyncio) for the Open Inference
Protocol in JSON and with binary tensors, plain HTTP for KServe V1, model selection by path and by
header (vModels too, switched through the gRPC management API), the same answers as gRPC, the
client's trace context reaching the runtime, and the router's request metrics.

Every answer is compared with what the model's own library computes in this process.
"""

from __future__ import annotations

import asyncio
import socket
import urllib.parse
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import joblib
import numpy as np
import pytest
import tritonclient.http as triton
import tritonclient.http.aio as triton_aio
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from mesh.gen.mmesh import model_mesh_pb2 as mm
from mesh.tensors import decode_response, encode_request
from tests.support.inprocess import InProcessMesh, memory_url

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
TRACEPARENT = f"00-{TRACE_ID}-b7ad6b7169203331-01"


# --- models trained here ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Trained:
    path: Path  # the directory registered
    x: np.ndarray  # a sample input, in the datatype the test sends
    predict: Callable[[np.ndarray], np.ndarray]  # the model's own answers, computed in this process
    proba: Callable[[np.ndarray], np.ndarray] | None = None


def _save(directory: Path, estimator: Any) -> Path:
    directory.mkdir(parents=True)
    joblib.dump(estimator, directory / "model.joblib")
    return directory


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Trained]:
    from sklearn.datasets import load_digits, load_iris
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import OneHotEncoder
    from sklearn.tree import DecisionTreeClassifier

    root = tmp_path_factory.mktemp("rest-models")
    x, y = load_iris(return_X_y=True)
    rows = np.random.default_rng(7).choice(len(x), size=12, replace=False)
    sample = np.ascontiguousarray(x[rows])
    # "iris": INT64 labels and FP64 probabilities, from FP64 features.
    iris = LogisticRegression(max_iter=500).fit(x, y)
    # "iris-names": the same features, string labels (BYTES), so its answers differ visibly from iris's.
    names = np.array(["setosa", "versicolor", "virginica"], dtype=object)[y]
    iris_names = DecisionTreeClassifier(max_depth=2, random_state=0).fit(x, names)
    # "digits": integer features (pixel intensities 0..16), sent as INT64.
    dx, dy = load_digits(return_X_y=True)
    digits = DecisionTreeClassifier(max_depth=6, random_state=0).fit(dx.astype(np.int64), dy)
    digits_x = dx[:9].astype(np.int64)
    out = {
        "iris": Trained(_save(root / "iris", iris), sample, iris.predict, iris.predict_proba),
        "iris-names": Trained(_save(root / "iris-names", iris_names), sample, iris_names.predict),
        "digits": Trained(_save(root / "digits", digits), digits_x, digits.predict),
        "colors": _colors(root / "colors", OneHotEncoder, LogisticRegression),
    }
    return out


def _colors(directory: Path, encoder: Any, classifier: Any) -> Trained:
    """A model whose input is text (BYTES): one-hot colour names into a classifier, as ONNX (the
    sklearn loader takes numbers only; onnxruntime takes strings)."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import StringTensorType
    from sklearn.pipeline import make_pipeline

    words = np.array([["red"], ["green"], ["blue"], ["teal"]] * 6, dtype=object)
    labels = np.array([0, 1, 2, 2] * 6)
    pipeline = make_pipeline(encoder(handle_unknown="ignore"), classifier(max_iter=500)).fit(words, labels)
    onx = convert_sklearn(pipeline, initial_types=[("color", StringTensorType([None, 1]))],
                          options={id(pipeline): {"zipmap": False}}, target_opset=17)
    directory.mkdir(parents=True)
    (directory / "model.onnx").write_bytes(onx.SerializeToString())
    sample = np.array([["blue"], ["red"], ["teal"], ["green"], ["mauve"]], dtype=object)
    return Trained(directory, sample, pipeline.predict, pipeline.predict_proba)


async def started(models: Mapping[str, Trained], **router: Any) -> InProcessMesh:
    m = await InProcessMesh(memory_url(), router_overrides=router).start(runtimes=1)
    for name, model in models.items():
        await m.register(name, "onnx" if name == "colors" else "sklearn", str(model.path))
    await m.register("team/iris", "sklearn", str(models["iris"].path))
    return m


@pytest.fixture
async def mesh(models: dict[str, Trained]) -> AsyncIterator[InProcessMesh]:
    m = await started(models)
    try:
        yield m
    finally:
        await m.stop()


def host_port(m: InProcessMesh) -> str:
    return m.rest_url.removeprefix("http://")


def text(values: np.ndarray) -> list[str]:
    """BYTES come back as bytes (binary) or str (JSON): compare their text."""
    return [v.decode() if isinstance(v, bytes) else str(v) for v in np.asarray(values).ravel()]


# --- tritonclient --------------------------------------------------------------------------------
def triton_inputs(x: np.ndarray, datatype: str, binary: bool, name: str = "input-0") -> list[triton.InferInput]:
    tensor = triton.InferInput(name, list(x.shape), datatype)
    tensor.set_data_from_numpy(x, binary_data=binary)
    return [tensor]


def triton_call(m: InProcessMesh, fn: Callable[[triton.InferenceServerClient], Any]) -> Any:
    """``fn(client)`` with a fresh sync client (geventhttpclient), from a thread: the mesh runs on
    this test's event loop, which must stay free to answer."""
    def run() -> Any:
        client = triton.InferenceServerClient(host_port(m), network_timeout=30.0, connection_timeout=10.0)
        try:
            return fn(client)
        finally:
            client.close()

    return asyncio.to_thread(run)


def triton_infer(m: InProcessMesh, model: str, x: np.ndarray, datatype: str, outputs: list[str]) -> Any:
    """One inference with binary inputs and outputs (the client's default)."""
    return triton_call(m, lambda c: c.infer(model, triton_inputs(x, datatype, True),
                                            outputs=[triton.InferRequestedOutput(o) for o in outputs]))


async def test_tritonclient_health_server_and_model_metadata(mesh: InProcessMesh) -> None:
    def probe(c: triton.InferenceServerClient) -> dict[str, Any]:
        return {"live": c.is_server_live(), "ready": c.is_server_ready(), "server": c.get_server_metadata(),
                "cold": c.is_model_ready("iris"), "unknown": c.is_model_ready("no-such-model"),
                "meta": c.get_model_metadata("iris"), "names": c.get_model_metadata("iris-names"),
                "colors": c.get_model_metadata("colors")}

    got = await triton_call(mesh, probe)
    assert got["live"] is True and got["ready"] is True
    assert got["server"]["name"] == "mesh-serving" and "binary_tensor_data" in got["server"]["extensions"]
    # Registered, nothing loaded yet: not ready; unregistered: not ready either (404).
    assert got["cold"] is False and got["unknown"] is False
    # Metadata comes from the runtime (which loads the model for it).
    meta = got["meta"]
    assert meta["name"] == "iris" and meta["platform"] == "sklearn"
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [("input", "FP64", [-1, 4])]
    assert [(t["name"], t["datatype"]) for t in meta["outputs"]] == [("predict", "INT64"), ("predict_proba", "FP64")]
    assert (got["names"]["outputs"][0]["name"], got["names"]["outputs"][0]["datatype"]) == ("predict", "BYTES")
    assert [(t["name"], t["datatype"], t["shape"]) for t in got["colors"]["inputs"]] == [("color", "BYTES", [-1, 1])]
    assert await triton_call(mesh, lambda c: c.is_model_ready("iris")) is True

    with pytest.raises(InferenceServerException) as err:
        await triton_call(mesh, lambda c: c.get_model_metadata("no-such-model"))
    assert err.value.status() == "404" and "no-such-model" in (err.value.message() or "")


async def test_ready_only_with_a_runtime(models: dict[str, Trained]) -> None:
    """ServerReady follows the router's readiness: no runtime in the registry, not ready (the
    spec's 4xx), while live; ready once a runtime has registered."""
    m = await InProcessMesh(memory_url()).start(runtimes=0)
    try:
        assert await call(m, "GET", "/v2/health/live") == (200, {"live": True})
        status, body = await call(m, "GET", "/v2/health/ready")
        assert status == 400 and body["ready"] is False and "not ready" in body["error"]
        assert await triton_call(m, lambda c: (c.is_server_live(), c.is_server_ready())) == (True, False)
        await m.add_runtime()

        async def ready() -> bool:
            return (await call(m, "GET", "/v2/health/ready"))[0] == 200

        await m.wait_for(ready, timeout=15)
        assert await triton_call(m, lambda c: c.is_server_ready()) is True
    finally:
        await m.stop()


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize(("model", "datatype"), [("iris", "FP64"), ("iris", "FP32"), ("digits", "INT64")])
async def test_tritonclient_infers_numeric_inputs(mesh: InProcessMesh, models: dict[str, Trained], model: str,
                                                  datatype: str, binary: bool) -> None:
    trained = models[model]
    x = trained.x.astype({"FP64": np.float64, "FP32": np.float32, "INT64": np.int64}[datatype])
    names = ["predict", "predict_proba"] if trained.proba is not None else ["predict"]

    def call(c: triton.InferenceServerClient) -> Any:
        outputs = [triton.InferRequestedOutput(n, binary_data=binary) for n in names]
        return c.infer(model, triton_inputs(x, datatype, binary), outputs=outputs, request_id="r-1")

    result = await triton_call(mesh, call)
    response = result.get_response()
    assert response["model_name"] == model and response["id"] == "r-1"
    for output in response["outputs"]:  # the form asked for came back
        assert ("parameters" in output and "binary_data_size" in output["parameters"]) is binary
        assert ("data" in output) is not binary
    predict = result.as_numpy("predict")
    assert predict.dtype == np.int64 and predict.shape == (len(x),)
    np.testing.assert_array_equal(predict, trained.predict(x))
    if trained.proba is not None:
        np.testing.assert_allclose(result.as_numpy("predict_proba"), trained.proba(x), rtol=1e-12)


async def test_tritonclient_default_outputs_are_binary(mesh: InProcessMesh, models: dict[str, Trained]) -> None:
    """Naming no outputs, tritonclient asks for binary ones (binary_data_output): the model's
    default outputs come back in the binary part."""
    x = models["iris"].x
    result = await triton_call(mesh, lambda c: c.infer("iris", triton_inputs(x, "FP64", True)))
    (output,) = result.get_response()["outputs"]
    assert output["name"] == "predict" and output["parameters"]["binary_data_size"] == 8 * len(x)
    np.testing.assert_array_equal(result.as_numpy("predict"), models["iris"].predict(x))


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
async def test_tritonclient_bytes_inputs_and_outputs(mesh: InProcessMesh, models: dict[str, Trained],
                                                     binary: bool) -> None:
    colors, names = models["colors"], models["iris-names"]

    def call(c: triton.InferenceServerClient) -> tuple[Any, Any]:
        text_in = c.infer("colors", triton_inputs(colors.x, "BYTES", binary, name="color"),
                          outputs=[triton.InferRequestedOutput(n, binary_data=binary)
                                   for n in ("label", "probabilities")])
        text_out = c.infer("iris-names", triton_inputs(names.x, "FP64", binary),
                           outputs=[triton.InferRequestedOutput("predict", binary_data=binary)])
        return text_in, text_out

    text_in, text_out = await triton_call(mesh, call)
    np.testing.assert_array_equal(text_in.as_numpy("label"), colors.predict(colors.x))
    assert colors.proba is not None
    np.testing.assert_allclose(text_in.as_numpy("probabilities"), colors.proba(colors.x), rtol=1e-5, atol=1e-6)
    assert text_out.get_output("predict")["datatype"] == "BYTES"
    assert text(text_out.as_numpy("predict")) == text(names.predict(names.x))


async def test_tritonclient_asyncio_client(mesh: InProcessMesh, models: dict[str, Trained]) -> None:
    """tritonclient.http.aio (aiohttp underneath), on the mesh's own loop; gzip request bodies too."""
    trained = models["iris"]
    client = triton_aio.InferenceServerClient(host_port(mesh), conn_timeout=30)
    try:
        assert await client.is_server_live() and await client.is_server_ready()
        for binary in (False, True):
            tensor = triton_aio.InferInput("input-0", list(trained.x.shape), "FP64")
            tensor.set_data_from_numpy(trained.x, binary_data=binary)
            outputs = [triton_aio.InferRequestedOutput("predict_proba", binary_data=binary)]
            plain = await client.infer("iris", [tensor], outputs=outputs)
            gzipped = await client.infer("iris", [tensor], outputs=outputs, request_compression_algorithm="gzip")
            assert trained.proba is not None
            for result in (plain, gzipped):
                np.testing.assert_allclose(result.as_numpy("predict_proba"), trained.proba(trained.x), rtol=1e-12)
        assert await client.is_model_ready("iris")
        assert (await client.get_model_metadata("iris"))["name"] == "iris"
    finally:
        await client.close()


# --- plain HTTP: KServe V1, model selection -------------------------------------------------------
async def call(m: InProcessMesh, method: str, path: str, body: Any = None,
               headers: Mapping[str, str] | None = None) -> tuple[int, Any]:
    """(status, parsed JSON body) of one request; ``path`` is sent as written (no re-quoting)."""
    async with aiohttp.ClientSession() as session, session.request(
            method, m.rest_url + path, json=body, headers=headers,
            timeout=aiohttp.ClientTimeout(total=30)) as response:
        assert response.content_type == "application/json", await response.read()
        return response.status, await response.json()


def v2_body(x: np.ndarray, *outputs: str, datatype: str = "FP64") -> dict[str, Any]:
    body: dict[str, Any] = {"inputs": [{"name": "input-0", "shape": list(x.shape), "datatype": datatype,
                                        "data": x.tolist()}]}
    if outputs:
        body["outputs"] = [{"name": n} for n in outputs]
    return body


def v2_outputs(answer: dict[str, Any]) -> dict[str, np.ndarray]:
    return {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in answer["outputs"]}


async def test_kserve_v1_status_and_predict(mesh: InProcessMesh, models: dict[str, Trained]) -> None:
    assert await call(mesh, "GET", "/v1/models/iris") == (200, {"name": "iris", "ready": False})
    iris, names, digits = models["iris"], models["iris-names"], models["digits"]
    for key in ("instances", "inputs"):
        status, answer = await call(mesh, "POST", "/v1/models/iris:predict", {key: iris.x.tolist()})
        assert status == 200, answer
        assert answer == {"predictions": iris.predict(iris.x).tolist()}
    assert await call(mesh, "GET", "/v1/models/iris") == (200, {"name": "iris", "ready": True})
    # String labels come back as strings; integer features are converted to the model's FP64 input.
    status, answer = await call(mesh, "POST", "/v1/models/iris-names:predict", {"instances": names.x.tolist()})
    assert status == 200 and answer == {"predictions": text(names.predict(names.x))}
    status, answer = await call(mesh, "POST", "/v1/models/digits:predict", {"instances": digits.x.tolist()})
    assert status == 200 and answer == {"predictions": digits.predict(digits.x).tolist()}
    # A model ID with "/" in the path, and the header naming another model over the path's.
    status, answer = await call(mesh, "POST", "/v1/models/team%2Firis:predict", {"instances": iris.x.tolist()})
    assert status == 200 and answer == {"predictions": iris.predict(iris.x).tolist()}
    status, answer = await call(mesh, "POST", "/v1/models/iris:predict", {"instances": names.x.tolist()},
                                headers={"mm-model-id": "iris-names"})
    assert status == 200 and answer == {"predictions": text(names.predict(names.x))}
    status, answer = await call(mesh, "GET", "/v1/models/no-such-model")
    assert status == 404 and "no-such-model" in answer["error"]


async def test_v1_follows_an_id_registered_again_for_another_input(
        mesh: InProcessMesh, models: dict[str, Trained]) -> None:
    """V1 remembers each model's first input (name, datatype) from its metadata. The ID registered
    again for a model taking another input must not be refused for what was remembered."""
    colors, iris = models["colors"], models["iris"]
    await mesh.register("swap", "onnx", str(colors.path))
    status, answer = await call(mesh, "POST", "/v1/models/swap:predict", {"instances": colors.x.tolist()})
    assert (status, answer) == (200, {"predictions": colors.predict(colors.x).tolist()})
    await mesh.mesh.unregisterModel(mm.UnregisterModelRequest(modelId="swap"), timeout=10)
    await mesh.register("swap", "sklearn", str(iris.path))

    async def replaced() -> bool:  # the old copy is unloaded by the runtime, not at once
        code, answer = await call(mesh, "POST", "/v2/models/swap/infer", v2_body(iris.x))
        return code == 200 and answer["outputs"][0]["data"] == iris.predict(iris.x).tolist()

    await mesh.wait_for(replaced, timeout=15)
    for _ in range(2):
        status, answer = await call(mesh, "POST", "/v1/models/swap:predict", {"instances": iris.x.tolist()})
        assert (status, answer) == (200, {"predictions": iris.predict(iris.x).tolist()})
    # Input the model refuses is still refused, with the runtime's words.
    status, answer = await call(mesh, "POST", "/v1/models/swap:predict", {"instances": [[1.0, 2.0]]})
    assert status == 400 and "4 features" in answer["error"]


async def test_model_by_path_header_and_escaped_slash(mesh: InProcessMesh, models: dict[str, Trained]) -> None:
    iris, names = models["iris"], models["iris-names"]
    want_iris, want_names = iris.predict(iris.x).tolist(), text(names.predict(names.x))

    async def predict(path: str, headers: Mapping[str, str] | None = None) -> list[Any]:
        status, answer = await call(mesh, "POST", path, v2_body(iris.x), headers)
        assert status == 200, (path, answer)
        return [str(v) if isinstance(v, str) else v for v in answer["outputs"][0]["data"]]

    assert await predict("/v2/models/iris/infer") == want_iris
    assert await predict("/v2/models/iris/versions/1/infer") == want_iris
    assert await predict("/v2/models/iris/infer", {"mm-model-id": "iris-names"}) == want_names
    assert await predict("/v2/models/anything/infer", {"mm-model-id": "iris"}) == want_iris
    # "/" in a model ID: escaped in the path, or in the header as it is.
    assert await predict(f"/v2/models/{urllib.parse.quote('team/iris', safe='')}/infer") == want_iris
    assert await predict("/v2/models/iris-names/infer", {"mm-model-id": "team/iris"}) == want_iris
    status, meta = await call(mesh, "GET", "/v2/models/team%2Firis")
    assert status == 200 and meta["name"] == "team/iris"
    assert await call(mesh, "GET", "/v2/models/team%2Firis/ready") == (200, {"name": "team/iris", "ready": True})
    # Unescaped, the "/" splits the path: no such endpoint.
    status, answer = await call(mesh, "POST", "/v2/models/team/iris/infer", v2_body(iris.x))
    assert status == 404 and "no such endpoint" in answer["error"]
    # tritonclient does not escape names: the header reaches such a model.
    result = await triton_call(mesh, lambda c: c.infer("x", triton_inputs(iris.x, "FP64", True),
                                                       headers={"mm-model-id": "team/iris"}))
    assert result.as_numpy("predict").tolist() == want_iris


async def test_vmodel_switch_is_seen_over_rest(mesh: InProcessMesh, models: dict[str, Trained]) -> None:
    iris, names = models["iris"], models["iris-names"]
    want_iris, want_names = iris.predict(iris.x).tolist(), text(names.predict(names.x))
    status = await mesh.mesh.setVModel(mm.SetVModelRequest(vModelId="prod", targetModelId="iris", loadNow=True,
                                                           sync=True), timeout=30)
    assert status.activeModelId == "iris"

    async def answers() -> list[list[Any]]:
        """What the vModel answers: by path, by mm-vmodel-id, by V1 path."""
        out = []
        for path, headers in (("/v2/models/prod/infer", None), ("/v2/models/x/infer", {"mm-vmodel-id": "prod"})):
            code, answer = await call(mesh, "POST", path, v2_body(iris.x), headers)
            assert code == 200, answer
            out.append(answer["outputs"][0]["data"])
        code, answer = await call(mesh, "POST", "/v1/models/prod:predict", {"instances": iris.x.tolist()})
        assert code == 200, answer
        out.append(answer["predictions"])
        return out

    await mesh.wait_for(lambda: _all_equal(answers, want_iris), timeout=15)
    assert await answers() == [want_iris] * 3
    status = await mesh.mesh.setVModel(mm.SetVModelRequest(vModelId="prod", targetModelId="iris-names",
                                                           loadNow=True, sync=True), timeout=30)
    assert status.activeModelId == "iris-names"
    # The router learns the switch from the registry's watch: wait (bounded) for it, then it holds.
    await mesh.wait_for(lambda: _all_equal(answers, want_names), timeout=15)
    assert await answers() == [want_names] * 3
    # The vModel's model metadata follows too.
    code, meta = await call(mesh, "GET", "/v2/models/prod")
    assert code == 200 and meta["name"] == "iris-names"
    # mm-vmodel-id naming a model that is no vModel: 404, as on gRPC.
    code, answer = await call(mesh, "POST", "/v2/models/x/infer", v2_body(iris.x), {"mm-vmodel-id": "iris"})
    assert code == 404 and "vModel" in answer["error"]


async def _all_equal(answers: Callable[[], Any], want: list[Any]) -> bool:
    return all(a == want for a in await answers())


async def test_rest_and_grpc_give_the_same_outputs(mesh: InProcessMesh, models: dict[str, Trained]) -> None:
    for name, datatype in (("iris", "FP64"), ("iris", "FP32"), ("digits", "INT64"), ("iris-names", "FP64"),
                           ("colors", "BYTES")):
        trained = models[name]
        x = trained.x.astype(np.float32) if datatype == "FP32" else trained.x
        wanted = {"iris": ["predict", "predict_proba"], "colors": ["label", "probabilities"]}.get(name, ["predict"])
        grpc_x = np.array([[v.encode()] for v in x.ravel()], dtype=object) if datatype == "BYTES" else x
        request = encode_request(model_name=name, inputs={"input-0": grpc_x}, outputs=wanted)
        via_grpc = decode_response(await mesh.v2.ModelInfer(request, timeout=30))
        code, answer = await call(mesh, "POST", f"/v2/models/{name}/infer", v2_body(x, *wanted, datatype=datatype))
        assert code == 200, answer
        via_json = v2_outputs(answer)
        via_binary = (await triton_infer(mesh, name, x, datatype, wanted)).as_numpy
        assert list(via_grpc) == list(via_json) == wanted, (name, list(via_grpc), list(via_json))
        for output, expected in via_grpc.items():
            for got in (via_json[output], via_binary(output)):
                assert got.shape == expected.shape, (name, output)
                if expected.dtype.kind == "O":
                    assert text(got) == text(expected), (name, output)
                else:  # the same runtime computed both: the same values, exactly
                    np.testing.assert_array_equal(got.astype(expected.dtype), expected, err_msg=f"{name} {output}")


# --- trace context --------------------------------------------------------------------------------
async def test_trace_context_and_request_id_reach_the_runtime(
        models: dict[str, Trained], logs: list[dict[str, Any]]) -> None:
    m = InProcessMesh(memory_url(), log_overrides={"access_log": True})
    await m.start(runtimes=1)
    try:
        await m.register("iris", "sklearn", str(models["iris"].path))
        x = models["iris"].x
        code, _ = await call(m, "POST", "/v2/models/iris/infer", v2_body(x),
                             {"traceparent": TRACEPARENT, "x-request-id": "rest-1"})
        assert code == 200
        code, _ = await call(m, "POST", "/v1/models/iris:predict", {"instances": x.tolist()},
                             {"traceparent": TRACEPARENT, "x-request-id": "rest-2"})
        assert code == 200
        code, _ = await call(m, "POST", "/v2/models/iris/infer", v2_body(x))  # no ids of the client's
        assert code == 200
    finally:
        await m.stop()
    routed = [e for e in logs if e["event"] == "request" and e.get("method") == "ModelInfer"]
    answered = [e for e in logs if e["event"] == "inference"]
    assert len(routed) == 3 and len(answered) == 3, (routed, answered)
    for i, request_id in enumerate(("rest-1", "rest-2")):
        for line in (routed[i], answered[i]):  # the router's line and the runtime's own
            assert line["trace_id"] == TRACE_ID and line["request_id"] == request_id, line
            assert line["model_id"] == "iris" and line["code"] == "OK", line
        assert routed[i]["instance_id"] == answered[i]["instance_id"]
    # Without the client's ids: no trace id, and the router's request id is the runtime's.
    assert "trace_id" not in routed[2] and "trace_id" not in answered[2]
    assert routed[2]["request_id"] == answered[2]["request_id"] and routed[2]["request_id"] not in ("rest-1", "rest-2")
    # The cold load ran under the first REST request's trace.
    (loaded,) = [e for e in logs if e["event"] == "model loaded"]
    assert loaded["trace_id"] == TRACE_ID and loaded["reason"] == "request"


# --- metrics --------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    async with aiohttp.ClientSession() as session, session.get(
            f"http://127.0.0.1:{port}/metrics", timeout=aiohttp.ClientTimeout(total=10)) as response:
        body = await response.text()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def count(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], method: str, code: str) -> float:
    key = ("modelmesh_api_request_milliseconds_count", frozenset({("method", method), ("code", code)}))
    return samples.get(key, 0.0)


async def test_rest_requests_are_counted_by_v2_method_and_code(models: dict[str, Trained]) -> None:
    port = free_port()
    m = await started({"iris": models["iris"]}, metrics_port=port)
    try:
        x = models["iris"].x
        before = await scrape(port)
        for _ in range(3):
            assert (await call(m, "POST", "/v2/models/iris/infer", v2_body(x)))[0] == 200
        await triton_call(m, lambda c: c.infer("iris", triton_inputs(x, "FP64", True)))
        assert (await call(m, "POST", "/v1/models/iris:predict", {"instances": x.tolist()}))[0] == 200
        assert (await call(m, "POST", "/v2/models/no-such-model/infer", v2_body(x)))[0] == 404
        assert (await call(m, "POST", "/v2/models/iris/infer", {"inputs": "nope"}))[0] == 400
        assert (await call(m, "GET", "/v2/models/iris"))[0] == 200
        assert (await call(m, "GET", "/v2/health/live"))[0] == 200
        after = await scrape(port)
    finally:
        await m.stop()
    delta = {(method, code): count(after, method, code) - count(before, method, code)
             for method, code in (("ModelInfer", "OK"), ("ModelInfer", "NOT_FOUND"), ("ModelInfer", "INVALID_ARGUMENT"),
                                  ("ModelMetadata", "OK"), ("ServerLive", "OK"))}
    assert delta == {("ModelInfer", "OK"): 5, ("ModelInfer", "NOT_FOUND"): 1, ("ModelInfer", "INVALID_ARGUMENT"): 1,
                     ("ModelMetadata", "OK"): 1, ("ServerLive", "OK"): 1}
