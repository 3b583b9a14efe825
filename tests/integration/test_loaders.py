"""The built-in loaders against real models of every format, through the V2 codec.

Each model comes from ``tests.support.models`` (trained here, in this process), is loaded by its
loader, and answers a request that goes through the whole data path: encode_request -> bytes ->
decode_inputs -> predict -> encode_response -> bytes -> decode_response. Its answer must equal
what the model's own library computed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mesh.errors import InvalidArgument, ModelLoadError, NotHere
from mesh.gen.inference import grpc_service_pb2 as pb
from mesh.runtime import gpu
from mesh.runtime.loaders import get_loader, supported_types
from mesh.runtime.loaders.base import LoadedModel, LoadPolicy, file_size, resolve_path
from mesh.runtime.loaders.sizing import deep_nbytes
from mesh.tensors import (
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


@pytest.mark.parametrize("kind", ["sklearn", "xgboost", "lightgbm"])
@pytest.mark.parametrize("seed", [0, 2])  # iris (3 classes), breast_cancer (binary)
def test_predict_proba_only_when_requested(models_dir: Path, kind: str, seed: int) -> None:
    a = artifact(models_dir, kind, seed)
    model = load(a)
    assert list(serve(model, {"x": a.sample}, True)) == ["predict"]
    both = serve(model, {"x": a.sample}, True, ["predict_proba", "predict"])
    assert list(both) == ["predict_proba", "predict"]
    assert_outputs_match({"predict_proba": both["predict_proba"]}, a.on_request)
    assert_outputs_match({"predict": both["predict"]}, a.expected)
    assert both["predict_proba"].shape[1] == (2 if seed == 2 else 3)


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


# --- XGBoost and LightGBM: what each objective serves -------------------------------------------
# Per objective, a Booster trained with it and saved as a user would: ``predict`` must be the
# labels the library's scikit-learn wrapper gives for that file, ``predict_proba`` what the
# Booster itself returns (the output once served as ``predict``), and regression unchanged.


def _xgb_booster(tmp_path: Path, objective: str, dataset: str, **params: object) -> tuple[Path, np.ndarray]:
    import xgboost
    from sklearn import datasets

    x, y = getattr(datasets, f"load_{dataset}")(return_X_y=True)
    x = x.astype(np.float32)
    if objective.startswith("reg:"):
        y = x[:, 0]
    all_params = {"objective": objective, "max_depth": 2, "nthread": 1, "seed": 0, **params}
    booster = xgboost.train(all_params, xgboost.DMatrix(x, y), num_boost_round=4)
    file = tmp_path / f"{objective.replace(':', '-')}.json"
    booster.save_model(str(file))
    return file, x[::7]  # rows of every class


def _xgb_classifier(file: Path) -> Any:
    import xgboost

    wrapper = xgboost.XGBClassifier()
    wrapper.load_model(str(file))
    return wrapper


def _xgb_old_output(file: Path, x: np.ndarray, **kwargs: object) -> np.ndarray:
    import xgboost

    return np.asarray(xgboost.Booster(model_file=str(file)).inplace_predict(x, **kwargs))


def _outputs(model: LoadedModel) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(o.name, o.datatype, tuple(o.shape)) for o in model.outputs]


@pytest.mark.parametrize(("objective", "dataset", "classes"),
                         [("binary:logistic", "breast_cancer", 2), ("multi:softprob", "iris", 3),
                          ("multi:softmax", "iris", 3)])
def test_xgboost_classifier_serves_labels_and_probabilities(tmp_path: Path, objective: str, dataset: str,
                                                            classes: int) -> None:
    extra = {"num_class": classes} if objective.startswith("multi:") else {}
    file, x = _xgb_booster(tmp_path, objective, dataset, **extra)
    model = get_loader("xgboost").load("m", file, {}, "ram")
    assert _outputs(model) == [("predict", "INT64", (-1,)), ("predict_proba", "FP32", (-1, classes))]
    assert model.default_outputs == ["predict"]
    wrapper = _xgb_classifier(file)
    labels = wrapper.predict(x)
    assert len(set(labels.tolist())) == classes  # the rows cover every class: the test can fail
    got = serve(model, {"x": x}, False, ["predict", "predict_proba"])
    assert got["predict"].dtype == np.int64 and got["predict_proba"].dtype == np.float32
    np.testing.assert_array_equal(got["predict"], labels)
    np.testing.assert_allclose(got["predict_proba"], wrapper.predict_proba(x), rtol=1e-6, atol=1e-6)
    old = _xgb_old_output(file, x)
    if objective == "binary:logistic":
        np.testing.assert_array_equal(got["predict_proba"][:, 1], old)  # the old `predict`, as column 1
        np.testing.assert_allclose(got["predict_proba"].sum(axis=1), 1, rtol=1e-6)
    elif objective == "multi:softprob":
        np.testing.assert_array_equal(got["predict_proba"], old)
    else:
        np.testing.assert_array_equal(got["predict"], old)  # softmax's index, now an integer
    assert list(serve(model, {"x": x}, True)) == ["predict"]


def test_xgboost_logitraw_is_served_as_logistic_would_be(tmp_path: Path) -> None:
    """A logitraw margin goes through the logistic function: ``predict`` is 1 where the margin is
    > 0. (XGBClassifier compares the margin itself with 0.5, which this asserts we do not copy.)"""
    file, x = _xgb_booster(tmp_path, "binary:logitraw", "breast_cancer")
    model = get_loader("xgboost").load("m", file, {}, "ram")
    assert _outputs(model) == [("predict", "INT64", (-1,)), ("predict_proba", "FP32", (-1, 2))]
    margin = _xgb_old_output(file, x)
    got = serve(model, {"x": x}, True, ["predict", "predict_proba"])
    np.testing.assert_allclose(got["predict_proba"][:, 1], 1 / (1 + np.exp(-margin.astype(np.float64))), rtol=1e-6)
    np.testing.assert_array_equal(got["predict"], (margin > 0).astype(np.int64))
    assert ((margin > 0) & (margin <= 0.5)).any()  # rows where the wrapper's threshold would differ
    assert set(got["predict"].tolist()) == {0, 1}


def test_xgboost_multi_label_serves_one_label_per_target(tmp_path: Path) -> None:
    import xgboost
    from sklearn.datasets import make_multilabel_classification

    x, y = make_multilabel_classification(n_samples=200, n_classes=3, random_state=0)
    x = x.astype(np.float32)
    xgboost.XGBClassifier(n_estimators=4, max_depth=2, tree_method="hist", n_jobs=1).fit(x, y).save_model(
        tmp_path / "labels.json")
    model = get_loader("xgboost").load("m", tmp_path / "labels.json", {}, "ram")
    assert _outputs(model) == [("predict", "INT64", (-1, 3)), ("predict_proba", "FP32", (-1, 3))]
    wrapper = _xgb_classifier(tmp_path / "labels.json")
    got = serve(model, {"x": x[:20]}, True, ["predict", "predict_proba"])
    np.testing.assert_array_equal(got["predict"], wrapper.predict(x[:20]))
    np.testing.assert_array_equal(got["predict_proba"], _xgb_old_output(tmp_path / "labels.json", x[:20]))


def test_xgboost_hinge_serves_labels_without_probabilities(tmp_path: Path) -> None:
    file, x = _xgb_booster(tmp_path, "binary:hinge", "breast_cancer")
    model = get_loader("xgboost").load("m", file, {}, "ram")
    assert _outputs(model) == [("predict", "INT64", (-1,))]
    got = serve(model, {"x": x}, True)
    np.testing.assert_array_equal(got["predict"], _xgb_classifier(file).predict(x))
    with pytest.raises(InvalidArgument, match="unknown output 'predict_proba'"):
        model.predict({"x": x}, ["predict_proba"])


def test_xgboost_regression_is_unchanged(tmp_path: Path) -> None:
    file, x = _xgb_booster(tmp_path, "reg:squarederror", "iris")
    model = get_loader("xgboost").load("m", file, {}, "ram")
    assert _outputs(model) == [("predict", "FP32", (-1,))]
    got = serve(model, {"x": x}, True)
    assert list(got) == ["predict"] and got["predict"].dtype == np.float32
    np.testing.assert_array_equal(got["predict"], _xgb_old_output(file, x))
    with pytest.raises(InvalidArgument, match="unknown output 'predict_proba'"):
        model.predict({"x": x}, ["predict_proba"])


@pytest.mark.parametrize(("objective", "dataset", "classes"),
                         [("binary", "breast_cancer", 2), ("multiclass", "iris", 3), ("multiclassova", "iris", 3)])
def test_lightgbm_classifier_serves_labels_and_probabilities(tmp_path: Path, objective: str, dataset: str,
                                                             classes: int) -> None:
    import lightgbm
    from sklearn import datasets

    x, y = getattr(datasets, f"load_{dataset}")(return_X_y=True)
    wrapper = lightgbm.LGBMClassifier(objective=objective, n_estimators=4, num_leaves=4, random_state=0,
                                      deterministic=True, n_jobs=1, verbose=-1).fit(x, y)
    file = tmp_path / f"{objective}.txt"
    wrapper.booster_.save_model(str(file))
    sample = x[::7]
    model = get_loader("lightgbm").load("m", file, {}, "ram")
    assert _outputs(model) == [("predict", "INT64", (-1,)), ("predict_proba", "FP64", (-1, classes))]
    assert model.default_outputs == ["predict"]
    labels = wrapper.predict(sample)
    assert len(set(labels.tolist())) == classes  # the rows cover every class: the test can fail
    got = serve(model, {"x": sample}, False, ["predict", "predict_proba"])
    assert got["predict"].dtype == np.int64 and got["predict_proba"].dtype == np.float64
    np.testing.assert_array_equal(got["predict"], labels)
    np.testing.assert_allclose(got["predict_proba"], wrapper.predict_proba(sample), rtol=1e-12)
    old = lightgbm.Booster(model_file=str(file)).predict(sample)  # the old `predict`
    np.testing.assert_allclose(got["predict_proba"][:, 1] if objective == "binary" else got["predict_proba"], old,
                               rtol=1e-12)
    assert list(serve(model, {"x": sample}, True)) == ["predict"]


def test_lightgbm_regression_is_unchanged(tmp_path: Path) -> None:
    import lightgbm
    from sklearn import datasets

    x, _ = datasets.load_iris(return_X_y=True)
    booster = lightgbm.train({"objective": "regression", "num_leaves": 4, "verbose": -1, "num_threads": 1},
                             lightgbm.Dataset(x[:, 1:], x[:, 0]), num_boost_round=4)
    file = tmp_path / "regression.txt"
    booster.save_model(str(file))
    model = get_loader("lightgbm").load("m", file, {}, "ram")
    assert _outputs(model) == [("predict", "FP64", (-1,))]
    got = serve(model, {"x": x[:, 1:]}, True)
    assert list(got) == ["predict"]
    np.testing.assert_allclose(got["predict"], booster.predict(x[:, 1:]), rtol=1e-12)
    with pytest.raises(InvalidArgument, match="unknown output 'predict_proba'"):
        model.predict({"x": x[:, 1:]}, ["predict_proba"])


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


def test_onnx_string_input_takes_the_text_of_bytes(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["text"], ["same"])], "strings",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["N"])],
        [helper.make_tensor_value_info("same", TensorProto.STRING, ["N"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "model.onnx")
    loaded = get_loader("onnx").load("s", tmp_path, {}, "ram")
    got = serve(loaded, {"text": np.array([b"a", "bé".encode()], dtype=object)}, True)
    assert list(got["same"]) == [b"a", "bé".encode()]  # not b"b'a'": the text, not str(bytes)
    with pytest.raises(InvalidArgument, match="input 'text': BYTES element is not UTF-8"):
        loaded.predict({"text": np.array([b"\xff"], dtype=object)})


# --- openvino ---------------------------------------------------------------------------------


def _ir(model: object, path: Path, compress_to_fp16: bool = False) -> Path:
    import openvino

    path.mkdir(parents=True, exist_ok=True)
    openvino.save_model(model, str(path / "model.xml"), compress_to_fp16=compress_to_fp16)
    return path


def _named(node: object, name: str) -> object:
    node.output(0).get_tensor().set_names({name})
    return node


def _two_input_ir(path: Path) -> Path:
    """sum = a + b and scaled = a * [1, 2, 3], inputs [N, 3] FP32, built with OpenVINO's opset API."""
    import openvino
    import openvino.opset13 as ops

    a = _named(ops.parameter([-1, 3], openvino.Type.f32, name="a"), "a")
    b = _named(ops.parameter([-1, 3], openvino.Type.f32, name="b"), "b")
    total = _named(ops.add(a, b), "sum")
    scaled = _named(ops.multiply(a, ops.constant(np.array([1, 2, 3], np.float32))), "scaled")
    return _ir(openvino.Model([ops.result(total), ops.result(scaled)], [a, b], "two_inputs"), path)


