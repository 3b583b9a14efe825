"""XGBoost models: a Booster saved with ``save_model`` as JSON (``.json``) or UBJSON (``.ubj``).

Models saved from the scikit-learn wrappers (``XGBClassifier.save_model``) load too, as the Booster
inside them: the wrapper's label decoding is not part of the file.

Input: one 2-D numeric tensor [rows, features], under any name; the feature count is checked
against ``Booster.num_features()``. NaN is XGBoost's "missing" marker.

Outputs, named as in our scikit-learn loader and MLServer's XGBoost runtime (which serves the
model through ``XGBClassifier``): ``predict`` holds what the model predicts, and for a classifier
that is the class, not a probability.

* Classification objectives:

  - ``predict``: INT64 class index, shape [rows], what ``XGBClassifier.predict`` answers for the
    same file. ``binary:logistic``: 1 where P(class 1) > 0.5 (strictly, as XGBClassifier and
    LGBMClassifier decide); ``multi:softprob``: the argmax; ``multi:softmax``: the model's own
    index; ``binary:hinge``: the model's 0/1. The index is all a Booster file knows: the labels
    the model was trained on (``XGBClassifier``'s label encoding) are not part of the file.
  - ``predict_proba``: FP32 [rows, classes], returned **only when the request names it**:
    ``multi:softprob``'s probabilities; ``multi:softmax``'s margins through a softmax (as
    ``XGBClassifier.predict_proba``); ``binary:logistic``: [1 - p, p], shape [rows, 2] as
    scikit-learn, XGBClassifier and MLServer give it, so that a client reads column k as class k
    whatever the number of classes (the single column P(class 1) is ``predict_proba[:, 1]``).
    ``binary:hinge`` has no probabilities, hence no ``predict_proba``.
  - ``binary:logitraw`` (a margin, not a probability) is served as the ``binary:logistic`` model
    with the same trees would be: ``predict_proba`` = the margin through the logistic function,
    ``predict`` = 1 where that is > 0.5, i.e. where the margin is > 0. XGBClassifier differs here
    (it compares the *margin* with 0.5, and refuses predict_proba for logitraw): its labels are
    wrong for margins in (0, 0.5].
  - A multi-label model (``binary:*`` with several targets) gives ``predict`` [rows, targets],
    one 0/1 per target, and ``predict_proba`` the [rows, targets] probabilities, as XGBClassifier.

  The default (a request naming no outputs) is ``predict`` alone, as in the scikit-learn loader
  and MLServer. Both come from one ``inplace_predict`` pass, except for ``multi:softmax``, whose
  probabilities need a second pass for the margins.

* Other objectives (regression, ranking, survival, ``reg:logistic``): ``predict`` only, FP32,
  exactly what ``Booster.inplace_predict`` returns: shape [rows], or [rows, targets] for a
  multi-target model.

Threading: ``inplace_predict`` is thread-safe for tree models (XGBoost >= 1.4, exercised by its own
threaded tests) and keeps no prediction cache, so no lock. The loader runs one prediction before
returning: XGBoost configures a Booster lazily on first use, and that should neither race between
the first concurrent requests nor add its latency to the first one.

Each model predicts with ``nthread=1``: the runtime gets its parallelism from serving many
requests at once, and a per-request OpenMP fan-out over all cores only adds synchronisation to the
small batches multi-model serving sees (large batches lose some speed).

Footprint: ``len(booster.save_raw("ubj"))``, the serialized trees: a lower bound of the in-memory
trees, which hold the same node data plus per-node bookkeeping. The runtime takes the larger of
this and the process's RSS growth during the load.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mesh.runtime.loaders import class_scores
from mesh.runtime.loaders.base import LoadedModel, Loader, LoadPolicy, held, tabular_input
from mesh.tensors import TensorSpec

_BINARY = ("binary:logistic", "binary:logitraw", "binary:hinge")
_MULTI = ("multi:softprob", "multi:softmax")


class XGBoostModel(LoadedModel):
    platform = "xgboost"

    def __init__(self, model_id: str, booster: Any) -> None:
        self.n_features = int(booster.num_features())
        config = json.loads(booster.save_config())["learner"]
        objective = config["objective"]["name"]
        params = config["learner_model_param"]
        n_classes = int(float(params.get("num_class", "0")))
        n_targets = int(float(params.get("num_target", "1")))
        rows: tuple[int, ...] = (-1,) if n_targets <= 1 else (-1, n_targets)
        outputs: list[TensorSpec]
        if objective in _MULTI:
            outputs = [TensorSpec("predict", "INT64", (-1,)), TensorSpec("predict_proba", "FP32", (-1, n_classes))]
        elif objective == "binary:hinge":
            outputs = [TensorSpec("predict", "INT64", rows)]
        elif objective in _BINARY:
            proba: tuple[int, ...] = (-1, 2) if n_targets <= 1 else (-1, n_targets)
            outputs = [TensorSpec("predict", "INT64", rows), TensorSpec("predict_proba", "FP32", proba)]
        else:
            outputs = [TensorSpec("predict", "FP32", rows)]
        super().__init__(
            model_id=model_id,
            type="xgboost",
            device="ram",
            inputs=[TensorSpec("input", "FP32", (-1, self.n_features))],
            outputs=outputs,
            default_outputs=["predict"],
        )
        self.objective: str = objective
        self._booster: Any = booster
        self._footprint = len(booster.save_raw("ubj"))

    def _predict(self, inputs: Mapping[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        booster = held(self._booster, self.model_id)
        x = tabular_input(inputs, self.n_features, "xgboost")
        # Features are matched by position, as for every V2 tabular model; the count is checked
        # above, so xgboost's name check (which numpy input cannot satisfy) is off.
        scores = np.asarray(booster.inplace_predict(x, validate_features=False))
        objective = self.objective
        if objective not in _BINARY and objective not in _MULTI:
            return {"predict": scores}
        if objective == "multi:softmax":
            out = {"predict": scores.astype(np.int64)}
            if "predict_proba" in names:
                margin = booster.inplace_predict(x, predict_type="margin", validate_features=False)
                out["predict_proba"] = class_scores.softmax(np.asarray(margin))
            return out
        if objective == "multi:softprob":
            return {"predict": class_scores.argmax_labels(scores), "predict_proba": scores}
        if objective == "binary:logitraw":
            scores = class_scores.sigmoid(scores)  # the margin as binary:logistic's probability
        out = {"predict": class_scores.binary_labels(scores)}  # hinge: its 0/1 stays 0/1
        if objective != "binary:hinge":
            out["predict_proba"] = class_scores.binary_proba(scores) if scores.ndim == 1 else scores
        return out

    def footprint_bytes(self) -> int:
        return self._footprint

    def _release(self) -> None:
        self._booster = None


class XGBoostLoader(Loader):
    type = "xgboost"
    extensions = (".json", ".ubj")

    def _load(self, model_id: str, file: Path, key: Mapping[str, Any], device: str,
              policy: LoadPolicy) -> LoadedModel:
        import xgboost

        booster = xgboost.Booster()
        booster.load_model(str(file))
        booster.set_param({"nthread": 1})  # see the module docstring
        model = XGBoostModel(model_id, booster)
        # Warm-up (see the module docstring): one row of zeros is valid input for any tree model.
        booster.inplace_predict(np.zeros((1, model.n_features), np.float32), validate_features=False)
        return model
