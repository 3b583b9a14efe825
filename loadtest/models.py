"""Models and requests for the benchmarks: small scikit-learn classifiers trained on synthetic data.

Trained in the benchmark itself, into its temporary directory (no downloads, no cache to go
stale), with fixed seeds so that every run serves the same models. ``LogisticRegression`` is used
because its load and predict are cheap and steady: the benchmarks measure the serving path, not
the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class TrainedModel:
    model_id: str
    path: Path
    n_features: int
    sample: np.ndarray  # one FP32 row [1, n_features]


def train_logistic(model_id: str, directory: Path, *, n_features: int, seed: int,
                   rows: int = 400) -> TrainedModel:
    """A binary LogisticRegression on ``rows`` random FP32 rows, saved with joblib."""
    import joblib
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, n_features)).astype(np.float32)
    w = rng.standard_normal(n_features)
    y = (x @ w > 0).astype(np.int64)
    model = LogisticRegression(max_iter=200).fit(x, y)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{model_id}.joblib"
    joblib.dump(model, path)
    return TrainedModel(model_id, path, n_features, x[:1].copy())


def infer_body(model: TrainedModel) -> bytes:
    """A serialized ModelInferRequest for the model's sample row, raw FP32 contents."""
    from mesh.tensors import encode_request

    request = encode_request(model_name=model.model_id, inputs={"input": model.sample}, raw=True)
    return request.SerializeToString()