def test_openvino_metadata_names_types_and_shapes(models_dir: Path) -> None:
    a = artifact(models_dir, "openvino", 1)  # wine: 13 features, 3 classes; 1/classifier.xml
    assert a.file.relative_to(a.path) == Path("1/classifier.xml")
    model = load(a)
    assert model.platform == "openvino" and model.device == "ram"
    assert [(i.name, i.datatype, i.shape) for i in model.inputs] == [("input", "FP32", (-1, 13))]
    assert [(o.name, o.datatype, o.shape) for o in model.outputs] == [
        ("label", "INT64", (-1,)), ("probabilities", "FP32", (-1, 3))]
    assert model.default_outputs == ["label", "probabilities"]


def test_openvino_requested_output_subset(models_dir: Path) -> None:
    a = artifact(models_dir, "openvino", 0)
    got = serve(load(a), {"input": a.sample}, True, ["probabilities"])
    assert_outputs_match(got, {"probabilities": a.expected["probabilities"]}, atol=1e-5)


def test_openvino_casts_safely_and_refuses_the_rest(models_dir: Path) -> None:
    a = artifact(models_dir, "openvino", 0)  # iris: [N, 4] FP32
    model = load(a)
    assert_outputs_match(model.predict({"input": a.sample.astype(np.float64)}), a.expected, atol=1e-5)
    assert model.predict({"input": np.ones((1, 4), np.int64)})["label"].shape == (1,)
    with pytest.raises(InvalidArgument) as info:
        model.predict({"input": np.array([[b"1"] * 4], dtype=object)})
    assert info.value.message == "input 'input': the model takes FP32, got BYTES; cannot convert"
    with pytest.raises(InvalidArgument) as info:
        model.predict({"input": np.ones((1, 3), np.float32)})
    assert info.value.message == "input 'input': the model takes shape [-1, 4], got [1, 3]"
    with pytest.raises(InvalidArgument, match=r"takes shape \[-1, 4\], got \[4\]"):
        model.predict({"input": np.ones(4, np.float32)})
    with pytest.raises(InvalidArgument, match=r"unknown output 'nope'.*\['label', 'probabilities'\]"):
        model.predict({"input": a.sample}, ["nope"])
    assert_outputs_match(model.predict({"input": a.sample}), a.expected, atol=1e-5)  # still serving


