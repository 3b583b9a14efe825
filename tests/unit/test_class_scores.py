"""The class-score arithmetic the XGBoost and LightGBM loaders share (mesh.runtime.loaders.class_scores)."""

from __future__ import annotations

import warnings

import numpy as np

from mesh.runtime.loaders import class_scores


def test_binary_threshold_is_strict_as_the_wrappers() -> None:
    p = np.array([0.0, 0.4999, 0.5, 0.5001, 1.0], np.float32)
    np.testing.assert_array_equal(class_scores.binary_labels(p), [0, 0, 0, 1, 1])
    assert class_scores.binary_labels(p).dtype == np.int64
    proba = class_scores.binary_proba(p)
    assert proba.shape == (5, 2) and proba.dtype == np.float32
    np.testing.assert_array_equal(proba[:, 1], p)
    np.testing.assert_allclose(proba.sum(axis=1), 1)


def test_argmax_takes_the_first_class_on_a_tie() -> None:
    proba = np.array([[0.2, 0.4, 0.4], [0.5, 0.5, 0.0], [0.1, 0.2, 0.7]])
    np.testing.assert_array_equal(class_scores.argmax_labels(proba), [1, 0, 2])


def test_sigmoid_and_softmax_keep_the_dtype_and_do_not_overflow() -> None:
    margin = np.array([-1e4, -30.0, 0.0, 2.0, 1e4], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an overflow would warn
        p = class_scores.sigmoid(margin)
        s = class_scores.softmax(np.array([[1e4, 0.0, -1e4], [1.0, 2.0, 3.0]], np.float32))
    assert p.dtype == np.float32 and s.dtype == np.float32
    np.testing.assert_allclose(p, [0.0, 1 / (1 + np.exp(30.0)), 0.5, 1 / (1 + np.exp(-2.0)), 1.0], rtol=1e-6)
    np.testing.assert_allclose(s[0], [1.0, 0.0, 0.0])
    e = np.exp([1.0, 2.0, 3.0])
    np.testing.assert_allclose(s[1], e / e.sum(), rtol=1e-6)
