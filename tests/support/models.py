"""Small, real, deterministic models of every built-in format, for tests at every tier.

``make_model(kind, directory, seed)`` trains a tiny model on a dataset bundled with scikit-learn
(iris, wine or breast_cancer, picked by the seed: no downloads), saves it the way a user would, and
returns a :class:`ModelArtifact`: where it is, a sample input, and the outputs the model's own
library computes for that sample in this process, which a served model must reproduce.
``make_fleet(directory, n)`` makes ``n`` of them across all kinds, for end-to-end tests.

Each model trains in well under 0.5 s (torch's first import aside, about 2 s once per process).
The same (kind, seed) always gives the same model and sample.

Layout: ``<directory>/<kind>-<seed>/model.<ext>``; ``ModelArtifact.path`` is that model directory
(the loaders pick the single model file inside), ``ModelArtifact.file`` the file itself. An
OpenVINO IR is ``model.xml`` with ``model.bin`` beside it, or for odd seeds ``1/classifier.xml``
and ``1/classifier.bin`` (OpenVINO Model Server's version folder).

``expected`` holds exactly the outputs a request that names no outputs gets back; ``on_request``
the outputs served only when named (``predict_proba`` of the scikit-learn, XGBoost and LightGBM
classifiers). Compare with
:func:`assert_outputs_match`, which knows that BYTES come back as ``bytes`` and floats need a
tolerance.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

KINDS: tuple[str, ...] = ("sklearn", "xgboost", "lightgbm", "onnx", "openvino", "torchscript")
_DATASETS = ("iris", "wine", "breast_cancer")
_SAMPLE_ROWS = 8


@dataclass(frozen=True)
class ModelArtifact:
    type: str  # the model type to register (a loader's type)
    path: Path  # the model directory
    file: Path  # the model file inside it
    sample: np.ndarray  # FP32 [rows, n_features]
    expected: dict[str, np.ndarray]  # default outputs for ``sample``
    n_features: int
    on_request: dict[str, np.ndarray] = field(default_factory=dict)
    description: str = ""


def make_model(kind: str, directory: Path, seed: int) -> ModelArtifact:
    """Train, save and describe one model of ``kind`` (one of :data:`KINDS`)."""
    makers = {
        "sklearn": _sklearn,
        "xgboost": _xgboost,
        "lightgbm": _lightgbm,
        "onnx": _onnx,
        "openvino": _openvino,
        "torchscript": _torchscript,
    }
    if kind not in makers:
        raise ValueError(f"unknown kind {kind!r}; choose from {KINDS}")
    model_dir = Path(directory) / f"{kind}-{seed}"
    model_dir.mkdir(parents=True, exist_ok=True)
    return makers[kind](model_dir, seed)


def make_fleet(
    directory: Path, n: int, kinds: Sequence[str] = KINDS, first_seed: int = 0
) -> list[ModelArtifact]:
    """``n`` models cycling through ``kinds``, with seeds ``first_seed``, ``first_seed + 1``, ..."""
    return [make_model(kinds[i % len(kinds)], directory, first_seed + i) for i in range(n)]


def assert_outputs_match(
    actual: Mapping[str, np.ndarray],
    expected: Mapping[str, np.ndarray],
    *,
    rtol: float = 1e-5,
    atol: float = 1e-6,
) -> None:
    """``actual`` has exactly ``expected``'s outputs: labels and strings equal, floats close."""
    assert list(actual) == list(expected), f"outputs {list(actual)} != expected {list(expected)}"
    for name, want in expected.items():
        got = np.asarray(actual[name])
        want = np.asarray(want)
        assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
        if want.dtype.kind in "OUS":
            assert [_text(v) for v in got.ravel()] == [_text(v) for v in want.ravel()], name
        elif want.dtype.kind == "f":
            np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=name)
        else:
            np.testing.assert_array_equal(got, want, err_msg=name)


def _text(v: Any) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


# ---------------------------------------------------------------------------------------------
# data