def test_openvino_inputs_by_name(tmp_path: Path) -> None:
    model = get_loader("openvino").load("two", _two_input_ir(tmp_path / "two"), {}, "ram")
    assert [(i.name, i.shape) for i in model.inputs] == [("a", (-1, 3)), ("b", (-1, 3))]
    assert [o.name for o in model.outputs] == ["sum", "scaled"]
    a = np.ones((2, 3), np.float32)
    b = np.arange(6, dtype=np.float32).reshape(2, 3)
    got = serve(model, {"b": b, "a": a}, True)
    np.testing.assert_array_equal(got["sum"], a + b)
    np.testing.assert_array_equal(got["scaled"], a * np.array([1, 2, 3], np.float32))
    with pytest.raises(InvalidArgument, match=r"missing input 'b'; the model takes \['a', 'b'\]"):
        model.predict({"a": a, "c": b})
    with pytest.raises(InvalidArgument, match="unknown input 'c'"):
        model.predict({"a": a, "b": b, "c": b})
    # Each input fits its port but the rows disagree: the model refuses, and the answer is never the
    # previous request's outputs (what OpenVINO's synchronous infer gives on a one-thread stream).
    with pytest.raises(InvalidArgument) as info:
        model.predict({"a": np.ones((3, 3), np.float32), "b": b})
    assert info.value.message.startswith("openvino: the model refused the input: "), info.value.message
    assert "mismatch" in info.value.message and "Exception from" not in info.value.message
    assert model.footprint_bytes() == 12  # the constant [1, 2, 3]: 3 x f32
    np.testing.assert_array_equal(model.predict({"a": b, "b": b})["sum"], b + b)  # still serving


