"""The load generator's histogram and arrival schedules (``loadtest.histogram``, ``loadtest.arrivals``)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loadtest.arrivals import (
    Popularity,
    ScheduleError,
    gamma_times,
    open_loop_schedule,
    parse_arrivals,
    parse_popularity,
    poisson_times,
    read_trace,
    zipf_weights,
)
from loadtest.histogram import MAX_RELATIVE_ERROR, Histogram
from placement.request import Request
from placement.traces import write_trace

QUANTILES = (0.0, 0.5, 0.9, 0.99, 0.999, 1.0)
# latencies in seconds, 1 µs .. 100 s, log-uniform-ish so every bucket range is exercised
latencies = st.lists(st.floats(min_value=-6, max_value=2).map(lambda e: 10.0**e), min_size=1, max_size=400)


def _close(got: float, exact: float) -> bool:
    # the bucket's relative error, or 1 µs (the unit values are kept in), plus float slack
    return abs(got - exact) <= max(exact * MAX_RELATIVE_ERROR, 1e-6) + 1e-12


@settings(max_examples=200, deadline=None)
@given(latencies)
def test_quantiles_are_within_the_bucket_error_of_numpy(values: list[float]) -> None:
    h = Histogram()
    h.record_many(values)
    data = np.asarray(values)
    for q in QUANTILES:
        exact = float(np.quantile(data, q, method="inverted_cdf"))
        # ceil(q*n) in floating point may pick a neighbouring rank; accept the ranks around it
        rank = max(math.ceil(q * len(data)), 1)
        neighbours = np.sort(data)[max(rank - 2, 0):rank + 1]
        got = h.quantile(q)
        assert _close(got, exact) or any(_close(got, float(v)) for v in neighbours), (q, got, exact)
    assert h.n == len(values)
    assert h.max_s == max(values)
    assert h.quantile(1.0) == pytest.approx(max(values), rel=MAX_RELATIVE_ERROR, abs=1e-6)


@settings(max_examples=100, deadline=None)
@given(latencies, latencies)
def test_merge_equals_recording_everything_in_one(a: list[float], b: list[float]) -> None:
    ha, hb, both = Histogram(), Histogram(), Histogram()
    ha.record_many(a)
    hb.record_many(b)
    both.record_many(a + b)
    merged = ha.merge(hb)
    assert np.array_equal(merged.counts, both.counts)
    assert (merged.n, merged.min_s, merged.max_s) == (both.n, both.min_s, both.max_s)
    assert merged.sum_s == pytest.approx(both.sum_s)
    for q in QUANTILES:
        assert merged.quantile(q) == both.quantile(q)


def test_empty_histogram_and_values_out_of_range() -> None:
    h = Histogram()
    assert math.isnan(h.quantile(0.5))
    assert math.isnan(h.summary_ms()["p99"])
    h.record(500.0)  # above 100 s: counted in the top bucket, max exact
    h.record(-1.0)  # a clock step backwards: counted as 0
    assert h.n == 2
    assert h.max_s == 500.0
    assert h.quantile(0.0) == 0.0
    assert set(h.summary_ms()) == {"p50", "p90", "p99", "p99.9", "max", "mean"}


def test_poisson_rate_is_within_tolerance() -> None:
    rng = np.random.default_rng(1)
    times = poisson_times(200.0, 100.0, rng)
    assert len(times) == pytest.approx(20_000, rel=0.03)
    assert np.all(np.diff(times) >= 0) and times[-1] < 100.0
    gaps = np.diff(times)
    assert np.std(gaps) / np.mean(gaps) == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("cv", [0.5, 2.0, 4.0])
def test_bursty_gaps_have_the_requested_cv(cv: float) -> None:
    rng = np.random.default_rng(2)
    times = gamma_times(100.0, cv, 500.0, rng)
    gaps = np.diff(times)
    assert np.std(gaps) / np.mean(gaps) == pytest.approx(cv, rel=0.1)
    assert len(times) == pytest.approx(50_000, rel=0.1)


def test_zipf_popularity_ranks_follow_the_exponent() -> None:
    w = zipf_weights(10, 1.0)
    assert w.sum() == pytest.approx(1.0)
    assert np.all(np.diff(w) < 0)
    assert w[0] / w[1] == pytest.approx(2.0)
    picks = parse_popularity("zipf:1.0", 10, None).pick(100_000, np.random.default_rng(3))
    counts = np.bincount(picks, minlength=10)
    assert np.all(np.diff(counts[:4]) < 0)  # the most popular ranks come in order
    assert counts[0] / counts[9] == pytest.approx(10.0, rel=0.15)
    uniform = np.bincount(parse_popularity("uniform", 4, None).pick(40_000, np.random.default_rng(4)))
    assert np.all(np.abs(uniform - 10_000) < 500)


def test_trace_replay_keeps_order_and_relative_timing(tmp_path: Path) -> None:
    path = tmp_path / "trace.csv"
    rows = [Request(10.0 + 0.25 * i, f"m{i % 3 if i < 6 else 7}", 100, 5.0, 0.0) for i in range(12)]
    write_trace(path, rows)
    trace = read_trace(str(path))
    assert trace.ids == ["m0", "m1", "m2", "m7"]
    assert [trace.ids[i] for i in trace.models] == [r.model_id for r in rows]
    assert np.allclose(trace.times, [0.25 * i for i in range(12)])
    pop = parse_popularity(f"trace:{path}", len(trace.ids), trace)
    assert pop.pick(12, np.random.default_rng()).tolist() == trace.models.tolist()
    # two workers share the trace: each takes every other request, at the trace's own times
    w0 = open_loop_schedule("trace", 0.0, 0.0, 2.0, np.random.default_rng(), trace, 0, 2)
    w1 = open_loop_schedule("trace", 0.0, 0.0, 2.0, np.random.default_rng(), trace, 1, 2)
    assert w0.tolist() == [0.0, 0.5, 1.0, 1.5] and w1.tolist() == [0.25, 0.75, 1.25, 1.75]
    assert pop.pick(4, np.random.default_rng(), offset=1, stride=2).tolist() == trace.models[1::2][:4].tolist()


def test_bad_specs_are_schedule_errors() -> None:
    for spec in ("zipf:x", "zipf:-1", "pareto"):
        with pytest.raises(ScheduleError):
            parse_popularity(spec, 3, None)
    for spec in ("bursty:0", "bursty:x", "uniform"):
        with pytest.raises(ScheduleError):
            parse_arrivals(spec)
    assert parse_arrivals("bursty:2.5") == ("bursty", 2.5)
    assert isinstance(parse_popularity("zipf", 3, None), Popularity)
