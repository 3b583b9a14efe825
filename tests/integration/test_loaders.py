"""The built-in loaders against real models of every format, through the V2 codec.

Each model comes from ``tests.support.models`` (trained here, in this process), is loaded by its
loader, and answers a request that goes through the whole data path: encode_request -> bytes ->
decode_inputs -> predict -> encode_response -> bytes -> decode_response. Its answer must equal
what the model's own library computed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from mesh.errors import InvalidArgument, ModelLoadError, NotHere
from mesh.gen.inference import grpc_service_pb2 as pb
from mesh.runtime import gpu
from mesh.runtime.loaders import get_loader, supported_types
from mesh.runtime.loaders.base import LoadedModel, file_size, resolve_path
from mesh.runtime.loaders.sizing import deep_nbytes
from mesh.runtime.tensors import (
    decode_inputs,
    decode_response,
    encode_request,
    encode_response,
    requested_outputs,
)
from tests.support.models import KINDS, ModelArtifact, assert_outputs_match, make_model

# Seeds 0-14 cover every sklearn variant (pipeline, tree, forest, string labels, regressor) on
# every dataset; the other kinds vary the dataset and the file extension with the seed.
CASES = [(kind, seed) for kind in KINDS for seed in range(6)] + [("sklearn", s) for s in range(6, 15)]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


_artifacts: dict[tuple[str, int], ModelArtifact] = {}


def artifact(models_dir: Path, kind: str, seed: int) -> ModelArtifact:
    if (kind, seed) not in _artifacts:
        _artifacts[kind, seed] = make_model(kind, models_dir, seed)
    return _artifacts[kind, seed]


def load(a: ModelArtifact, path: Path | None = None) -> LoadedModel:
    return get_loader(a.type).load(f"{a.type}-model", path or a.path, {}, "ram")


def serve(
    model: LoadedModel, inputs: dict[str, np.ndarray], raw: bool, outputs: list[str] | None = None
) -> dict[str, np.ndarray]:
    """One inference through the whole V2 data path, wire bytes included."""
    req = encode_request(model_name="m", inputs=inputs, raw=raw, outputs=outputs or [])
    req = pb.ModelInferRequest.FromString(req.SerializeToString())
    out = model.predict(decode_inputs(req), requested_outputs(req))
    resp = encode_response(
        model_name="m", model_version="1", request_id="r", outputs=out, raw=len(req.raw_input_contents) > 0
    )
    return decode_response(pb.ModelInferResponse.FromString(resp.SerializeToString()))


# --- predictions ------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
@pytest.mark.parametrize(("kind", "seed"), CASES)
def test_round_trip_matches_the_library(models_dir: Path, kind: str, seed: int, raw: bool) -> None:
    a = artifact(models_dir, kind, seed)
    model = load(a)
    assert model.type == kind and model.device == "ram"
    # "x" is not the model's input name: single-input models accept any name.
    assert_outputs_match(serve(model, {"x": a.sample}, raw), a.expected, rtol=1e-5, atol=1e-5)
    model.close()


@pytest.mark.parametrize("kind", KINDS)
def test_file_path_and_file_uri_load_too(models_dir: Path, kind: str) -> None:
    a = artifact(models_dir, kind, 0)
    for path in (a.file, resolve_path(a.file.as_uri()), resolve_path(a.path.as_uri())):
        assert_outputs_match(serve(load(a, path), {"x": a.sample}, True), a.expected, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_metadata_describes_the_model(models_dir: Path, kind: str) -> None:
    a = artifact(models_dir, kind, 1)
    model = load(a)
    assert model.platform
    assert model.inputs and model.outputs
    assert set(model.default_outputs) <= {o.name for o in model.outputs}
    assert model.default_outputs == list(a.expected)
    for spec in (*model.inputs, *model.outputs):
        assert spec.to_pb().name == spec.name


def test_sklearn_predict_proba_only_when_requested(models_dir: Path) -> None:
    a = artifact(models_dir, "sklearn", 0)
    model = load(a)
    assert list(serve(model, {"x": a.sample}, True)) == ["predict"]
    both = serve(model, {"x": a.sample}, True, ["predict_proba", "predict"])
    assert list(both) == ["predict_proba", "predict"]
    assert_outputs_match({"predict_proba": both["predict_proba"]}, a.on_request)
    assert_outputs_match({"predict": both["predict"]}, a.expected)


def test_sklearn_string_labels_are_bytes(models_dir: Path) -> None:
    a = artifact(models_dir, "sklearn", 9)  # variant 3: string labels
    model = load(a)
    assert model.outputs[0].datatype == "BYTES"
    got = serve(model, {"x": a.sample}, False)["predict"]
    assert all(isinstance(v, bytes) for v in got)
    assert_outputs_match({"predict": got}, a.expected)


def test_sklearn_regressor_has_no_predict_proba(models_dir: Path) -> None:
    a = artifact(models_dir, "sklearn", 12)  # variant 4: a regressor
    model = load(a)
    assert [o.name for o in model.outputs] == ["predict"]
    assert model.outputs[0].datatype == "FP64"
    with pytest.raises(InvalidArgument, match="unknown output 'predict_proba'"):
        model.predict({"x": a.sample}, ["predict_proba"])


@pytest.mark.parametrize("kind", ["sklearn", "xgboost", "lightgbm"])
def test_tabular_feature_count_is_checked(models_dir: Path, kind: str) -> None:
    a = artifact(models_dir, kind, 0)  # iris: 4 features
    model = load(a)
    with pytest.raises(InvalidArgument) as info:
        model.predict({"x": a.sample[:, :3]})
    assert info.value.message == "input 'x': model expects 4 features, input has 3"


@pytest.mark.parametrize("kind", ["sklearn", "xgboost", "lightgbm"])
def test_tabular_input_rules(models_dir: Path, kind: str) -> None:
    model = load(artifact(models_dir, kind, 0))
    with pytest.raises(InvalidArgument, match="exactly one input, the request has 2"):
        model.predict({"a": np.zeros((1, 4)), "b": np.zeros((1, 4))})
    with pytest.raises(InvalidArgument, match=r"input 'a': .* 2-D input .* got shape \[4\]"):
        model.predict({"a": np.zeros(4)})
    with pytest.raises(InvalidArgument, match=r"input 'a': .* take numbers"):
        model.predict({"a": np.array([[b"x"] * 4], dtype=object)})
    # FP64 and integers are accepted as well as FP32.
    assert model.predict({"a": np.ones((2, 4))})
    assert model.predict({"a": np.ones((2, 4), dtype=np.int64)})


def test_sklearn_nan_input_is_invalid_argument(models_dir: Path) -> None:
    model = load(artifact(models_dir, "sklearn", 0))
    with pytest.raises(InvalidArgument, match="sklearn: the model refused the input"):
        model.predict({"x": np.full((1, 4), np.nan)})


def test_unknown_output_lists_the_models_outputs(models_dir: Path) -> None:
    model = load(artifact(models_dir, "onnx", 0))
    with pytest.raises(InvalidArgument) as info:
        model.predict({"x": np.zeros((1, 4), np.float32)}, ["nope"])
    assert "'nope'" in info.value.message and "['label', 'probabilities']" in info.value.message


def test_onnx_requested_output_subset(models_dir: Path) -> None:
    a = artifact(models_dir, "onnx", 0)
    got = serve(load(a), {"input": a.sample}, True, ["probabilities"])
    assert_outputs_match(got, {"probabilities": a.expected["probabilities"]}, atol=1e-5)


def test_onnx_casts_safely_and_refuses_the_rest(models_dir: Path) -> None:
    a = artifact(models_dir, "onnx", 0)
    model = load(a)
    as_fp64 = model.predict({"input": a.sample.astype(np.float64)})
    assert_outputs_match(as_fp64, a.expected, atol=1e-5)
    assert model.predict({"input": np.ones((1, 4), np.int64)})["label"].shape == (1,)
    with pytest.raises(InvalidArgument, match=r"input 'input': the model takes tensor\(float\), got BYTES"):
        model.predict({"input": np.array([[b"1"] * 4], dtype=object)})
    with pytest.raises(InvalidArgument, match=r"'input': the model takes shape \[-1, 4\], got \[1, 3\]"):
        model.predict({"input": np.ones((1, 3), np.float32)})


def _two_input_onnx(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["sum"]), helper.make_node("Mul", ["a", "k"], ["scaled"])],
        "two_inputs",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 3]),
        ],
        [
            helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("scaled", TensorProto.FLOAT, ["N", 3]),
        ],
        initializer=[helper.make_tensor("k", TensorProto.FLOAT, [3], [1.0, 2.0, 3.0])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path / "model.onnx")
    return path


def test_onnx_inputs_by_name(tmp_path: Path) -> None:
    model = get_loader("onnx").load("two", _two_input_onnx(tmp_path / "two"), {}, "ram")
    assert [i.name for i in model.inputs] == ["a", "b"]
    assert model.inputs[0].shape == (-1, 3)
    a = np.ones((2, 3), np.float32)
    b = np.arange(6, dtype=np.float32).reshape(2, 3)
    got = serve(model, {"b": b, "a": a}, True)
    np.testing.assert_array_equal(got["sum"], a + b)
    np.testing.assert_array_equal(got["scaled"], a * np.array([1, 2, 3], np.float32))
    with pytest.raises(InvalidArgument, match="missing input 'b'"):
        model.predict({"a": a, "c": b})
    with pytest.raises(InvalidArgument, match="unknown input 'c'"):
        model.predict({"a": a, "b": b, "c": b})
    assert model.footprint_bytes() == 12  # the initializer k: 3 x float32


def test_onnx_zipmap_output_is_refused_at_load(tmp_path: Path) -> None:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    x, y = load_iris(return_X_y=True)
    onx = convert_sklearn(
        LogisticRegression(max_iter=500).fit(x, y), initial_types=[("input", FloatTensorType([None, 4]))]
    )
    (tmp_path / "model.onnx").write_bytes(onx.SerializeToString())
    with pytest.raises(ModelLoadError, match=r"output_probability.*zipmap=False"):
        get_loader("onnx").load("z", tmp_path, {}, "ram")


def test_torchscript_inputs_are_positional(models_dir: Path) -> None:
    a = artifact(models_dir, "torchscript", 0)
    model = load(a)
    assert [i.name for i in model.inputs] == ["x"]
    assert [o.name for o in model.outputs] == ["output__0", "output__1"]
    with pytest.raises(InvalidArgument, match="takes 1 to 1 inputs in order, the request has 2"):
        model.predict({"p": a.sample, "q": a.sample})
    with pytest.raises(InvalidArgument, match="torchscript: forward failed"):
        model.predict({"p": a.sample.astype(np.float64)})  # the Linear layers want float32
    with pytest.raises(InvalidArgument, match="take numbers"):
        model.predict({"p": np.array([b"x"], dtype=object)})
    # The request's arrays are read-only views; the model gets a copy it may write into.
    arr = np.frombuffer(a.sample.tobytes(), dtype=np.float32).reshape(a.sample.shape)
    assert_outputs_match(model.predict({"p": arr}), a.expected)


def test_torchscript_list_output_is_refused_at_load(tmp_path: Path) -> None:
    import torch

    from tests.support.torch_mlp import ListOutput

    torch.jit.script(ListOutput()).save(str(tmp_path / "model.pt"))
    with pytest.raises(ModelLoadError, match=r"forward returns List\[Tensor\]; only a Tensor or a tuple"):
        get_loader("pytorch").load("l", tmp_path, {}, "ram")


@pytest.mark.parametrize("kind", KINDS)
def test_concurrent_predictions_are_consistent(models_dir: Path, kind: str) -> None:
    a = artifact(models_dir, kind, 2)
    model = load(a)
    failures: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(30):
                assert_outputs_match(model.predict({"x": a.sample}), a.expected, atol=1e-5)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[0]


@pytest.mark.parametrize("kind", KINDS)
def test_predict_after_close_is_not_here(models_dir: Path, kind: str) -> None:
    a = artifact(models_dir, kind, 0)
    model = load(a)
    model.close()
    model.close()  # idempotent
    with pytest.raises(NotHere, match="unloaded"):
        model.predict({"x": a.sample})


# --- footprints -------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "seed"), [(k, s) for k in KINDS for s in range(3)])
def test_footprint_is_positive_and_plausible(models_dir: Path, kind: str, seed: int) -> None:
    a = artifact(models_dir, kind, seed)
    footprint = load(a).footprint_bytes()
    assert 0 < footprint < 1_000_000  # these models are tiny
    if kind == "lightgbm":
        assert footprint == a.file.stat().st_size  # the text model is the file
    if kind == "xgboost":
        import xgboost

        booster = xgboost.Booster(model_file=str(a.file))
        assert footprint == len(booster.save_raw("ubj"))
    if kind == "torchscript":
        import torch

        module = torch.jit.load(str(a.file))
        tensors = [*module.parameters(), *module.buffers()]
        assert footprint == sum(t.numel() * t.element_size() for t in tensors)
    if kind == "onnx":
        n, k = a.n_features, a.expected["probabilities"].shape[1]
        coefficients = 4 * (n * (k if k > 2 else 1))
        assert coefficients < footprint < a.file.stat().st_size


def test_sklearn_footprint_counts_trees_and_pipelines(models_dir: Path) -> None:
    import joblib

    forest_a = artifact(models_dir, "sklearn", 6)  # variant 2: RandomForest
    forest = joblib.load(forest_a.file)
    node_bytes = sum(
        e.tree_.__getstate__()["nodes"].nbytes + e.tree_.__getstate__()["values"].nbytes
        for e in forest.estimators_
    )
    footprint = load(forest_a).footprint_bytes()
    assert node_bytes < footprint < node_bytes + 200_000

    pipe_a = artifact(models_dir, "sklearn", 0)  # variant 0: StandardScaler + LogisticRegression
    pipe = joblib.load(pipe_a.file)
    arrays = pipe[-1].coef_.nbytes + pipe[0].mean_.nbytes + pipe[0].scale_.nbytes
    assert arrays < load(pipe_a).footprint_bytes()


def test_deep_nbytes_counts_shared_arrays_and_views_once() -> None:
    big = np.zeros(100_000)
    alone = deep_nbytes(big)
    assert 800_000 <= alone < 801_000
    shared = {"a": big, "b": [big, big[10:20]], "c": (big.reshape(1000, 100),)}
    assert alone < deep_nbytes(shared) < alone + 2_000
    assert deep_nbytes([np.zeros(10), np.zeros(10)]) > 2 * 80


# --- failures ---------------------------------------------------------------------------------


_EXTENSION = {
    "sklearn": ".joblib",
    "xgboost": ".json",
    "lightgbm": ".txt",
    "onnx": ".onnx",
    "torchscript": ".pt",
}


@pytest.mark.parametrize("kind", KINDS)
def test_corrupt_file_is_a_load_error_with_the_reason(tmp_path: Path, kind: str) -> None:
    file = tmp_path / f"model{_EXTENSION[kind]}"
    file.write_bytes(b"\x00this is not a model\xff" * 10)
    with pytest.raises(ModelLoadError) as info:
        get_loader(kind).load("bad", tmp_path, {}, "ram")
    message = info.value.message
    assert message.startswith(f"{kind}: cannot load {file}: "), message
    assert len(message) > len(f"{kind}: cannot load {file}: ")
    assert "Stack trace" not in message


def test_sklearn_file_without_an_estimator(tmp_path: Path) -> None:
    import joblib

    joblib.dump({"not": "a model"}, tmp_path / "model.joblib")
    with pytest.raises(ModelLoadError, match="holds a dict, which has no predict"):
        get_loader("sklearn").load("d", tmp_path, {}, "ram")


def test_missing_library_is_reported(models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = artifact(models_dir, "lightgbm", 0)
    monkeypatch.setitem(sys.modules, "lightgbm", None)  # makes ``import lightgbm`` fail
    with pytest.raises(ModelLoadError, match="lightgbm: the library for this model type is not installed"):
        load(a)


def test_missing_path() -> None:
    with pytest.raises(ModelLoadError, match=r"model path '/nonexistent/model\.joblib' does not exist"):
        resolve_path("/nonexistent/model.joblib")
    with pytest.raises(ModelLoadError, match="'/nonexistent/m' does not exist"):
        resolve_path("file:///nonexistent/m")
    with pytest.raises(ModelLoadError, match="no storage path"):
        resolve_path("")


@pytest.mark.parametrize("uri", ["s3://bucket/model", "gs://b/m", "HTTPS://host/m"])
def test_unsupported_uri_scheme(uri: str) -> None:
    scheme = uri.split(":", 1)[0].lower()
    with pytest.raises(ModelLoadError) as info:
        resolve_path(uri)
    assert info.value.message == (
        f"unsupported storage URI scheme {scheme!r}; only local paths and file:// are supported"
    )


def test_file_uri_with_a_remote_host(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="names host 'elsewhere'"):
        resolve_path(f"file://elsewhere{tmp_path}")


def test_file_uri_is_percent_decoded(tmp_path: Path) -> None:
    (tmp_path / "a model").mkdir()
    assert resolve_path((tmp_path / "a model").as_uri()) == tmp_path / "a model"


def test_directory_without_or_with_several_model_files(tmp_path: Path, models_dir: Path) -> None:
    (tmp_path / "README.txt").write_text("not a model")
    with pytest.raises(ModelLoadError, match=r"sklearn: no \.joblib/\.pkl/\.pickle/\.skops file in"):
        get_loader("sklearn").load("m", tmp_path, {}, "ram")
    a = artifact(models_dir, "onnx", 0)
    for name in ("a.onnx", "nested/b.onnx"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(a.file.read_bytes())
    with pytest.raises(ModelLoadError, match=r"several \.onnx files \(a\.onnx, nested/b\.onnx\)"):
        get_loader("onnx").load("m", tmp_path, {}, "ram")
    (tmp_path / "a.onnx").rename(tmp_path / ".a.onnx")  # hidden files are ignored
    assert get_loader("onnx").load("m", tmp_path, {}, "ram").outputs


def test_file_size(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_bytes(b"12345")
    (tmp_path / "y").write_bytes(b"123")
    assert file_size(tmp_path / "y") == 3
    assert file_size(tmp_path) == 8
    assert file_size(tmp_path / "missing") == 0


def test_unknown_type_lists_supported_types() -> None:
    with pytest.raises(InvalidArgument) as info:
        get_loader("tensorflow")
    assert "unknown model type 'tensorflow'" in info.value.message
    assert "lightgbm, onnx, sklearn, torchscript, xgboost" in info.value.message


def test_type_names_and_aliases() -> None:
    assert supported_types() == ["lightgbm", "onnx", "sklearn", "torchscript", "xgboost"]
    assert get_loader("Scikit-Learn") is get_loader("sklearn")
    assert get_loader("PyTorch") is get_loader("torchscript")
    for t in ("XGBoost", "LightGBM", "ONNX"):
        assert get_loader(t).type == t.lower()


@pytest.mark.parametrize("kind", ["sklearn", "xgboost", "lightgbm"])
def test_ram_only_loaders_refuse_a_gpu(models_dir: Path, kind: str) -> None:
    a = artifact(models_dir, kind, 0)
    assert not get_loader(kind).supports_gpu
    with pytest.raises(ModelLoadError, match=f"{kind}: this loader runs models in RAM only, not on gpu0"):
        get_loader(kind).load("g", a.path, {}, "gpu0")


@pytest.mark.skipif(gpu.gpu_devices() != [], reason="this machine has a GPU")
@pytest.mark.parametrize(
    ("kind", "message"), [("onnx", "no CUDAExecutionProvider"), ("torchscript", "torch sees 0 CUDA device")]
)
def test_gpu_loaders_without_a_gpu(models_dir: Path, kind: str, message: str) -> None:
    a = artifact(models_dir, kind, 0)
    with pytest.raises(ModelLoadError, match=message):
        get_loader(kind).load("g", a.path, {}, "gpu0")


def test_unknown_device(models_dir: Path) -> None:
    path = artifact(models_dir, "sklearn", 0).path
    with pytest.raises(ModelLoadError, match="unknown device 'tpu0'"):
        get_loader("sklearn").load("t", path, {}, "tpu0")


# --- process-level properties ----------------------------------------------------------------


def test_importing_the_loaders_imports_no_model_library() -> None:
    code = (
        "import sys, mesh.runtime.loaders, mesh.runtime.tensors, mesh.runtime.gpu\n"
        "heavy = ['torch', 'xgboost', 'lightgbm', 'onnxruntime', 'onnx', 'sklearn', 'grpc']\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


@pytest.mark.skipif(gpu.gpu_devices() != [], reason="this machine has a GPU")
def test_gpu_fallback_without_nvml() -> None:
    reader = gpu.NvmlReader()
    assert reader.devices() == []
    assert reader.devices() == []  # the failed init is remembered, and still answers []
    assert reader.process_used(0, os.getpid()) is None
    assert gpu.gpu_devices() == []