def test_openvino_one_tensor_returned_twice_gets_two_output_names(tmp_path: Path) -> None:
    import openvino
    import openvino.opset13 as ops

    x = _named(ops.parameter([-1, 2], openvino.Type.f32, name="x"), "x")
    doubled = _named(ops.multiply(x, ops.constant(np.float32(2))), "doubled")
    path = _ir(openvino.Model([ops.result(doubled), ops.result(doubled)], [x], "twice"), tmp_path)
    model = get_loader("openvino").load("t", path, {}, "ram")
    assert [o.name for o in model.outputs] == ["doubled", "output__1"]
    got = serve(model, {"x": np.ones((1, 2), np.float32)}, True)
    assert list(got) == ["doubled", "output__1"]
    np.testing.assert_array_equal(got["output__1"], [[2.0, 2.0]])


def test_openvino_model_refusing_an_input_is_invalid_argument(tmp_path: Path) -> None:
    import openvino
    import openvino.opset13 as ops

    x = _named(ops.parameter([-1, 3], openvino.Type.f32, name="x"), "x")
    pairs = _named(ops.reshape(x, ops.constant(np.array([-1, 2], np.int64)), False), "pairs")
    model = get_loader("openvino").load("r", _ir(openvino.Model([ops.result(pairs)], [x], "r"), tmp_path), {}, "ram")
    assert model.predict({"x": np.ones((2, 3), np.float32)})["pairs"].shape == (3, 2)
    with pytest.raises(InvalidArgument) as info:
        model.predict({"x": np.ones((1, 3), np.float32)})  # 3 values cannot be pairs
    message = info.value.message
    assert message.startswith("openvino: the model refused the input: "), message
    assert "conflicts with the reshape pattern" in message
    assert "Exception from" not in message and "failed at" not in message and "\n" not in message
    assert model.predict({"x": np.ones((4, 3), np.float32)})["pairs"].shape == (6, 2)  # still serving


