"""Model objects whose code misbehaves, for the model-worker tests (pickled with joblib; a worker
unpickles them, so this module must be importable there: the tests put the repository on the
workers' PYTHONPATH)."""

from __future__ import annotations

import ctypes
import time

import numpy as np


class CrashesOnPredict:
    """A scikit-learn-shaped model whose predict kills its process with SIGSEGV."""

    n_features_in_ = 2

    def predict(self, x: np.ndarray) -> np.ndarray:
        ctypes.string_at(0)  # a read of address 0 in this thread: a real segmentation fault
        return np.zeros(len(x))


class RaisesOnPredict:
    """A model whose own code raises: the client gets its message, not a traceback."""

    n_features_in_ = 2

    def predict(self, x: np.ndarray) -> np.ndarray:
        raise ZeroDivisionError("the model divided by zero")


class Hangs:
    """Unpickling never returns within a test (a hung load)."""

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (time.sleep, (600,))


class Balloons:
    """Unpickling allocates 2 GiB (a model that balloons while loading)."""

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (bytearray, (2 << 30,))


class HangsOnPredict:
    """A predict that never returns within a test, holding the interpreter as it waits."""

    n_features_in_ = 2

    def predict(self, x: np.ndarray) -> np.ndarray:
        while True:  # pure Python: the worker's other threads get the interpreter only in slices
            pass


class HugeOutput:
    """A predict whose answer is 80 MB per row: over any sane message limit."""

    n_features_in_ = 2

    def predict(self, x: np.ndarray) -> np.ndarray:
        print("predicting a huge output")  # model code prints: it goes to the worker's log
        return np.zeros((len(x), 10_000_000))
