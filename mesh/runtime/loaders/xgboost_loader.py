"""XGBoost models: a Booster saved with ``save_model`` as JSON (``.json``) or UBJSON (``.ubj``).

Models saved from the scikit-learn wrappers (``XGBClassifier.save_model``) load too, as the Booster
inside them: the wrapper's label decoding is not part of the file.

Input: one 2-D numeric tensor [rows, features], under any name; the feature count is checked
against ``Booster.num_features()``. NaN is XGBoost's "missing" marker.

Output ``predict``: FP32, exactly what ``Booster.inplace_predict`` returns, i.e. the objective's
transformed prediction, **not** class labels:

* ``binary:logistic``: the probability of class 1, shape [rows];
* ``multi:softprob``: class probabilities, shape [rows, classes] (XGBClassifier's default for
  more than two classes);
* ``multi:softmax``: the class index as a float, shape [rows];
* regression objectives: the predicted value, shape [rows].

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

from mesh.runtime.loaders.base import LoadedModel, Loader, LoadPolicy, held, tabular_input
from mesh.tensors import TensorSpec


class XGBoostModel(LoadedModel):
    platform = "xgboost"

    def __init__(self, model_id: str, booster: Any) -> None:
        self.n_features = int(booster.num_features())
        config = json.loads(booster.save_config())["learner"]
        objective = config["objective"]["name"]
        n_classes = int(float(config["learner_model_param"].get("num_class", "0")))
        shape: tuple[int, ...] = (-1, n_classes) if objective == "multi:softprob" else (-1,)
        super().__init__(
            model_id=model_id,
            type="xgboost",
            device="ram",
            inputs=[TensorSpec("input", "FP32", (-1, self.n_features))],
            outputs=[TensorSpec("predict", "FP32", shape)],
        )
        self.objective: str = objective
        self._booster: Any = booster
        self._footprint = len(booster.save_raw("ubj"))

    def _predict(self, inputs: Mapping[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        booster = held(self._booster, self.model_id)
        x = tabular_input(inputs, self.n_features, "xgboost")
        # Features are matched by position, as for every V2 tabular model; the count is checked
        # above, so xgboost's name check (which numpy input cannot satisfy) is off.
        return {"predict": np.asarray(booster.inplace_predict(x, validate_features=False))}

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