def test_openvino_string_inputs_take_utf8_bytes(tmp_path: Path) -> None:
    import openvino
    import openvino.opset13 as ops

    text = _named(ops.parameter([-1], openvino.Type.string, name="text"), "text")
    path = _ir(openvino.Model([ops.result(text)], [text], "strings"), tmp_path / "strings")
    model = get_loader("openvino").load("s", path, {}, "ram")
    assert [(i.name, i.datatype) for i in model.inputs] == [("text", "BYTES")]
    got = serve(model, {"text": np.array([b"a", "bé".encode()], dtype=object)}, False)
    assert [bytes(v) for v in got[model.outputs[0].name]] == [b"a", "bé".encode()]
    with pytest.raises(InvalidArgument, match="input 'text': BYTES element is not UTF-8"):
        model.predict({"text": np.array([b"\xff"], dtype=object)})
    with pytest.raises(InvalidArgument, match="the model takes BYTES, got FP32"):
        model.predict({"text": np.ones(2, np.float32)})


def test_openvino_fp16_compressed_weights(models_dir: Path, tmp_path: Path) -> None:
    """``save_model``'s default halves the weights: served, within FP16 rounding, at half the footprint."""
    import openvino

    a = artifact(models_dir, "openvino", 0)
    path = _ir(openvino.Core().read_model(str(a.file)), tmp_path / "fp16", compress_to_fp16=True)
    model = get_loader("openvino").load("h", path, {}, "ram")
    got = model.predict({"input": a.sample})
    np.testing.assert_array_equal(got["label"], a.expected["label"])
    np.testing.assert_allclose(got["probabilities"], a.expected["probabilities"], atol=1e-2)
    assert model.footprint_bytes() < 0.75 * load(a).footprint_bytes()


