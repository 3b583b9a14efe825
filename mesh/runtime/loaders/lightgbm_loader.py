"""LightGBM models: a Booster saved with ``save_model`` as text (``.txt``).

Input: one 2-D numeric tensor [rows, features], under any name; the feature count is checked
against ``Booster.num_feature()``.

Output ``predict``: FP64, exactly what ``Booster.predict`` returns: for ``binary`` the probability
of class 1 [rows]; for ``multiclass`` class probabilities [rows, classes]; for regression the
value [rows].

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

from mesh.runtime.loaders.base import LoadedModel, Loader, LoadPolicy, held, tabular_input
from mesh.tensors import TensorSpec


class LightGBMModel(LoadedModel):
    platform = "lightgbm"

    def __init__(self, model_id: str, booster: Any) -> None:
        self._n_features = int(booster.num_feature())
        n_classes = int(booster.num_model_per_iteration())
        shape: tuple[int, ...] = (-1, n_classes) if n_classes > 1 else (-1,)
        super().__init__(
            model_id=model_id,
            type="lightgbm",
            device="ram",
            inputs=[TensorSpec("input", "FP64", (-1, self._n_features))],
            outputs=[TensorSpec("predict", "FP64", shape)],
        )
        self._booster: Any = booster
        self._lock = threading.Lock()
        self._footprint = len(booster.model_to_string())

    def _predict(self, inputs: Mapping[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        booster = held(self._booster, self.model_id)
        x = tabular_input(inputs, self._n_features, "lightgbm")
        with self._lock:
            result = booster.predict(x, num_threads=1)
        return {"predict": np.asarray(result, dtype=np.float64)}

    def footprint_bytes(self) -> int:
        return self._footprint

    def _release(self) -> None:
        self._booster = None


class LightGBMLoader(Loader):
    type = "lightgbm"
    extensions = (".txt",)

    def _load(self, model_id: str, file: Path, key: Mapping[str, Any], device: str,
              policy: LoadPolicy) -> LoadedModel:
        import lightgbm

        return LightGBMModel(model_id, lightgbm.Booster(model_file=str(file)))
