"""Size prediction: the default ratio, learning per type, clamping of outliers, and the floor."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from placement.sizing import SizeEstimator

MB = 1_000_000


def test_default_prediction_is_file_size_times_1_25() -> None:
    e = SizeEstimator()
    assert e.ratio("sklearn") == 1.25
    assert e.observations("sklearn") == 0
    assert e.predict("sklearn", 100 * MB) == 125 * MB
    assert e.predict("sklearn", 100 * MB + 1) == 125 * MB + 2  # rounded up, never down


def test_floor() -> None:
    e = SizeEstimator(floor_bytes=2 * MB)
    assert e.predict("sklearn", 1_000) == 2 * MB  # tiny model: the conservative floor
    assert e.predict("sklearn", 0) == 2 * MB  # unknown file size
    assert e.predict("sklearn", -1) == 2 * MB
    assert SizeEstimator().predict("x", 10) == 1_000_000  # the adapters' DEFAULT_MODELSIZE


def test_ratio_converges_to_observed_ratio() -> None:
    e = SizeEstimator()
    for _ in range(40):
        e.observe("xgboost", 100 * MB, 40 * MB)
    assert e.ratio("xgboost") == pytest.approx(0.4, rel=1e-3)
    assert e.predict("xgboost", 50 * MB) == pytest.approx(20 * MB, rel=1e-3)
    assert e.ratio("sklearn") == 1.25  # types learn separately


def test_first_observations_count_fully_against_the_default() -> None:
    # A running mean in which the default is one sample: one load moves the ratio half way.
    e = SizeEstimator()
    e.observe("onnx", 10 * MB, 30 * MB)  # ratio 3
    assert e.ratio("onnx") == pytest.approx((1.25 + 3.0) / 2)
    e.observe("onnx", 10 * MB, 30 * MB)
    assert e.ratio("onnx") == pytest.approx((1.25 + 3.0 + 3.0) / 3)
    assert e.observations("onnx") == 2


def test_ratio_follows_a_change_in_the_mix() -> None:
    e = SizeEstimator(alpha=0.2)
    for _ in range(30):
        e.observe("torch", MB, 2 * MB)
    assert e.ratio("torch") == pytest.approx(2.0, rel=1e-2)
    for _ in range(30):
        e.observe("torch", MB, 4 * MB)
    assert e.ratio("torch") == pytest.approx(4.0, rel=1e-2)


def test_outliers_are_clamped() -> None:
    e = SizeEstimator(min_ratio=0.5, max_ratio=8.0)
    e.observe("lightgbm", MB, 1_000 * MB)  # a concurrent load counted in the delta
    assert e.ratio("lightgbm") == pytest.approx((1.25 + 8.0) / 2)
    e2 = SizeEstimator(min_ratio=0.5, max_ratio=8.0)
    e2.observe("lightgbm", MB, 1)  # the allocator reused freed pages
    assert e2.ratio("lightgbm") == pytest.approx((1.25 + 0.5) / 2)


def test_unusable_observations_are_ignored() -> None:
    e = SizeEstimator()
    e.observe("sklearn", 0, 5 * MB)
    e.observe("sklearn", 5 * MB, 0)
    assert e.ratio("sklearn") == 1.25 and e.observations("sklearn") == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"default_ratio": 0.0, "min_ratio": 0.0},
        {"min_ratio": 2.0},  # above the default
        {"max_ratio": 1.0},  # below the default
        {"max_ratio": float("inf")},
        {"alpha": 0.0},
        {"alpha": 1.5},
        {"floor_bytes": -1},
    ],
)
def test_bad_settings_are_rejected(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        SizeEstimator(**kwargs)  # type: ignore[arg-type]


@given(
    observations=st.lists(st.tuples(st.integers(1, 10**10), st.integers(1, 10**11)), min_size=1, max_size=60),
    file_size=st.integers(1, 10**10),
)
def test_ratio_stays_in_range_and_prediction_is_conservative(
    observations: list[tuple[int, int]], file_size: int
) -> None:
    e = SizeEstimator(min_ratio=0.1, max_ratio=20.0, floor_bytes=MB)
    for f, m in observations:
        e.observe("t", f, m)
        assert 0.1 <= e.ratio("t") <= 20.0
    predicted = e.predict("t", file_size)
    assert predicted >= MB
    assert predicted >= file_size * e.ratio("t")


@given(ratio=st.floats(0.1, 20.0), start=st.floats(0.1, 20.0))
def test_repeated_observations_converge_from_any_start(ratio: float, start: float) -> None:
    e = SizeEstimator(default_ratio=start, min_ratio=0.1, max_ratio=20.0)
    for _ in range(100):
        e.observe("t", 10**9, round(10**9 * ratio))
    assert e.ratio("t") == pytest.approx(ratio, rel=1e-3)
