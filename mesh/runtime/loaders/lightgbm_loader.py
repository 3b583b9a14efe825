"""LightGBM models: a Booster saved with ``save_model`` as text (``.txt``).

Input: one 2-D numeric tensor [rows, features], under any name; the feature count is checked
against ``Booster.num_feature()``.

Outputs, named as in our scikit-learn loader: ``predict`` holds what the model predicts, and for
a classifier that is the class, not a probability.

* Classification objectives (``binary``, ``multiclass``, ``multiclassova``; read from the file's
  ``objective=`` line, where LightGBM writes the canonical name of any alias):

  - ``predict``: INT64 class index, shape [rows], what ``LGBMClassifier.predict`` answers for a
    model trained on the labels 0..classes-1: ``binary``: 1 where P(class 1) > 0.5 (strictly);
    the others: the argmax. The labels the model was trained on are not in a Booster file.
  - ``predict_proba``: FP64 [rows, classes], returned **only when the request names it**, what
    ``Booster.predict`` returns (and ``LGBMClassifier.predict_proba``): ``binary``: [1 - p, p],
    shape [rows, 2] as scikit-learn gives it, so column k is class k whatever the number of
    classes; ``multiclass``: the softmax probabilities; ``multiclassova``: each class's own
    sigmoid (one-vs-all: the rows need not sum to 1).

  The default (a request naming no outputs) is ``predict`` alone, as in the scikit-learn loader
  and MLServer's XGBoost runtime; both outputs come from one ``Booster.predict`` pass.
  MLServer's LightGBM runtime differs: its one output, ``predict``, is ``Booster.predict``, the
  probabilities; the name says "prediction" here and in our other loaders, so we do not follow it.

* Other objectives (regression, ranking, ``cross_entropy``, a custom objective): ``predict`` only,
  FP64, exactly what ``Booster.predict`` returns, shape [rows].

Threading: each model holds a lock around ``predict``. LightGBM's C API takes only a *shared* lock
there, yet building the per-call Predictor writes into the Booster (LightGBM issue #6142, noted in
its ``c_api.cpp``), so concurrent calls on one Booster race. The lock serialises requests to one
copy only; other models are unaffected, and a hot model gets more copies. Each call uses
``num_threads=1`` for the reason given in the xgboost loader: parallelism comes from concurrent
requests.

Footprint: ``len(booster.model_to_string())``, the model's text form. The in-memory trees hold
the same numbers in binary, so this is an upper-side estimate of the trees; the runtime takes the
larger of it and the process's RSS growth during the load.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mesh.runtime.loaders import class_scores
from mesh.runtime.loaders.base import LoadedModel, Loader, LoadPolicy, held, tabular_input
from mesh.tensors import TensorSpec

_CLASSIFIERS = ("binary", "multiclass", "multiclassova")


class LightGBMModel(LoadedModel):
    platform = "lightgbm"

    def __init__(self, model_id: str, booster: Any) -> None:
        self._n_features = int(booster.num_feature())
        n_classes = int(booster.num_model_per_iteration())
        text = booster.model_to_string()
        self.objective: str = _objective(text)
        outputs: list[TensorSpec]
        if self.objective in _CLASSIFIERS:
            outputs = [TensorSpec("predict", "INT64", (-1,)),
                       TensorSpec("predict_proba", "FP64", (-1, max(n_classes, 2)))]
        else:
            outputs = [TensorSpec("predict", "FP64", (-1, n_classes) if n_classes > 1 else (-1,))]
        super().__init__(
            model_id=model_id,
            type="lightgbm",
            device="ram",
            inputs=[TensorSpec("input", "FP64", (-1, self._n_features))],
            outputs=outputs,
            default_outputs=["predict"],
        )
        self._booster: Any = booster
        self._lock = threading.Lock()
        self._footprint = len(text)

    def _predict(self, inputs: Mapping[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        booster = held(self._booster, self.model_id)
        x = tabular_input(inputs, self._n_features, "lightgbm")
        with self._lock:
            result = booster.predict(x, num_threads=1)
        scores = np.asarray(result, dtype=np.float64)
        if self.objective not in _CLASSIFIERS:
            return {"predict": scores}
        if scores.ndim == 1:  # binary: P(class 1)
            return {"predict": class_scores.binary_labels(scores), "predict_proba": class_scores.binary_proba(scores)}
        return {"predict": class_scores.argmax_labels(scores), "predict_proba": scores}

    def footprint_bytes(self) -> int:
        return self._footprint

    def _release(self) -> None:
        self._booster = None


def _objective(model_text: str) -> str:
    """The objective's name from a model's text (its ``objective=binary sigmoid:1`` header line:
    the name, then the objective's parameters); "" if there is none."""
    for line in model_text.splitlines():
        if line.startswith("objective="):
            words = line[len("objective="):].split()
            return words[0] if words else ""
        if line.startswith("Tree="):  # the header is over
            break
    return ""


class LightGBMLoader(Loader):
    type = "lightgbm"
    extensions = (".txt",)

    def _load(self, model_id: str, file: Path, key: Mapping[str, Any], device: str,
              policy: LoadPolicy) -> LoadedModel:
        import lightgbm

        return LightGBMModel(model_id, lightgbm.Booster(model_file=str(file)))
