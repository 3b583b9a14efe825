"""scikit-learn's linear models served without scikit-learn's per-call validation (issue 18): every
answer through SklearnModel.predict is the estimator's own, bit for bit, dtype and shape included;
what the fast path must not answer (NaN, infinity, zero rows, a dtype not verified, a subclass, a
model whose verification fails) is answered by the estimator itself.

Whether the fast path answered is told by the estimator's ``predict`` being called or not: after
the load, the estimator's methods are wrapped in counting ones."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import linear_model as lm
from sklearn import svm

from mesh.errors import InvalidArgument
from mesh.runtime.loaders.base import reason
from mesh.runtime.loaders.sizing import deep_nbytes
from mesh.runtime.loaders.sklearn_loader import SklearnModel

# (name, factory, target): "binary" / "multiclass" labels, "regression" one target,
# "multi-output" 1-3 targets (the types that fit a 2-D y).
CASES: list[tuple[str, Callable[[int], Any], str]] = [
    ("logistic", lambda s: lm.LogisticRegression(C=0.1 + s % 5, max_iter=300), "binary"),
    ("logistic", lambda s: lm.LogisticRegression(C=0.1 + s % 5, max_iter=300), "multiclass"),
    ("ridge classifier", lambda s: lm.RidgeClassifier(alpha=1.0 + s % 3), "binary"),
    ("ridge classifier", lambda s: lm.RidgeClassifier(alpha=1.0 + s % 3), "multiclass"),
    ("sgd log_loss", lambda s: lm.SGDClassifier(loss="log_loss", random_state=s, max_iter=50), "binary"),
    ("sgd log_loss", lambda s: lm.SGDClassifier(loss="log_loss", random_state=s, max_iter=50), "multiclass"),
    ("sgd huber", lambda s: lm.SGDClassifier(loss="modified_huber", random_state=s, max_iter=50), "multiclass"),
    ("sgd hinge", lambda s: lm.SGDClassifier(random_state=s, max_iter=50), "binary"),
    ("perceptron", lambda s: lm.Perceptron(random_state=s, max_iter=50), "multiclass"),
    ("linear svc", lambda s: svm.LinearSVC(C=0.5, max_iter=2000), "binary"),
    ("linear svc", lambda s: svm.LinearSVC(C=0.5, max_iter=2000), "multiclass"),
    ("linear regression", lambda s: lm.LinearRegression(fit_intercept=s % 2 == 0), "regression"),
    ("linear regression", lambda s: lm.LinearRegression(fit_intercept=s % 2 == 0), "multi-output"),
    ("ridge", lambda s: lm.Ridge(alpha=0.5 + s % 4), "regression"),
    ("ridge", lambda s: lm.Ridge(alpha=0.5 + s % 4), "multi-output"),
    ("lasso", lambda s: lm.Lasso(alpha=0.01, fit_intercept=s % 2 == 0), "regression"),
    ("lasso", lambda s: lm.Lasso(alpha=0.01), "multi-output"),
    ("elastic net", lambda s: lm.ElasticNet(alpha=0.01, l1_ratio=0.3), "regression"),
    ("elastic net", lambda s: lm.ElasticNet(alpha=0.01, l1_ratio=0.3), "multi-output"),
    ("linear svr", lambda s: svm.LinearSVR(max_iter=2000, random_state=s), "regression"),
    ("sgd regressor", lambda s: lm.SGDRegressor(random_state=s, max_iter=50), "regression"),
]
FAST_DTYPES = ("float32", "float64", "int64", "int32", "bool")
OTHER_DTYPES = ("float16", "int8", "uint16")  # answered by the estimator: not verified at load


def fitted(case: int, seed: int, n_features: int, fit_dtype: str = "float64") -> Any:
    """A model of CASES[case] fitted on random data; labels are strings for odd seeds."""
    _, factory, target = CASES[case]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((60, n_features)).astype(fit_dtype)
    signal = x @ rng.standard_normal(n_features)
    y: np.ndarray
    if target == "binary":
        y = (signal > 0).astype(np.int64)
    elif target == "multiclass":
        y = np.digitize(signal, np.quantile(signal, [0.25, 0.5, 0.75])[: 1 + seed % 3])
    elif target == "regression":
        y = signal
    else:
        y = np.stack([signal * (k + 1) + k for k in range(1 + seed % 3)], axis=1)
    if target in ("binary", "multiclass") and seed % 2:
        y = np.array(["cat", "dog", "eel", "fox"], dtype=object)[y]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings of the few iterations allowed
        return factory(seed).fit(x, y)


def rows(seed: int, n: int, n_features: int, dtype: str) -> np.ndarray:
    rng = np.random.default_rng(seed + 1000)
    if dtype == "bool":
        return rng.integers(0, 2, (n, n_features)).astype(bool)
    if np.dtype(dtype).kind in "iu":
        return rng.integers(0 if dtype.startswith("u") else -5, 6, (n, n_features)).astype(dtype)
    return (rng.standard_normal((n, n_features)) * 2).astype(dtype)


class Counting:
    """Wraps an estimator's method after the load, counting the calls that reach it."""

    def __init__(self, method: Callable[..., Any]) -> None:
        self.method = method
        self.calls = 0

    def __call__(self, x: np.ndarray) -> Any:
        self.calls += 1
        return self.method(x)


