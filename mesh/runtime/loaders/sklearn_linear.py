"""scikit-learn's dense linear models, predicted with numpy alone: the same answers, bit for bit,
without scikit-learn's per-call input validation (issue 18).

Why. For a small linear model, ``estimator.predict`` on one row is mostly validation:
``validate_data`` / ``check_array``, the finiteness scan, array-API and dataframe detection, about
0.3 ms per call on the reference machine for a LogisticRegression over 256 features, while the
arithmetic is one matrix-vector product. The input reaching a model was already checked by
:func:`~mesh.runtime.loaders.base.tabular_input` (2-D, numeric, the fitted feature count).

What. For an estimator whose type is *exactly* one of :func:`_kinds` (a subclass may override
anything, so it is left to its own ``predict``), :func:`linear_fast_path` copies the fitted
``coef_`` / ``intercept_`` / ``classes_`` and repeats scikit-learn's own arithmetic on them, as
read in scikit-learn 1.9's source:

* decision: ``X @ coef_.T + intercept_`` (``X @ coef_`` for a 1-D ``coef_``); classifiers turn an
  [n, 1] result into [n] (``LinearClassifierMixin.decision_function``), SGDRegressor ravels it;
* classifiers' ``predict``: ``classes_[decision > 0]`` for one column, ``classes_[argmax]`` else;
* ``predict_proba`` of LogisticRegression (two classes: ``expit`` and ``[1 - p, p]``; more:
  softmax less the row maximum) and of SGDClassifier with ``loss="log_loss"`` (``expit``, then
  one-vs-rest normalization); other ``predict_proba`` (SGD's modified Huber) stays the estimator's.

Verified, not trusted. At load both the fast path and the estimator answer probe inputs (random
rows of ``n_features_in_`` features, several row counts, each dtype of :data:`_PROBE_DTYPES`); the
fast path is kept only if every output is identical, dtype and shape included, and only for the
dtypes whose probes matched. A model it does not fit (a RidgeClassifier fitted on multilabel
targets, a sparse ``coef_`` after ``sparsify()``, a scikit-learn release whose arithmetic changed)
uses the estimator; the reason is logged at debug level. The probes cost a few milliseconds of the
load (about 20 estimator calls), and a model with very many features or classes is probed on
fewer rows (:data:`_PROBE_CELLS`), so that the probes never take much more memory than it does.

Inputs it does not answer, left to the estimator so that the answer (or the error, word for word)
is scikit-learn's: a float input with NaN or infinity (one ``np.isfinite(x).all()`` scan; the
estimator raises "Input X contains NaN", or answers when scikit-learn's ``assume_finite`` is set),
an input of zero rows, a dtype that was not verified.

Thread safety: the copies are made read-only at load and only read, so concurrent calls need no
lock, and a later change to the estimator's attributes cannot change the fast path's answers.
Footprint: the copies (``coef_`` is n_features x n_classes numbers) are counted in the model's.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import structlog

log = structlog.get_logger(__name__)

# Where the types of _kinds() live: the fast path never imports scikit-learn for other models.
_MODULES = ("sklearn.linear_model.", "sklearn.svm.")


def _kinds() -> dict[type, str]:
    """type -> how its decision and predict read (module docstring). Exact types only: a subclass
    of LogisticRegression may override predict, and its own code must answer."""
    from sklearn import linear_model as lm
    from sklearn import svm

    return {
        lm.LogisticRegression: "classifier", lm.RidgeClassifier: "classifier",
        lm.SGDClassifier: "classifier", lm.Perceptron: "classifier", svm.LinearSVC: "classifier",
        lm.LinearRegression: "regressor", lm.Ridge: "regressor", lm.Lasso: "regressor",
        lm.ElasticNet: "regressor", svm.LinearSVR: "regressor",
        lm.SGDRegressor: "raveled regressor",
    }


# The dtypes a request's tensor can carry and the fast path may answer, each verified at load.
# FP16 and the narrow integers are left to the estimator: clients send them rarely, and each
# probe costs the load an estimator call.
_PROBE_DTYPES = tuple(np.dtype(t) for t in (np.float32, np.float64, np.int64, np.int32, np.bool_))
_FLOAT_ROWS = (1, 3, 64)  # row counts probed for the float dtypes (one row: what a request sends)
_OTHER_ROWS = (5,)
# At most this many numbers (inputs and outputs) per probe row count: a model of a million
# features (coef_ 8 MB) would otherwise make 64-row probes of 512 MB each, dozens of times its own
# size, at every load and outside the memory budget. Wider models are probed on fewer rows.
_PROBE_CELLS = 1 << 20


class LinearFastPath:
    """``predict`` (and ``predict_proba`` when :attr:`has_proba`) of one fitted linear model, from
    read-only copies of its fitted arrays; call :meth:`takes` first."""

    def __init__(self, kind: str, coef: np.ndarray, intercept: Any, classes: np.ndarray | None,
                 proba: str | None) -> None:
        self._kind = kind
        self._coef = coef  # kept for the footprint; _coef_t is a view of it
        self._coef_t = coef.T if coef.ndim == 2 else coef
        self._intercept = intercept
        self._classes = classes
        self._proba = proba  # "logistic" (LogisticRegression), "ovr" (SGD log_loss) or None
        self.dtypes: frozenset[np.dtype] = frozenset()

    @property
    def n_features(self) -> int:
        return int(self._coef.shape[-1])

    @property
    def n_outputs(self) -> int:
        """Numbers in a row of the decision (classes or targets; 1 for a 1-D ``coef_``)."""
        return int(self._coef.shape[0]) if self._coef.ndim == 2 else 1

    @property
    def has_proba(self) -> bool:
        return self._proba is not None

    def takes(self, x: np.ndarray) -> bool:
        """Whether the fast path answers ``x`` as the estimator would (module docstring)."""
        return x.dtype in self.dtypes and x.shape[0] > 0 and \
            (x.dtype.kind != "f" or bool(np.isfinite(x).all()))

    def _decision(self, x: np.ndarray) -> np.ndarray:
        scores: np.ndarray = x @ self._coef_t + self._intercept
        if self._kind == "classifier" and scores.ndim > 1 and scores.shape[1] == 1:
            return scores.reshape((-1,))
        if self._kind == "raveled regressor":
            return scores.ravel()
        return scores

    def predict(self, x: np.ndarray) -> np.ndarray:
        scores = self._decision(x)
        if self._classes is None:
            return scores
        if scores.ndim == 1:
            indices = (scores > 0).astype(np.intp)
        else:
            indices = scores.argmax(axis=1)
        return self._classes.take(indices, axis=0)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        from scipy.special import expit

        prob = self._decision(x)
        if self._proba == "logistic" and self._classes is not None and len(self._classes) > 2:
            # softmax, as sklearn.utils.extmath.softmax computes it in place
            prob -= prob.max(axis=1).reshape((-1, 1))
            np.exp(prob, out=prob)
            prob /= prob.sum(axis=1).reshape((-1, 1))
            return prob
        expit(prob, out=prob)
        if prob.ndim == 1:
            return np.stack([1 - prob, prob], axis=1)
        # one-vs-rest normalization (LinearClassifierMixin._predict_proba_lr): a row whose
        # probabilities are all zero becomes uniform
        prob_sum = prob.sum(axis=1)
        all_zero = prob_sum == 0
        if all_zero.any():
            prob[all_zero, :] = 1
            prob_sum[all_zero] = prob.shape[1]
        prob /= prob_sum.reshape((prob.shape[0], -1))
        return prob


def linear_fast_path(estimator: Any, model_id: str) -> LinearFastPath | None:
    """The verified fast path for ``estimator``, or None when its own ``predict`` must answer."""
    cls = type(estimator)
    kind = _kinds().get(cls) if cls.__module__.startswith(_MODULES) else None
    if kind is None:
        return None
    built = _build(estimator, kind)
    if isinstance(built, str):
        log.debug("sklearn fast path not used", model_id=model_id, reason=built)
        return None
    verified, why = _verify(built, estimator, model_id)
    if not verified:
        log.debug("sklearn fast path not used", model_id=model_id, reason=why)
        return None
    built.dtypes = frozenset(verified)
    return built


def _frozen(arr: np.ndarray) -> np.ndarray:
    """A read-only copy keeping the memory layout (a transposed product sums in another order)."""
    out = np.array(arr, copy=True, order="K")
    out.flags.writeable = False
    return out


def _build(estimator: Any, kind: str) -> LinearFastPath | str:
    """The fast path from the estimator's fitted attributes, or why it cannot be built."""
    # Resolved here, not at import: only scikit-learn's classes reach this function.
    from sklearn.linear_model import LogisticRegression, RidgeClassifier, SGDClassifier

    coef = getattr(estimator, "coef_", None)
    n_features = getattr(estimator, "n_features_in_", None)
    if not isinstance(coef, np.ndarray) or coef.dtype.kind != "f" or coef.ndim not in (1, 2):
        return f"coef_ is not a dense float array ({type(coef).__name__})"
    if n_features is None or coef.shape[-1] != n_features:
        return "coef_ does not match n_features_in_"
    intercept = getattr(estimator, "intercept_", None)
    if isinstance(intercept, np.ndarray):
        intercept = _frozen(intercept)
    elif not isinstance(intercept, float | np.floating):  # immutable scalars are kept as they are:
        return f"intercept_ is a {type(intercept).__name__}"  # a Python float adds unlike np.float64
    classes = None
    proba = None
    if kind == "classifier":
        classes = getattr(estimator, "classes_", None)
        if not isinstance(classes, np.ndarray) or classes.ndim != 1:
            return "classes_ is not a 1-D array"
        classes = _frozen(classes)
        binarizer = getattr(estimator, "_label_binarizer", None)
        if isinstance(estimator, RidgeClassifier) and \
                str(getattr(binarizer, "y_type_", "")).startswith("multilabel"):
            return "a multilabel RidgeClassifier predicts through its label binarizer"
        if isinstance(estimator, LogisticRegression):
            proba = "logistic"
        elif isinstance(estimator, SGDClassifier) and estimator.loss == "log_loss":
            proba = "ovr"
    return LinearFastPath(kind, _frozen(coef), intercept, classes, proba)


