"""The model servers the runtime's external-server adapters are tested against, tested themselves.

Each server is a real process (``tests.support.model_servers.start_server``) on 127.0.0.1, driven
by plain gRPC clients built from mesh.gen's stubs, on real models from tests.support.models.

ModelMesh runtime SPI server (tests.support.spi_server): load, infer by the ``mm-model-id`` header,
modelSize, unload, then NOT_FOUND; every label kind; bad inputs and bad loads answered with precise
statuses; runtimeStatus purges; ``--fail-loads`` after ``--load-delay-s``; ``--hang-loads`` never
answers yet the server stops cleanly on SIGTERM.

Triton stand-in (tests.support.triton_standin): a repository of ONNX models; load (LOADING, then
READY in the index), inference equal to onnxruntime's own, the highest version and
``default_model_filename``; unload, then "Request for unknown model" UNAVAILABLE (NOT_FOUND with
``--unknown-model-code NOT_FOUND``); Triton's codes and messages for failed loads and bad names.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from mesh.gen.inference import grpc_service_pb2 as pb
from mesh.gen.inference import grpc_service_pb2_grpc as pb_grpc
from mesh.gen.inference import repository_pb2 as repo
from mesh.gen.mmesh import model_runtime_pb2 as rt
from mesh.gen.mmesh import model_runtime_pb2_grpc as rt_grpc
from tests.support.model_servers import start_server, stop_server
from tests.support.models import ModelArtifact, assert_outputs_match, make_model

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

T = 10.0  # seconds: the deadline of every call that should answer at once
Input = pb.ModelInferRequest.InferInputTensor


@dataclass
class Server:
    port: int
    channel: grpc.Channel

    @property
    def infer(self) -> pb_grpc.GRPCInferenceServiceStub:
        return pb_grpc.GRPCInferenceServiceStub(self.channel)

    @property
    def spi(self) -> rt_grpc.ModelRuntimeStub:
        return rt_grpc.ModelRuntimeStub(self.channel)

    def repository(self, method: str) -> grpc.UnaryUnaryMultiCallable:
        messages: dict[str, tuple[Any, Any]] = {
            "RepositoryIndex": (repo.RepositoryIndexRequest, repo.RepositoryIndexResponse),
            "RepositoryModelLoad": (repo.RepositoryModelLoadRequest, repo.RepositoryModelLoadResponse),
            "RepositoryModelUnload": (repo.RepositoryModelUnloadRequest, repo.RepositoryModelUnloadResponse),
        }
        request, response = messages[method]
        return self.channel.unary_unary(
            f"/inference.GRPCInferenceService/{method}",
            request_serializer=request.SerializeToString,
            response_deserializer=response.FromString,
        )

    def index(self, ready: bool = False) -> dict[str, tuple[str, str, str]]:
        reply = self.repository("RepositoryIndex")(repo.RepositoryIndexRequest(ready=ready), timeout=T)
        return {m.name: (m.version, m.state, m.reason) for m in reply.models}

    def load(self, name: str, timeout: float = T, **fields: Any) -> None:
        request = repo.RepositoryModelLoadRequest(model_name=name, **fields)
        self.repository("RepositoryModelLoad")(request, timeout=timeout)

    def unload(self, name: str, timeout: float = T) -> None:
        self.repository("RepositoryModelUnload")(repo.RepositoryModelUnloadRequest(model_name=name), timeout=timeout)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModelArtifact]:
    directory = tmp_path_factory.mktemp("models")
    # sklearn seeds: 0 a LogisticRegression pipeline (integer labels), 12 a Ridge regressor
    # (floats), 9 a decision tree with string labels; onnx seeds 0 (iris) and 1 (wine).
    made = {f"sklearn-{s}": make_model("sklearn", directory, s) for s in (0, 9, 12)}
    made |= {f"onnx-{s}": make_model("onnx", directory, s) for s in (0, 1)}
    return made


@contextmanager
def running(module: str, *args: str) -> Iterator[Server]:
    proc, port = start_server(module, *args)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Server(port, channel)
    finally:
        channel.close()
        assert stop_server(proc) == 0, "the server did not stop cleanly on SIGTERM"


def _fails(call: Any, *args: Any, **kwargs: Any) -> grpc.RpcError:
    kwargs.setdefault("timeout", T)
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value


def _infer_request(name: str, x: np.ndarray, input_name: str = "input", typed: bool = False, **fields: Any) -> Any:
    datatype = {np.dtype(np.float32): "FP32", np.dtype(np.float64): "FP64"}[x.dtype]
    tensor = Input(name=input_name, datatype=datatype, shape=list(x.shape))
    if typed:
        getattr(tensor.contents, f"{datatype.lower()}_contents").extend(x.ravel().tolist())
        return pb.ModelInferRequest(model_name=name, inputs=[tensor], **fields)
    return pb.ModelInferRequest(model_name=name, inputs=[tensor], raw_input_contents=[x.tobytes()], **fields)


def _outputs(reply: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    out = {}
    for tensor, raw in zip(reply.outputs, reply.raw_output_contents, strict=True):
        if tensor.datatype == "BYTES":
            values, at = [], 0
            while at < len(raw):
                size = int.from_bytes(raw[at : at + 4], "little")
                values.append(raw[at + 4 : at + 4 + size])
                at += 4 + size
            out[tensor.name] = np.array(values, dtype=object).reshape(list(tensor.shape))
        else:
            dtype = {"FP32": "<f4", "FP64": "<f8", "INT64": "<i8", "INT32": "<i4", "BOOL": "?"}[tensor.datatype]
            out[tensor.name] = np.frombuffer(raw, dtype=dtype).reshape(list(tensor.shape))
    return out


# ---------------------------------------------------------------------------------------------
# ModelMesh runtime SPI server


@pytest.fixture(scope="module")
def spi() -> Iterator[Server]:
    with running("tests.support.spi_server", "--port", "0", "--capacity-bytes", str(3 << 30)) as server:
        yield server


def _load(
    server: Server, model_id: str, path: Path | str, model_type: str = "sklearn", timeout: float = 30
) -> rt.LoadModelResponse:
    request = rt.LoadModelRequest(modelId=model_id, modelType=model_type, modelPath=str(path))
    return server.spi.loadModel(request, timeout=timeout)


def test_spi_runtime_status(spi: Server) -> None:
    status = spi.spi.runtimeStatus(rt.RuntimeStatusRequest(), timeout=T)
    assert status.status == rt.RuntimeStatusResponse.READY
    assert status.capacityInBytes == 3 << 30
    assert (status.maxLoadingConcurrency, status.modelLoadingTimeoutMs) == (2, 30_000)
    assert status.defaultModelSizeInBytes == 1_000_000
    assert status.runtimeVersion == "spi-test-1"
    assert not status.methodInfos  # the model id travels in the mm-model-id header
    assert spi.infer.ServerLive(pb.ServerLiveRequest(), timeout=T).live
    assert spi.infer.ServerReady(pb.ServerReadyRequest(), timeout=T).ready


def test_spi_load_infer_by_header_size_unload(spi: Server, models: dict[str, ModelArtifact]) -> None:
    model = models["sklearn-0"]
    loaded = _load(spi, "iris-lr", model.file)
    assert loaded.sizeInBytes >= 1 and loaded.maxConcurrency == 0
    assert _load(spi, "iris-lr", model.file).sizeInBytes == loaded.sizeInBytes  # loaded already: same answer
    assert spi.infer.ModelReady(pb.ModelReadyRequest(name="iris-lr"), timeout=T).ready

    # The header names the model; the request's own model name is not looked at.
    header = (("mm-model-id", "iris-lr"),)
    request = _infer_request("some-other-name", model.sample, id="req-7")
    reply = spi.infer.ModelInfer(request, metadata=header, timeout=T)
    assert (reply.model_name, reply.id) == ("iris-lr", "req-7")
    assert [(o.name, o.datatype, list(o.shape)) for o in reply.outputs] == [("predict", "INT64", [len(model.sample)])]
    assert_outputs_match(_outputs(reply), model.expected)
    binary_header = (("mm-model-id-bin", b"iris-lr"),)  # the binary form ModelMesh may send
    assert spi.infer.ModelInfer(request, metadata=binary_header, timeout=T).model_name == "iris-lr"

    metadata = spi.infer.ModelMetadata(pb.ModelMetadataRequest(name="ignored"), metadata=header, timeout=T)
    assert metadata.name == "iris-lr" and metadata.outputs[0].datatype == "INT64"
    assert list(metadata.inputs[0].shape) == [-1, model.n_features]

    size = spi.spi.modelSize(rt.ModelSizeRequest(modelId="iris-lr"), timeout=T)
    assert size.sizeInBytes == loaded.sizeInBytes

    spi.spi.unloadModel(rt.UnloadModelRequest(modelId="iris-lr"), timeout=T)
    err = _fails(spi.infer.ModelInfer, request, metadata=header)
    assert (err.code(), err.details()) == (grpc.StatusCode.NOT_FOUND, "model iris-lr is not loaded")
    err = _fails(spi.spi.modelSize, rt.ModelSizeRequest(modelId="iris-lr"))
    assert (err.code(), err.details()) == (grpc.StatusCode.NOT_FOUND, "model iris-lr is not loaded")
    assert not spi.infer.ModelReady(pb.ModelReadyRequest(name="iris-lr"), timeout=T).ready
    # Unloading what is not loaded is fine, as ModelMesh runtimes answer.
    spi.spi.unloadModel(rt.UnloadModelRequest(modelId="iris-lr"), timeout=T)
    spi.spi.unloadModel(rt.UnloadModelRequest(modelId="never-loaded"), timeout=T)


@pytest.mark.parametrize(
    ("key", "input_dtype", "typed", "datatype"),
    [("sklearn-12", np.float64, False, "FP64"), ("sklearn-9", np.float32, True, "BYTES")],
    ids=["regressor-fp64-raw", "string-labels-typed"],
)
def test_spi_label_kinds_and_input_forms(
    spi: Server, models: dict[str, ModelArtifact], key: str, input_dtype: Any, typed: bool, datatype: str
) -> None:
    model = models[key]
    _load(spi, key, model.file)
    try:
        # No header: the request's model name chooses.
        request = _infer_request(key, model.sample.astype(input_dtype), typed=typed)
        reply = spi.infer.ModelInfer(request, timeout=T)
        assert reply.model_name == key and reply.outputs[0].datatype == datatype
        assert_outputs_match(_outputs(reply), model.expected)
    finally:
        spi.spi.unloadModel(rt.UnloadModelRequest(modelId=key), timeout=T)


def test_spi_bad_inputs_are_invalid_argument(spi: Server, models: dict[str, ModelArtifact]) -> None:
    model = models["sklearn-0"]
    _load(spi, "bad-inputs", model.file)
    x = model.sample
    good = _infer_request("bad-inputs", x)
    wrong_dtype = _infer_request("bad-inputs", x)
    wrong_dtype.inputs[0].datatype = "INT64"
    short_raw = _infer_request("bad-inputs", x)
    short_raw.raw_input_contents[0] = x.tobytes()[:-4]
    three_d = _infer_request("bad-inputs", x)
    three_d.inputs[0].shape[:] = [1, *x.shape]
    two_inputs = _infer_request("bad-inputs", x)
    two_inputs.inputs.add(name="again", datatype="FP32", shape=list(x.shape))
    both_forms = _infer_request("bad-inputs", x)
    both_forms.inputs[0].contents.fp32_contents.extend(x.ravel().tolist())
    short_typed = _infer_request("bad-inputs", x[:, :-1], typed=True)
    short_typed.inputs[0].shape[:] = list(x.shape)
    unknown_output = _infer_request("bad-inputs", x, outputs=[{"name": "predict_proba"}])
    cases = {
        "datatype 'INT64' not supported; send FP32 or FP64": wrong_dtype,
        f"raw contents hold {x.nbytes - 4} bytes; shape [8, 4] of FP32 needs {x.nbytes}": short_raw,
        "must be 2-D [rows, features]": three_d,
        "expected exactly 1 input, got 2": two_inputs,
        "sets contents while the request uses raw_input_contents": both_forms,
        "contents hold 24 FP32 values; shape [8, 4] needs 32": short_typed,
        "has no output 'predict_proba'": unknown_output,
        "cannot predict this input": _infer_request("bad-inputs", x[:, :-1]),  # 3 features for 4
    }
    for message, request in cases.items():
        err = _fails(spi.infer.ModelInfer, request)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (message, err.details())
        assert message in err.details()
    assert spi.infer.ModelInfer(good, timeout=T).outputs  # and it still serves
    spi.spi.unloadModel(rt.UnloadModelRequest(modelId="bad-inputs"), timeout=T)


def test_spi_bad_loads_and_size_prediction(spi: Server, models: dict[str, ModelArtifact], tmp_path: Path) -> None:
    model = models["sklearn-0"]
    not_a_pickle = tmp_path / "model.joblib"
    not_a_pickle.write_text("not a pickle")
    cases = [
        ("xgboost", model.file, grpc.StatusCode.INVALID_ARGUMENT, "model type 'xgboost' not supported"),
        ("sklearn", tmp_path / "missing.joblib", grpc.StatusCode.NOT_FOUND, "does not exist"),
        ("sklearn", model.path, grpc.StatusCode.INVALID_ARGUMENT, f"model path {model.path} is not a regular file"),
        ("sklearn", not_a_pickle, grpc.StatusCode.INVALID_ARGUMENT, "cannot load model bad from"),
        ("sklearn", "", grpc.StatusCode.INVALID_ARGUMENT, "modelPath must not be empty"),
    ]
    for model_type, path, code, message in cases:
        err = _fails(_load, spi, "bad", path, model_type)
        assert (err.code(), message in err.details()) == (code, True), err.details()
    predicted = spi.spi.predictModelSize(rt.PredictModelSizeRequest(modelId="p", modelPath=str(model.file)), timeout=T)
    assert predicted.sizeInBytes == math.ceil(model.file.stat().st_size * 1.25)
    err = _fails(spi.spi.predictModelSize, rt.PredictModelSizeRequest(modelId="p", modelPath=str(tmp_path / "none")))
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_spi_runtime_status_purges_loaded_models(spi: Server, models: dict[str, ModelArtifact]) -> None:
    _load(spi, "purged", models["sklearn-0"].file)
    assert spi.infer.ModelReady(pb.ModelReadyRequest(name="purged"), timeout=T).ready
    spi.spi.runtimeStatus(rt.RuntimeStatusRequest(), timeout=T)
    assert not spi.infer.ModelReady(pb.ModelReadyRequest(name="purged"), timeout=T).ready


def test_spi_fail_loads_after_the_delay(models: dict[str, ModelArtifact]) -> None:
    args = ("--port", "0", "--fail-loads", "disk on fire", "--load-delay-s", "0.4")
    with running("tests.support.spi_server", *args) as server:
        started = time.monotonic()
        err = _fails(_load, server, "m", models["sklearn-0"].file)
        assert time.monotonic() - started >= 0.4
        assert (err.code(), err.details()) == (grpc.StatusCode.INTERNAL, "disk on fire")
        assert server.spi.runtimeStatus(rt.RuntimeStatusRequest(), timeout=T).status == rt.RuntimeStatusResponse.READY


def test_spi_hang_loads_never_answer_and_the_server_still_stops(models: dict[str, ModelArtifact]) -> None:
    proc, port = start_server("tests.support.spi_server", "--port", "0", "--hang-loads")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        stub = rt_grpc.ModelRuntimeStub(channel)
        request = rt.LoadModelRequest(modelId="m", modelType="sklearn", modelPath=str(models["sklearn-0"].file))
        err = _fails(stub.loadModel, request, timeout=0.5)
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert stub.runtimeStatus(rt.RuntimeStatusRequest(), timeout=T).status == rt.RuntimeStatusResponse.READY
        pending = stub.loadModel.future(request, timeout=60)  # still hanging when SIGTERM comes
        time.sleep(0.2)
        started = time.monotonic()
        assert stop_server(proc) == 0
        assert time.monotonic() - started < 8  # the 2 s grace, then the hanging call is cancelled
        with pytest.raises(grpc.RpcError):
            pending.result(timeout=T)
    finally:
        channel.close()
        stop_server(proc)


# ---------------------------------------------------------------------------------------------
# Triton stand-in


def _model_dir(root: Path, name: str, config: str, versions: dict[str, bytes | None]) -> Path:
    directory = root / name
    directory.mkdir()
    (directory / "config.pbtxt").write_text(config)
    for relative, data in versions.items():
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if data is not None:
            path.write_bytes(data)
    return directory


def _onnx_config(name: str, max_batch_size: int = 0, extra: str = "") -> str:
    return (
        f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {max_batch_size}\n'
        'input [\n  {\n    name: "input"\n    data_type: TYPE_FP32\n    dims: [ -1, -1 ]\n  }\n]\n'
        "# outputs are read from the model\ninstance_group [ { count: 1, kind: KIND_CPU } ]\n" + extra
    )


@pytest.fixture(scope="module")
def triton_repository(tmp_path_factory: pytest.TempPathFactory, models: dict[str, ModelArtifact]) -> Path:
    root = tmp_path_factory.mktemp("triton-repository")
    iris, wine = models["onnx-0"].file.read_bytes(), models["onnx-1"].file.read_bytes()
    for name in ("iris", "iris-inputs", "spare"):
        _model_dir(root, name, _onnx_config(name, max_batch_size=8), {"1/model.onnx": iris})
    # Versions 1 (not ONNX at all) and 3: the highest loads; a backend named instead of a platform.
    wine_config = 'name: "wine"\nbackend: "onnxruntime"\ndefault_model_filename: "classifier.onnx"\n'
    _model_dir(root, "wine", wine_config, {"1/classifier.onnx": b"garbage", "3/classifier.onnx": wine})
    _model_dir(root, "tf", 'name: "tf"\nplatform: "tensorflow_graphdef"\n', {"1/model.graphdef": b"x"})
    _model_dir(root, "noversion", _onnx_config("noversion"), {})
    _model_dir(root, "nofile", _onnx_config("nofile"), {"1/.keep": b""})
    _model_dir(root, "misnamed", _onnx_config("other-name"), {"1/model.onnx": iris})
    (root / "not-a-model" / "1").mkdir(parents=True)  # no config.pbtxt: not in the index
    return root


@pytest.fixture(scope="module")
def triton(triton_repository: Path) -> Iterator[Server]:
    args = ("--repository", str(triton_repository), "--port", "0", "--load-delay-s", "0.3")
    with running("tests.support.triton_standin", *args) as server:
        yield server


def _ort_outputs(file: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"input": x}), strict=True))


def test_triton_server_metadata_and_index(triton: Server) -> None:
    assert triton.infer.ServerLive(pb.ServerLiveRequest(), timeout=T).live
    assert triton.infer.ServerReady(pb.ServerReadyRequest(), timeout=T).ready
    metadata = triton.infer.ServerMetadata(pb.ServerMetadataRequest(), timeout=T)
    assert metadata.name == "triton" and metadata.version == "2.x-standin"
    assert {"model_repository", "model_repository(unload_dependents)"} <= set(metadata.extensions)
    index = triton.index()
    assert "not-a-model" not in index
    assert {"iris", "wine", "tf", "noversion", "nofile", "misnamed", "spare"} <= set(index)
    assert index["spare"] == ("", "", "")  # never loaded: a name and nothing else
    assert "spare" not in triton.index(ready=True)


def test_triton_load_infer_unload(triton: Server, models: dict[str, ModelArtifact]) -> None:
    model = models["onnx-0"]
    assert not triton.infer.ModelReady(pb.ModelReadyRequest(name="iris"), timeout=T).ready
    load = triton.repository("RepositoryModelLoad")
    pending = load.future(repo.RepositoryModelLoadRequest(model_name="iris"), timeout=T)
    deadline = time.monotonic() + 5
    while triton.index()["iris"][1] != "LOADING" and not pending.done() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert triton.index()["iris"] == ("1", "LOADING", "")  # --load-delay-s keeps it there a while
    pending.result()
    assert triton.index()["iris"] == ("1", "READY", "")
    assert "iris" in triton.index(ready=True)
    assert triton.infer.ModelReady(pb.ModelReadyRequest(name="iris"), timeout=T).ready

    metadata = triton.infer.ModelMetadata(pb.ModelMetadataRequest(name="iris"), timeout=T)
    assert (metadata.platform, list(metadata.versions)) == ("onnxruntime_onnx", ["1"])
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("input", "FP32", [-1, 4])]
    assert [(t.name, t.datatype) for t in metadata.outputs] == [("label", "INT64"), ("probabilities", "FP32")]

    own = _ort_outputs(model.file, model.sample)
    reply = triton.infer.ModelInfer(_infer_request("iris", model.sample, id="r-1"), timeout=T)
    assert (reply.model_name, reply.model_version, reply.id) == ("iris", "1", "r-1")
    served = _outputs(reply)
    assert list(served) == ["label", "probabilities"]
    for name, want in own.items():
        np.testing.assert_array_equal(served[name], want, err_msg=name)
    assert_outputs_match({"label": served["label"]}, {"label": model.expected["label"]})

    typed = _infer_request("iris", model.sample, typed=True, outputs=[{"name": "probabilities"}])
    only = _outputs(triton.infer.ModelInfer(typed, timeout=T))
    assert list(only) == ["probabilities"]
    np.testing.assert_array_equal(only["probabilities"], own["probabilities"])

    triton.unload("iris")
    assert triton.index()["iris"] == ("1", "UNAVAILABLE", "unloaded")
    assert not triton.infer.ModelReady(pb.ModelReadyRequest(name="iris"), timeout=T).ready
    err = _fails(triton.infer.ModelInfer, _infer_request("iris", model.sample))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert err.details() == "Request for unknown model: 'iris' has no available versions"
    err = _fails(triton.infer.ModelInfer, _infer_request("ghost", model.sample))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert err.details() == "Request for unknown model: 'ghost' is not found"
    triton.unload("iris")  # unloading again, or what never loaded, is OK as in Triton
    triton.unload("ghost")

    triton.load("iris")  # and it loads again
    assert triton.infer.ModelInfer(_infer_request("iris", model.sample), timeout=T).outputs


def test_triton_highest_version_and_default_model_filename(triton: Server, models: dict[str, ModelArtifact]) -> None:
    model = models["onnx-1"]
    triton.load("wine")
    assert triton.index()["wine"] == ("3", "READY", "")
    reply = triton.infer.ModelInfer(_infer_request("wine", model.sample), timeout=T)
    assert reply.model_version == "3"
    served = _outputs(reply)
    for name, want in _ort_outputs(model.file, model.sample).items():
        np.testing.assert_array_equal(served[name], want, err_msg=name)
    triton.unload("wine")


def test_triton_failed_loads_answer_as_triton_does(triton: Server, triton_repository: Path) -> None:
    invalid, internal = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL
    backend = (
        "load failed for model 'tf': version 1 is at UNAVAILABLE state: Invalid argument: unable to find backend "
        "library for backend 'tensorflow', try specifying runtime on the model configuration.;"
    )
    missing = triton_repository / "nofile" / "1" / "model.onnx"
    cases = {
        "ghost": (internal, "failed to load 'ghost', failed to poll from model repository"),
        "misnamed": (internal, "failed to load 'misnamed', failed to poll from model repository"),
        "noversion": (
            invalid,
            "load failed for model 'noversion': at least one version must be available under the version "
            "policy of model 'noversion'",
        ),
        "tf": (invalid, backend),
        "nofile": (
            invalid,
            f"load failed for model 'nofile': version 1 is at UNAVAILABLE state: Unavailable: unable to find "
            f"'{missing}' for model instance 'nofile_0_0';",
        ),
        "../iris": (invalid, "invalid model name '../iris', model name must not contain path traversal characters"),
        "iris/1": (invalid, "invalid model name 'iris/1', model name must not contain path traversal characters"),
        "..": (invalid, "invalid model name '..', model name must not contain path traversal characters"),
    }
    for name, (code, message) in cases.items():
        err = _fails(triton.load, name)
        assert (err.code(), err.details().strip()) == (code, message), name
    index = triton.index()
    assert index["tf"] == ("1", "UNAVAILABLE", backend.split("UNAVAILABLE state: ")[1].rstrip(";"))
    assert index["nofile"][:2] == ("1", "UNAVAILABLE")
    assert "ghost" not in index and "misnamed" in index and index["misnamed"] == ("", "", "")

    err = _fails(triton.load, "iris", repository_name="elsewhere")
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED
    assert err.details() == "'repository_name' specification is not supported"
    err = _fails(triton.load, "iris", parameters={"config": repo.ModelRepositoryParameter(string_param="{}")})
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED


def test_triton_bad_inference_inputs(triton: Server, models: dict[str, ModelArtifact]) -> None:
    x = models["onnx-0"].sample
    triton.load("iris-inputs")
    prefix = "[request id: <id_unknown>] "
    fp64 = _infer_request("iris-inputs", x.astype(np.float64))
    wrong_name = _infer_request("iris-inputs", x, input_name="features")
    short_raw = _infer_request("iris-inputs", x)
    short_raw.raw_input_contents[0] = x.tobytes()[:-4]
    both_forms = _infer_request("iris-inputs", x)
    both_forms.inputs[0].contents.fp32_contents.extend(x.ravel().tolist())
    rank_three = _infer_request("iris-inputs", x)
    rank_three.inputs[0].shape[:] = [1, *x.shape]
    big_batch = _infer_request("iris-inputs", np.concatenate([x, x[:1]]))
    cases = {
        "inference input 'input' data-type is 'FP64', but model 'iris-inputs' expects 'FP32'": fp64,
        "unexpected inference input 'features' for model 'iris-inputs'": wrong_name,
        f"unexpected total byte size {x.nbytes - 4} for input 'input', expecting {x.nbytes}": short_raw,
        "contents field must not be specified when using raw_input_contents for 'input'": both_forms,
        "unexpected shape for input 'input' for model 'iris-inputs'. Expected [-1, 4], got [1, 8, 4]": rank_three,
        "inference request batch-size must be <= 8 for 'iris-inputs'": big_batch,
        "unexpected inference output 'nope' for model 'iris-inputs'": _infer_request(
            "iris-inputs", x, outputs=[{"name": "nope"}]
        ),
    }
    for message, request in cases.items():
        err = _fails(triton.infer.ModelInfer, request)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (message, err.details())
        assert err.details() == prefix + message or err.details().startswith(prefix + message), err.details()
    assert triton.infer.ModelInfer(_infer_request("iris-inputs", x), timeout=T).outputs  # still serving
    triton.unload("iris-inputs")


def test_triton_current_releases_answer_not_found(triton_repository: Path, models: dict[str, ModelArtifact]) -> None:
    args = ("--repository", str(triton_repository), "--port", "0", "--unknown-model-code", "NOT_FOUND")
    with running("tests.support.triton_standin", *args) as server:
        err = _fails(server.infer.ModelInfer, _infer_request("spare", models["onnx-0"].sample))
        assert err.code() == grpc.StatusCode.NOT_FOUND
        assert err.details() == "Request for unknown model: 'spare' is not found"
