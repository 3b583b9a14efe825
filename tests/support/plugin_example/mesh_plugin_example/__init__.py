"""An example model-loader plug-in, as a user's own package would be (mesh.runtime.loaders).

Model type ``linear-json``: a JSON file ``{"weights": [w1, ..., wn], "bias": b}``; one 2-D input
of n features; one output ``score`` = input @ weights + bias. Declared in the package's metadata::

    [project.entry-points."mesh_serving.loaders"]
    linear-json = "mesh_plugin_example:LinearJsonLoader"
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mesh.errors import InvalidArgument
from mesh.runtime.loaders.base import LoadedModel, Loader, LoadPolicy
from mesh.tensors import TensorSpec


class LinearModel(LoadedModel):
    platform = "linear-json"

    def __init__(self, *, weights: np.ndarray, bias: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.weights: np.ndarray | None = weights
        self.bias = bias

    def _predict(self, inputs: Mapping[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        assert self.weights is not None
        x = np.asarray(next(iter(inputs.values())), dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(self.weights):
            raise InvalidArgument(f"input must be [rows, {len(self.weights)}], not {list(x.shape)}")
        return {"score": x @ self.weights + self.bias}

    def footprint_bytes(self) -> int:
        return (self.weights.nbytes if self.weights is not None else 0) + 64

    def _release(self) -> None:
        self.weights = None


class LinearJsonLoader(Loader):
    type = "linear-json"
    extensions = (".json",)

    def _load(self, model_id: str, file: Path, key: Mapping[str, Any], device: str,
              policy: LoadPolicy) -> LoadedModel:
        data = json.loads(file.read_text())
        weights = np.asarray(data["weights"], dtype=np.float64)
        return LinearModel(model_id=model_id, type=self.type, device=device, weights=weights,
                           bias=float(data["bias"]),
                           inputs=[TensorSpec("input", "FP64", (-1, len(weights)))],
                           outputs=[TensorSpec("score", "FP64", (-1,))])
