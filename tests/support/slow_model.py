"""A scikit-learn-like estimator whose predict takes a fixed time: requests that are still in
flight when a runtime is told to stop (tests/e2e/test_reliability_restarts.py).

The runtime unpickles it with the sklearn loader (``joblib.load``), so the runtime process must be
able to import this module: tests start runtimes from the repository root.
"""

from __future__ import annotations

import time
from pathlib import Path

import joblib
import numpy as np


class SlowRegressor:
    def __init__(self, delay_s: float, n_features: int) -> None:
        self.delay_s = delay_s
        self.n_features_in_ = n_features

    def predict(self, x: np.ndarray) -> np.ndarray:
        time.sleep(self.delay_s)  # the point of this model: an inference that takes a while
        return np.zeros(len(x), dtype=np.float64)


def save_slow(directory: Path, name: str, delay_s: float, n_features: int = 4) -> Path:
    path = directory / f"{name}.joblib"
    joblib.dump(SlowRegressor(delay_s, n_features), path)
    return path
