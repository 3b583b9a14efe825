"""scikit-learn models: an estimator or pipeline saved with ``joblib.dump`` (``.joblib`` / ``.pkl``),
or with skops (``.skops``: ``skops.io.dump``), the format that runs no code when it is loaded (only
the types skops trusts, and those in ``runtime.skops_trusted_types``, are rebuilt).

Input: one 2-D numeric tensor [rows, features], under any name (tabular models have exactly one
input, and clients name it variously); FP32 or FP64 as a rule, integers and BOOL are accepted too
since scikit-learn converts them itself. The feature count is checked against ``n_features_in_``.

Outputs, following MLServer's sklearn runtime:

* ``predict``: ``estimator.predict(x)`` as the model returns it: INT64 labels for classifiers
  trained on integer labels, BYTES for string labels (UTF-8), FP64 for regressors;
* ``predict_proba``: FP64 [rows, classes], for classifiers that have ``predict_proba``, returned
  **only when the request names it**. The default (no requested outputs) is ``predict`` alone, so a
  plain request pays for one pass through the model, not two.

A ``ValueError`` from the estimator (NaN in the input, a wrong dtype for a pipeline step) is the
request's fault in practice and becomes InvalidArgument with scikit-learn's message.

scikit-learn's dense linear models (LogisticRegression, Ridge, SGDClassifier, LinearSVC, ...,
exactly those types) are predicted by :mod:`~mesh.runtime.loaders.sklearn_linear` with numpy from
copies of their fitted arrays, skipping scikit-learn's per-call validation of an input already
checked here; the answers are the estimator's bit for bit, verified at load, and whatever that
module does not answer (NaN, an unverified dtype, an unverified model) goes to the estimator.

Thread safety: ``predict`` and ``predict_proba`` of fitted estimators only read the fitted state,
and the linear fast path only its read-only copies, so concurrent calls need no lock.

Footprint: :func:`~mesh.runtime.loaders.sizing.deep_nbytes` over the unpickled estimator, i.e. a
deep walk summing its numpy arrays' bytes and its containers' ``sys.getsizeof`` (pipelines, nested
estimators and Cython trees included), plus the linear fast path's copies when there is one.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mesh.errors import InvalidArgument, ModelLoadError
from mesh.runtime.loaders.base import LoadedModel, Loader, LoadPolicy, held, reason, tabular_input
from mesh.runtime.loaders.sizing import deep_nbytes
from mesh.runtime.loaders.sklearn_linear import LinearFastPath, linear_fast_path
from mesh.tensors import TensorSpec, datatype_for


def _load_skops(file: Path, trusted: tuple[str, ...]) -> Any:
    """A skops file, loading only the types skops trusts by default and ``trusted``: a type it
    does not trust is refused by name, with the setting that would admit it."""
    from skops.io import get_untrusted_types, load

    untrusted = [t for t in get_untrusted_types(file=file) if t not in trusted]
    if untrusted:
        raise ModelLoadError(
            f"sklearn: {file.name} holds types skops does not trust by default ({', '.join(untrusted[:5])}); "
            "load it only if you trust where it comes from, by adding them to runtime.skops_trusted_types")
    return load(file, trusted=list(trusted) or None)


class SklearnModel(LoadedModel):
    platform = "sklearn"

    def __init__(self, model_id: str, estimator: Any) -> None:
        n_features = getattr(estimator, "n_features_in_", None)
        self._n_features = int(n_features) if n_features is not None else None
        outputs = [_predict_spec(estimator)]
        classes = getattr(estimator, "classes_", None)
        if isinstance(classes, np.ndarray) and hasattr(estimator, "predict_proba"):
            outputs.append(TensorSpec("predict_proba", "FP64", (-1, len(classes))))
        super().__init__(
            model_id=model_id,
            type="sklearn",
            device="ram",
            inputs=[TensorSpec("input", "FP64", (-1, self._n_features or -1))],
            outputs=outputs,
            default_outputs=["predict"],
        )
        self._estimator: Any = estimator
        self._fast: LinearFastPath | None = linear_fast_path(estimator, model_id)
        self._footprint = deep_nbytes(estimator) + (deep_nbytes(self._fast) if self._fast else 0)

    def _predict(self, inputs: Mapping[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        estimator = held(self._estimator, self.model_id)
        x = tabular_input(inputs, self._n_features, "sklearn")
        fast = self._fast
        if fast is not None and not fast.takes(x):
            fast = None
        out: dict[str, np.ndarray] = {}
        try:
            if "predict" in names:
                out["predict"] = fast.predict(x) if fast else np.asarray(estimator.predict(x))
            if "predict_proba" in names:
                proba = fast.predict_proba(x) if fast and fast.has_proba else estimator.predict_proba(x)
                out["predict_proba"] = np.asarray(proba, dtype=np.float64)
        except ValueError as exc:
            raise InvalidArgument(f"sklearn: the model refused the input: {reason(exc)}") from exc
        return out

    def footprint_bytes(self) -> int:
        return self._footprint

    def _release(self) -> None:
        self._estimator = None
        self._fast = None


def _predict_spec(estimator: Any) -> TensorSpec:
    """The ``predict`` output's metadata: label type from ``classes_``, FP64 for regressors."""
    classes = getattr(estimator, "classes_", None)
    n_outputs = int(getattr(estimator, "n_outputs_", 1) or 1)
    shape: tuple[int, ...] = (-1,) if n_outputs == 1 else (-1, n_outputs)
    if isinstance(classes, np.ndarray):
        return TensorSpec("predict", datatype_for(classes.dtype), shape)
    if isinstance(classes, list) and classes and isinstance(classes[0], np.ndarray):
        return TensorSpec("predict", datatype_for(classes[0].dtype), shape)  # multi-output
    return TensorSpec("predict", "FP64", shape)


class SklearnLoader(Loader):
    type = "sklearn"
    extensions = (".joblib", ".pkl", ".pickle", ".skops")
    code_extensions = (".joblib", ".pkl", ".pickle")
    safe_format_hint = "; save the model with skops (skops.io.dump, a .skops file), which loads no code"

    def _load(self, model_id: str, file: Path, key: Mapping[str, Any], device: str,
              policy: LoadPolicy) -> LoadedModel:
        if file.suffix.lower() == ".skops":
            estimator = _load_skops(file, policy.trusted_types)
        else:
            import joblib

            estimator = joblib.load(file)
        if not callable(getattr(estimator, "predict", None)):
            raise ModelLoadError(
                f"sklearn: {file} holds a {type(estimator).__name__}, which has no predict()"
            )
        return SklearnModel(model_id, estimator)