@functools.cache
def _dataset(name: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    from sklearn import datasets

    data = getattr(datasets, f"load_{name}")()
    x = np.ascontiguousarray(data.data, dtype=np.float32)
    return x, data.target.astype(np.int64), tuple(str(t) for t in data.target_names)


def _data(seed: int) -> tuple[str, np.ndarray, np.ndarray, tuple[str, ...]]:
    name = _DATASETS[seed % len(_DATASETS)]
    return (name, *_dataset(name))


def _sample_rows(x: np.ndarray, seed: int, eligible: np.ndarray | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pool = np.arange(len(x)) if eligible is None else np.flatnonzero(eligible)
    rows = rng.choice(pool, size=min(_SAMPLE_ROWS, len(pool)), replace=False)
    return np.ascontiguousarray(x[np.sort(rows)])


# ---------------------------------------------------------------------------------------------
# makers


def _sklearn(model_dir: Path, seed: int) -> ModelArtifact:
    import joblib
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.tree import DecisionTreeClassifier

    name, x, y, target_names = _data(seed)
    variant = (seed // len(_DATASETS)) % 5
    labels: np.ndarray = y
    model: Any
    if variant == 0:
        model = make_pipeline(StandardScaler(), LogisticRegression(C=0.5 + seed % 7, max_iter=500))
    elif variant == 1:
        model = DecisionTreeClassifier(max_depth=3 + seed % 3, random_state=seed)
    elif variant == 2:
        model = RandomForestClassifier(n_estimators=5, max_depth=4, random_state=seed, n_jobs=1)
    elif variant == 3:
        # String labels: served as BYTES.
        labels = np.array([target_names[i] for i in y], dtype=object)
        model = DecisionTreeClassifier(max_depth=3, random_state=seed)
    else:
        # A regressor: FP64 predictions, no predict_proba. Predict the first feature from the rest.
        model = make_pipeline(StandardScaler(), Ridge(alpha=1.0 + seed % 5))
        labels = x[:, 0].astype(np.float64)
        x = np.ascontiguousarray(x[:, 1:])
    model.fit(x, labels)
    file = model_dir / ("model.joblib" if seed % 2 == 0 else "model.pkl")
    joblib.dump(model, file)
    sample = _sample_rows(x, seed)
    on_request = {}
    if hasattr(model, "predict_proba"):
        on_request["predict_proba"] = model.predict_proba(sample).astype(np.float64)
    return ModelArtifact(
        type="sklearn",
        path=model_dir,
        file=file,
        sample=sample,
        expected={"predict": np.asarray(model.predict(sample))},
        n_features=x.shape[1],
        on_request=on_request,
        description=f"{_describe(model)} on {name}",
    )


def _describe(model: Any) -> str:
    steps = getattr(model, "steps", None)
    return "+".join(type(s).__name__ for _, s in steps) if steps else type(model).__name__


def _xgboost(model_dir: Path, seed: int) -> ModelArtifact:
    import xgboost

    name, x, y, _ = _data(seed)
    model = xgboost.XGBClassifier(
        n_estimators=3 + seed % 4,
        max_depth=2,
        learning_rate=0.5,
        tree_method="hist",
        random_state=seed,
        n_jobs=1,
    )
    model.fit(x, y)
    file = model_dir / ("model.json" if seed % 2 == 0 else "model.ubj")
    model.save_model(file)
    sample = _sample_rows(x, seed)
    # Served as XGBClassifier serves it (MLServer's runtime too): ``predict`` the class index,
    # ``predict_proba`` (when named) the [rows, classes] probabilities, [1 - p, p] for binary.
    return ModelArtifact(
        type="xgboost",
        path=model_dir,
        file=file,
        sample=sample,
        expected={"predict": np.asarray(model.predict(sample), dtype=np.int64)},
        n_features=x.shape[1],
        on_request={"predict_proba": np.asarray(model.predict_proba(sample))},
        description=f"XGBClassifier on {name}",
    )


def _lightgbm(model_dir: Path, seed: int) -> ModelArtifact:
    import lightgbm

    name, x, y, target_names = _data(seed)
    n_classes = len(target_names)
    objective = "binary" if n_classes == 2 else "multiclass"
    model = lightgbm.LGBMClassifier(
        objective=objective,
        n_estimators=3 + seed % 4,
        num_leaves=4,
        min_child_samples=5,
        learning_rate=0.3,
        random_state=seed,
        deterministic=True,
        force_col_wise=True,
        n_jobs=1,
        verbose=-1,
    )
    model.fit(x, y)
    file = model_dir / "model.txt"
    model.booster_.save_model(str(file))  # the Booster file a user serves, without the wrapper
    sample = _sample_rows(x, seed)
    # The labels are 0..classes-1, so the wrapper's labels are the served class indices.
    return ModelArtifact(
        type="lightgbm",
        path=model_dir,
        file=file,
        sample=sample,
        expected={"predict": np.asarray(model.predict(sample), dtype=np.int64)},
        n_features=x.shape[1],
        on_request={"predict_proba": np.asarray(model.predict_proba(sample), dtype=np.float64)},
        description=f"LGBMClassifier {objective} on {name}",
    )


def _onnx(model_dir: Path, seed: int) -> ModelArtifact:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    name, x, y, _ = _data(seed)
    classifier = LogisticRegression(C=0.5 + seed % 7, max_iter=500)
    model = make_pipeline(StandardScaler(), classifier)
    model.fit(x, y)
    onx = convert_sklearn(
        model,
        initial_types=[("input", FloatTensorType([None, x.shape[1]]))],
        options={id(classifier): {"zipmap": False}},
    )
    file = model_dir / "model.onnx"
    file.write_bytes(onx.SerializeToString())
    return _classifier_artifact("onnx", model_dir, file, model, x, seed,
                                f"skl2onnx LogisticRegression pipeline on {name}")


def _classifier_artifact(kind: str, model_dir: Path, file: Path, model: Any, x: np.ndarray, seed: int,
                         description: str) -> ModelArtifact:
    """A graph model made from a fitted scikit-learn classifier: its labels and FP32 probabilities."""
    # The graph computes in FP32, scikit-learn in FP64: sample only rows whose top two classes are
    # clearly apart, so that the labels cannot differ by rounding.
    proba = np.sort(model.predict_proba(x), axis=1)
    sample = _sample_rows(x, seed, eligible=(proba[:, -1] - proba[:, -2]) > 1e-3)
    return ModelArtifact(
        type=kind,
        path=model_dir,
        file=file,
        sample=sample,
        expected={
            "label": np.asarray(model.predict(sample), dtype=np.int64),
            "probabilities": model.predict_proba(sample).astype(np.float32),
        },
        n_features=x.shape[1],
        description=description,
    )


def _openvino(model_dir: Path, seed: int) -> ModelArtifact:
    """The onnx maker's pipeline (StandardScaler + LogisticRegression) as an OpenVINO IR, converted
    from ONNX the way users convert: ``openvino.convert_model`` then ``openvino.save_model``.

    The ONNX graph is written here with standard operators: OpenVINO's ONNX front end does not
    convert the ``ai.onnx.ml`` operators that skl2onnx emits. Weights stay FP32
    (``compress_to_fp16=False``), so the served answers equal scikit-learn's to FP32 rounding.
    """
    import openvino
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    name, x, y, _ = _data(seed)
    classifier = LogisticRegression(C=0.5 + seed % 7, max_iter=500)
    model = make_pipeline(StandardScaler(), classifier)
    model.fit(x, y)
    onnx_file = model_dir / "source.onnx"
    _write_logistic_onnx(onnx_file, model)
    file = model_dir / "model.xml" if seed % 2 == 0 else model_dir / "1" / "classifier.xml"
    file.parent.mkdir(exist_ok=True)
    openvino.save_model(openvino.convert_model(str(onnx_file)), str(file), compress_to_fp16=False)
    onnx_file.unlink()  # the model directory holds the IR only
    return _classifier_artifact("openvino", model_dir, file, model, x, seed,
                                f"LogisticRegression pipeline on {name}, ONNX -> OpenVINO IR")


def _write_logistic_onnx(file: Path, model: Any) -> None:
    """A fitted StandardScaler + LogisticRegression as an ONNX graph of standard operators: input
    ``input`` [N, features] FP32; outputs ``label`` [N] INT64 and ``probabilities`` [N, classes]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    scaler, classifier = model[0], model[-1]
    coef, intercept = classifier.coef_, classifier.intercept_
    if coef.shape[0] == 1:
        # Binary: scikit-learn's P(1) is sigmoid(z) = softmax([0, z])[1].
        coef = np.vstack([np.zeros_like(coef), coef])
        intercept = np.array([0.0, intercept[0]])
    weights = [
        numpy_helper.from_array(np.asarray(a, dtype=np.float32), n)
        for a, n in ((scaler.mean_, "mean"), (scaler.scale_, "scale"), (coef.T, "coef"), (intercept, "intercept"))
    ]
    nodes = [
        helper.make_node("Sub", ["input", "mean"], ["centred"]),
        helper.make_node("Div", ["centred", "scale"], ["scaled"]),
        helper.make_node("MatMul", ["scaled", "coef"], ["product"]),
        helper.make_node("Add", ["product", "intercept"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0),
    ]
    n_features, n_classes = coef.shape[1], coef.shape[0]
    graph = helper.make_graph(
        nodes,
        "logistic_regression",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", n_features])],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", n_classes]),
        ],
        initializer=weights,
    )
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx_model.ir_version = 8
    onnx.save(onnx_model, file)


def _torchscript(model_dir: Path, seed: int) -> ModelArtifact:
    import torch

    from tests.support.torch_mlp import train

    name, x, y, target_names = _data(seed)
    # One torch thread while training: once xgboost, lightgbm and scikit-learn have started their
    # OpenMP pools in this process, torch's own pool fights them for the cores and a 40-step
    # training takes a second instead of 50 ms. The setting is process-wide, so it is restored.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        module = train(torch.from_numpy(x), torch.from_numpy(y), len(target_names), seed)
        scripted = torch.jit.script(module)
        file = model_dir / ("model.pt" if seed % 2 == 0 else "model.pth")
        scripted.save(str(file))
        sample = _sample_rows(x, seed)
        with torch.inference_mode():
            logits, probabilities = scripted(torch.from_numpy(sample))
    finally:
        torch.set_num_threads(threads)
    return ModelArtifact(
        type="torchscript",
        path=model_dir,
        file=file,
        sample=sample,
        expected={"output__0": logits.numpy(), "output__1": probabilities.numpy()},
        n_features=x.shape[1],
        description=f"TinyMLP on {name}",
    )
