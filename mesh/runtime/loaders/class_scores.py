"""Class indices and class probabilities from a gradient-boosted classifier's scores.

XGBoost and LightGBM Boosters answer a classifier's *scores* (P(class 1) for a binary model, one
probability per class, or a margin); the loaders serve ``predict`` as the class index and
``predict_proba`` as the probabilities (see each loader's docstring). This module holds the
arithmetic they share, written to decide exactly as the libraries' scikit-learn wrappers do:

* binary: class 1 where P(class 1) > 0.5, strictly (``XGBClassifier.predict`` thresholds with
  ``>``; ``LGBMClassifier.predict`` takes the argmax of [1 - p, p], which picks class 0 on a tie);
* several classes: the argmax, the first one on a tie (numpy's argmax, as both wrappers).

The probabilities keep the Booster's dtype (FP32 for XGBoost, FP64 for LightGBM): converting
would change neither the values' precision nor the decision, only the bytes on the wire.
"""

from __future__ import annotations

import numpy as np

# A binary model's "probability of class 1" above this is class 1 (the wrappers' threshold).
THRESHOLD = 0.5


def binary_labels(p: np.ndarray) -> np.ndarray:
    """INT64 0/1 per score of ``p`` (any shape): 1 where the probability is > 0.5."""
    return (np.asarray(p) > THRESHOLD).astype(np.int64)


def binary_proba(p: np.ndarray) -> np.ndarray:
    """[rows, 2] = [1 - p, p] for the probabilities ``p`` [rows] of class 1, in ``p``'s dtype."""
    p = np.asarray(p)
    return np.stack([1 - p, p], axis=1).astype(p.dtype, copy=False)


def argmax_labels(proba: np.ndarray) -> np.ndarray:
    """INT64 [rows]: the most probable class of each row of ``proba`` [rows, classes]."""
    return np.asarray(np.argmax(proba, axis=1), dtype=np.int64)


def sigmoid(margin: np.ndarray) -> np.ndarray:
    """The logistic function of ``margin``, in its dtype, without overflow for large |margin|."""
    margin = np.asarray(margin)
    e = np.exp(-np.abs(margin))  # in (0, 1]: never overflows
    return np.asarray(np.where(margin >= 0, 1 / (1 + e), e / (1 + e)), dtype=margin.dtype)


def softmax(margin: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``margin`` [rows, classes], in its dtype (shifted by the row maximum so
    that no exponential overflows)."""
    margin = np.asarray(margin)
    e = np.exp(margin - margin.max(axis=1, keepdims=True))
    return np.asarray(e / e.sum(axis=1, keepdims=True), dtype=margin.dtype)