def _verify(fast: LinearFastPath, estimator: Any, model_id: str) -> tuple[list[np.dtype], str]:
    """The probe dtypes on which the fast path answered exactly as the estimator, and the first
    mismatch when it did not (then no dtype is kept: the arithmetic is not what we read)."""
    rng = np.random.default_rng(0)
    n_features = fast.n_features
    width = n_features + fast.n_outputs
    passed: list[np.dtype] = []
    for dtype in _PROBE_DTYPES:
        counts = _FLOAT_ROWS if dtype.kind == "f" else _OTHER_ROWS
        for rows in sorted({max(1, min(n, _PROBE_CELLS // width)) for n in counts}):
            x = _probe(rng, dtype, rows, n_features)
            try:
                expected = [np.asarray(estimator.predict(x))]
                if fast.has_proba:
                    expected.append(np.asarray(estimator.predict_proba(x)))
            except Exception as exc:  # the estimator refuses this dtype: leave it to the estimator
                log.debug("sklearn fast path: the estimator refused a probe", model_id=model_id,
                          dtype=str(dtype), error=str(exc))
                break
            try:
                got = [fast.predict(x)] + ([fast.predict_proba(x)] if fast.has_proba else [])
            except Exception as exc:  # the estimator answered: so must the arithmetic we read
                return [], f"the fast path fails on {rows} {dtype} rows: {exc!r}"
            for name, want, have in zip(("predict", "predict_proba"), expected, got, strict=False):
                if want.dtype != have.dtype or not np.array_equal(want, have):
                    return [], (f"{name} differs from the estimator's on {rows} {dtype} rows "
                                f"({have.dtype}{list(have.shape)} vs {want.dtype}{list(want.shape)})")
        else:
            passed.append(dtype)
    return passed, "no probe dtype passed"


def _probe(rng: np.random.Generator, dtype: np.dtype, rows: int, n_features: int) -> np.ndarray:
    """Random rows of ``dtype``; the first row all zeros, whose decision is the intercept alone
    (for a model without one, a tie at 0: ``> 0`` and ``>= 0`` answer differently)."""
    if dtype.kind == "b":
        x = rng.integers(0, 2, (rows, n_features)).astype(dtype)
    elif dtype.kind in "iu":
        x = rng.integers(-3, 4, (rows, n_features)).astype(dtype)
    else:
        x = (rng.standard_normal((rows, n_features)) * 3).astype(dtype)
    x[0] = 0
    return x