def test_openvino_compiles_for_many_models_on_one_cpu(models_dir: Path) -> None:
    """The compile properties the loader's docstring argues for, as OpenVINO reports them."""
    model = load(artifact(models_dir, "openvino", 0))
    compiled = model._compiled
    assert str(compiled.get_property("EXECUTION_MODE_HINT")) == "ExecutionMode.ACCURACY"
    assert int(compiled.get_property("NUM_STREAMS")) == 1
    assert int(compiled.get_property("INFERENCE_NUM_THREADS")) == 1
    assert compiled.get_property("ENABLE_CPU_PINNING") is False


def test_openvino_concurrent_loads_share_one_core(models_dir: Path) -> None:
    """Loader threads compile on the process's one openvino.Core at once (the loader's docstring)."""
    arts = [artifact(models_dir, "openvino", seed) for seed in range(3)]
    failures: list[BaseException] = []

    def worker(a: ModelArtifact) -> None:
        try:
            for _ in range(3):
                model = load(a)
                assert_outputs_match(model.predict({"x": a.sample}), a.expected, atol=1e-5)
                model.close()
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(a,)) for a in arts * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[0]


def _ir_copy(a: ModelArtifact, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(a.file, directory / "model.xml")
    shutil.copy(a.file.with_suffix(".bin"), directory / "model.bin")
    return directory


def test_openvino_missing_or_bad_weights(models_dir: Path, tmp_path: Path) -> None:
    a = artifact(models_dir, "openvino", 0)
    loader = get_loader("openvino")
    path = _ir_copy(a, tmp_path / "m")
    (path / "model.bin").unlink()
    with pytest.raises(ModelLoadError) as info:
        loader.load("m", path, {}, "ram")
    assert info.value.message == (
        f"openvino: cannot load {path / 'model.xml'}: its weights file 'model.bin' is missing "
        "(an IR is the .xml and the .bin of the same name beside it)")
    (path / "model.bin").write_bytes(a.file.with_suffix(".bin").read_bytes()[:10])  # truncated
    with pytest.raises(ModelLoadError) as info:
        loader.load("m", path, {}, "ram")
    assert info.value.message == f"openvino: cannot load {path / 'model.xml'}: Incorrect weights in bin file!"
    (path / "model.bin").unlink()
    (path / "model.bin").mkdir()
    with pytest.raises(ModelLoadError, match=r"its weights .*model\.bin' are a directory, not a file"):
        loader.load("m", path, {}, "ram")
    (path / "model.bin").rmdir()
    os.mkfifo(path / "model.bin")  # reading it would block the load forever
    with pytest.raises(ModelLoadError, match=r"model\.bin' is neither a regular file nor a directory"):
        loader.load("m", path, {}, "ram")


def test_openvino_reads_ir_only(models_dir: Path, tmp_path: Path) -> None:
    """An ONNX file named model.xml: OpenVINO's read_model would load it; this type is IR only."""
    onnx_model = artifact(models_dir, "onnx", 0)
    (tmp_path / "model.xml").write_bytes(onnx_model.file.read_bytes())
    (tmp_path / "model.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError) as info:
        get_loader("openvino").load("o", tmp_path, {}, "ram")
    assert info.value.message == (f"openvino: cannot load {tmp_path / 'model.xml'}: not an OpenVINO IR graph "
                                  "(an XML document whose root element is <net>)")
    (tmp_path / "model.xml").write_text("<?xml version='1.0'?><net name='m' version='11'></net>")
    with pytest.raises(ModelLoadError, match=r"openvino: cannot load .*: the model has no outputs"):
        get_loader("openvino").load("o", tmp_path, {}, "ram")


def test_openvino_files_outside_the_model_roots_are_refused(models_dir: Path, tmp_path: Path) -> None:
    a = artifact(models_dir, "openvino", 0)
    roots, outside = tmp_path / "roots", _ir_copy(a, tmp_path / "outside")
    policy = LoadPolicy(roots=(str(roots),))
    loader = get_loader("openvino")
    with pytest.raises(ModelLoadError, match="is outside the model roots"):
        resolve_path(str(outside), policy.roots)
    # The graph inside the roots, its weights a link out of them.
    inside = roots / "m"
    inside.mkdir(parents=True)
    shutil.copy(outside / "model.xml", inside / "model.xml")
    (inside / "model.bin").symlink_to(outside / "model.bin")
    with pytest.raises(ModelLoadError) as info:
        loader.load("m", resolve_path(str(inside), policy.roots), {}, "ram", policy)
    assert info.value.message == (f"openvino: {str(inside / 'model.bin')!r} leads outside the model roots "
                                  f"({roots}) through a symbolic link")
    # The weights inside, the graph a link out.
    (inside / "model.bin").unlink()
    shutil.copy(outside / "model.bin", inside / "model.bin")
    (inside / "model.xml").unlink()
    (inside / "model.xml").symlink_to(outside / "model.xml")
    with pytest.raises(ModelLoadError, match=r"model\.xml' leads outside the model roots"):
        loader.load("m", resolve_path(str(inside), policy.roots), {}, "ram", policy)
    # Both inside: served.
    (inside / "model.xml").unlink()
    shutil.copy(outside / "model.xml", inside / "model.xml")
    model = loader.load("m", resolve_path(str(inside), policy.roots), {}, "ram", policy)
    assert_outputs_match(model.predict({"input": a.sample}), a.expected, atol=1e-5)


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
    if kind == "openvino":
        # FP32 mean, scale, coefficients and intercepts; a few bytes more for the graph's own
        # constants (Softmax and ArgMax axes).
        n, k = a.n_features, a.expected["probabilities"].shape[1]
        weights = 4 * (2 * n + n * k + k)
        assert weights <= footprint <= weights + 64


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
    "openvino": ".xml",
    "torchscript": ".pt",
}


@pytest.mark.parametrize("kind", KINDS)
def test_corrupt_file_is_a_load_error_with_the_reason(tmp_path: Path, kind: str) -> None:
    file = tmp_path / f"model{_EXTENSION[kind]}"
    file.write_bytes(b"\x00this is not a model\xff" * 10)
    if kind == "openvino":
        (tmp_path / "model.bin").write_bytes(b"\x00" * 64)  # weights present: the graph is what is corrupt
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


@pytest.mark.parametrize(
    ("kind", "modules"), [("lightgbm", ["lightgbm"]), ("openvino", ["openvino", "openvino.frontend"])]
)
def test_missing_library_is_reported(
    models_dir: Path, monkeypatch: pytest.MonkeyPatch, kind: str, modules: list[str]
) -> None:
    a = artifact(models_dir, kind, 0)
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # makes ``import <module>`` fail
    with pytest.raises(ModelLoadError, match=f"{kind}: the library for this model type is not installed"):
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
    assert "lightgbm, onnx, openvino, sklearn, torchscript, xgboost" in info.value.message


def test_type_names_and_aliases() -> None:
    assert supported_types() == ["lightgbm", "onnx", "openvino", "sklearn", "torchscript", "xgboost"]
    assert get_loader("Scikit-Learn") is get_loader("sklearn")
    assert get_loader("PyTorch") is get_loader("torchscript")
    assert get_loader("OpenVINO_IR") is get_loader("openvino")
    for t in ("XGBoost", "LightGBM", "ONNX", "OpenVINO"):
        assert get_loader(t).type == t.lower()


@pytest.mark.parametrize("kind", ["sklearn", "xgboost", "lightgbm", "openvino"])
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
        "import sys, mesh.runtime.loaders, mesh.tensors, mesh.runtime.gpu\n"
        "heavy = ['torch', 'xgboost', 'lightgbm', 'onnxruntime', 'onnx', 'openvino', 'sklearn', 'grpc']\n"
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