def served(estimator: Any) -> tuple[SklearnModel, Counting, Counting | None]:
    """The estimator loaded as the runtime loads it, with its predict (and predict_proba) counted."""
    model = SklearnModel("m", estimator)
    predict = Counting(estimator.predict)
    estimator.predict = predict
    proba = None
    if hasattr(estimator, "predict_proba"):
        proba = Counting(estimator.predict_proba)
        estimator.predict_proba = proba
    return model, predict, proba


def own_outputs(estimator: Any, x: np.ndarray) -> dict[str, np.ndarray]:
    """What SklearnModel returned before the fast path: the estimator's own answers."""
    out = {"predict": np.asarray(estimator.predict(x))}
    if hasattr(estimator, "predict_proba"):
        out["predict_proba"] = np.asarray(estimator.predict_proba(x), dtype=np.float64)
    return out


def assert_identical(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert got[name].shape == want[name].shape, name
        assert np.array_equal(got[name], want[name]), name


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{name}-{target}" for name, _, target in CASES])
@settings(deadline=None, max_examples=15)
@given(seed=st.integers(0, 10_000), n_features=st.integers(1, 40),
       n_rows=st.integers(1, 64), dtype=st.sampled_from(FAST_DTYPES + OTHER_DTYPES),
       fit_dtype=st.sampled_from(["float64", "float32"]))
def test_every_answer_is_the_estimators_own(case: int, seed: int, n_features: int, n_rows: int, dtype: str,
                                            fit_dtype: str) -> None:
    estimator = fitted(case, seed, n_features, fit_dtype)
    x = rows(seed, n_rows, n_features, dtype)
    want = own_outputs(estimator, x)
    model, predict, proba = served(estimator)
    assert_identical(model.predict({"input": x}, list(want)), want)
    # The fast path answered (the estimator was not called) exactly for the verified dtypes;
    # predict_proba of a modified Huber SGDClassifier is always the estimator's.
    assert predict.calls == (0 if dtype in FAST_DTYPES else 1)
    if proba is not None:
        assert proba.calls == (0 if dtype in FAST_DTYPES and CASES[case][0] != "sgd huber" else 1)


def test_the_hop_model_one_fp32_row() -> None:
    """The issue's model: a binary LogisticRegression over 256 features fitted on FP32 rows."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((400, 256)).astype(np.float32)
    estimator = lm.LogisticRegression(max_iter=200).fit(x, (x @ rng.standard_normal(256) > 0).astype(np.int64))
    row = np.frombuffer(x[:1].tobytes(), dtype=np.float32).reshape(1, 256)  # read-only, as decoded
    want = own_outputs(estimator, row)
    model, predict, _ = served(estimator)
    assert_identical(model.predict({"input": row}), {"predict": want["predict"]})
    assert_identical(model.predict({"x": row}, ["predict_proba", "predict"]), want)
    assert predict.calls == 0


def refusal(estimator: Any, x: np.ndarray) -> str:
    """The InvalidArgument message SklearnModel gives for the estimator's own ValueError."""
    with pytest.raises(ValueError) as caught:
        estimator.predict(x)
    return f"sklearn: the model refused the input: {reason(caught.value)}"


@pytest.mark.parametrize("case", [0, 1, 13, 20])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_non_finite_input_is_refused_with_sklearns_message(case: int, bad: float, dtype: str) -> None:
    estimator = fitted(case, 3, 6)
    x = rows(3, 4, 6, dtype)
    x[2, 5] = bad
    message = refusal(estimator, x)
    assert "NaN" in message or "infinity" in message
    model, predict, _ = served(estimator)
    for requested in [["predict"]] + ([["predict_proba"]] if hasattr(estimator, "predict_proba") else []):
        with pytest.raises(InvalidArgument) as caught:
            model.predict({"input": x}, requested)
        assert caught.value.message == message
    assert predict.calls >= 1


def test_zero_rows_are_refused_with_sklearns_message() -> None:
    estimator = fitted(0, 1, 5)
    x = np.zeros((0, 5), dtype=np.float32)
    message = refusal(estimator, x)
    model, _, _ = served(estimator)
    with pytest.raises(InvalidArgument) as caught:
        model.predict({"input": x})
    assert caught.value.message == message


class RelabelledLogisticRegression(lm.LogisticRegression):
    """A subclass whose predict answers otherwise than the arithmetic of its base class."""

    def predict(self, X: Any) -> Any:
        return self.classes_[::-1][np.asarray(super().predict(X) == self.classes_[1], dtype=np.intp)]


def subclass() -> Any:
    x = np.random.default_rng(0).standard_normal((50, 5))
    return RelabelledLogisticRegression().fit(x, x[:, 0] > 0)


def altered(method: str) -> Callable[[], Any]:
    """An instance whose predict (or predict_proba) was altered before the load: the rows'
    answers in reverse order. The probes disagree with the arithmetic."""
    def make() -> Any:
        estimator = fitted(1, 2, 5)
        own = getattr(estimator, method)
        setattr(estimator, method, lambda x: own(x)[::-1].copy())
        return estimator
    return make


def multilabel_ridge() -> Any:
    x = np.random.default_rng(1).standard_normal((40, 5))
    return lm.RidgeClassifier().fit(x, np.stack([x[:, 0] > 0, x[:, 1] > 0, x[:, 2] > 0], axis=1))


@pytest.mark.parametrize("make", [subclass, altered("predict"), altered("predict_proba"), multilabel_ridge,
                                  lambda: fitted(1, 4, 5).sparsify()],
                         ids=["subclass", "altered predict", "altered predict_proba", "multilabel ridge",
                              "sparse coef_"])
def test_models_the_fast_path_does_not_fit_answer_themselves(make: Callable[[], Any]) -> None:
    estimator = make()
    x = rows(2, 9, 5, "float32")
    want = own_outputs(estimator, x)
    model, predict, proba = served(estimator)
    assert_identical(model.predict({"input": x}, list(want)), want)
    assert predict.calls == 1 and (proba is None or proba.calls == 1)


def test_the_copies_are_counted_in_the_footprint() -> None:
    estimator = fitted(1, 5, 30)
    model = SklearnModel("m", estimator)
    assert model.footprint_bytes() >= deep_nbytes(estimator) + estimator.coef_.nbytes


def test_concurrent_predictions_agree() -> None:
    estimator = fitted(1, 6, 16)
    inputs = [rows(s, 1 + s % 7, 16, "float32") for s in range(32)]
    wants = [own_outputs(estimator, x) for x in inputs]
    model, predict, _ = served(estimator)

    def answer(i: int) -> None:
        assert_identical(model.predict({"input": inputs[i % 32]}, ["predict", "predict_proba"]), wants[i % 32])

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(answer, range(8 * 32 * 10)))  # an assertion failing in a thread is raised here
    assert predict.calls == 0


def test_a_model_with_many_features_is_verified_on_probes_of_its_own_order_of_size() -> None:
    """A binary model of 2^18 features (coef_ 2 MB): 64-row probes took 128 MB each (the peak of the
    load past 250 MB, outside the memory budget); now its probes have few rows, and it is still served
    by the fast path, answering a batch of more rows than any probe as the estimator does."""
    import tracemalloc

    n_features = 1 << 18
    rng = np.random.default_rng(7)
    estimator = lm.LogisticRegression()
    estimator.coef_ = rng.standard_normal((1, n_features)) / 100
    estimator.intercept_ = np.array([0.25])
    estimator.classes_ = np.array([0, 1])
    estimator.n_features_in_ = n_features
    tracemalloc.start()
    try:
        model, predict, proba = served(estimator)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * estimator.coef_.nbytes
    x = rows(1, 64, n_features, "float32")
    want = own_outputs(estimator, x)
    assert_identical(model.predict({"input": x}, ["predict", "predict_proba"]), want)
    assert predict.calls == 1 and proba is not None and proba.calls == 1  # own_outputs' calls only
