"""Trace files and workload generators: CSV round trips and validation, the Azure 2019 layout, and the
statistical shape of the synthetic workloads (Zipf, churn, sweeps, bursty arrivals, sizes)."""

from __future__ import annotations

import io
import math
import re
from collections import Counter
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest

from placement.generators import SizeModel, azure_trace, bursty_arrivals, synthetic_azure_counts, zipf_trace
from placement.request import Request
from placement.traces import (
    AZURE_HEADER,
    AzureFunctionCounts,
    TraceError,
    load_trace,
    read_azure_counts,
    read_trace,
    write_azure_counts,
    write_trace,
)

MB = 1_000_000


# -- request trace CSV ----------------------------------------------------------------------------


def test_round_trip_is_exact(tmp_path: Path) -> None:
    reqs = [
        Request(0.0, "a", 0, 0.0),
        Request(0.1, "b,with comma", 50 * MB, 120.0, 3.25),
        Request(0.1, 'q"uote', 2**40, 1e-300, 0.1 + 0.2),
        Request(1e9 / 3, "a", 1, 1 / 3, 7e-7),
    ]
    path = tmp_path / "t.csv"
    assert write_trace(path, iter(reqs)) == 4  # a generator is fine: the writer streams
    assert path.read_text().splitlines()[0] == "time_s,model_id,size_bytes,load_ms,infer_ms"
    back = load_trace(path)
    assert back == reqs  # floats written with repr read back bit for bit
    assert all(type(r) is Request for r in back)
    assert back[0].model_id is back[3].model_id  # ids are interned


def test_reads_files_without_infer_ms_and_in_any_column_order(tmp_path: Path) -> None:
    path = tmp_path / "anchor.csv"
    path.write_text("time_s,model_id,size_bytes,load_ms\n0,7,50000000,120\n1.5,8,1000000,22.0\n\n")
    assert load_trace(path) == [Request(0.0, "7", 50 * MB, 120.0, 0.0), Request(1.5, "8", MB, 22.0, 0.0)]
    shuffled = io.StringIO("model_id,infer_ms,load_ms,time_s,size_bytes\nm,2.5,10,3,42\n")
    assert load_trace(shuffled) == [Request(3.0, "m", 42, 10.0, 2.5)]


def test_write_to_an_open_file_and_empty_trace() -> None:
    buf = io.StringIO()
    assert write_trace(buf, []) == 0
    buf.seek(0)
    assert load_trace(buf) == []


@pytest.mark.parametrize(
    ("body", "line", "fragment"),
    [
        ("1,a,1,1,0\n0.5,a,1,1,0\n", 3, "non-decreasing"),
        ("-1,a,1,1,0\n", 2, "time_s"),
        ("nan,a,1,1,0\n", 2, "time_s"),
        ("x,a,1,1,0\n", 2, "not a number"),
        ("0,a,-5,1,0\n", 2, "size_bytes -5 is negative"),
        ("0,a,1.5,1,0\n", 2, "not an integer"),
        ("0,a,1,-1,0\n", 2, "load_ms"),
        ("0,a,1,inf,0\n", 2, "load_ms"),
        ("0,a,1,1,-0.5\n", 2, "infer_ms"),
        ("0,,1,1,0\n", 2, "model_id is empty"),
        ("0,a,1,1\n", 2, "expected 5 fields, got 4"),
        ("0,a,1,1,0,9\n", 2, "expected 5 fields, got 6"),
        ("0,a,1,1,0\n0,a,1,1,0\n\n0,a,1,1,0\n3,b,x,1,0\n", 6, "size_bytes"),  # physical line numbers
    ],
)
def test_bad_rows_name_file_line_and_problem(tmp_path: Path, body: str, line: int, fragment: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("time_s,model_id,size_bytes,load_ms,infer_ms\n" + body)
    with pytest.raises(TraceError) as info:
        load_trace(path)
    err = info.value
    assert isinstance(err, ValueError)
    assert (err.path, err.line) == (str(path), line)
    assert fragment in err.problem
    assert str(err).startswith(f"{path}:{line}: ")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty file"),
        ("time_s,model_id,size_bytes\n", "missing column(s) load_ms"),
        ("time_s,model_id,size_bytes,load_ms,infer_s\n", "unknown column 'infer_s'"),
        ("time_s,model_id,size_bytes,load_ms,load_ms\n", "appears twice"),
    ],
)
def test_bad_headers(text: str, fragment: str) -> None:
    with pytest.raises(TraceError, match=re.escape(fragment)):
        load_trace(io.StringIO(text))


def test_reading_streams_up_to_the_bad_row(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    write_trace(path, [Request(float(i), "m", 1, 1.0) for i in range(5)])
    with path.open("a") as f:
        f.write("2,m,1,1,0\n")  # goes back in time
    it = read_trace(path)
    assert [next(it).time_s for _ in range(5)] == [0.0, 1.0, 2.0, 3.0, 4.0]
    with pytest.raises(TraceError, match=r"t\.csv:7: .*before the previous row"):
        next(it)


# -- Zipf workloads -------------------------------------------------------------------------------


def _times(trace: list[Request]) -> list[float]:
    return [r.time_s for r in trace]


def _ids(trace: list[Request]) -> list[str]:
    return [r.model_id for r in trace]


def test_zipf_is_deterministic_per_seed_and_sorted() -> None:
    a = zipf_trace(200, 5_000, alpha=1.0, seed=1)
    assert a == zipf_trace(200, 5_000, alpha=1.0, seed=1)
    b = zipf_trace(200, 5_000, alpha=1.0, seed=2)
    assert _ids(a) != _ids(b) and _times(a) != _times(b)
    for trace in (a, zipf_trace(200, 5_000, alpha=0.8, seed=3, cv=4.0, churn=0.5, churn_every=1_000)):
        t = np.array(_times(trace))
        assert len(trace) == 5_000 and t[0] > 0 and np.all(np.diff(t) >= 0)
    assert {r.model_id for r in a} <= {str(i) for i in range(200)}
    assert a[0].infer_ms == 0.0


def test_zipf_frequencies_follow_rank_power_law() -> None:
    for alpha in (0.8, 1.2):
        counts = sorted(Counter(_ids(zipf_trace(1_000, 200_000, alpha=alpha, seed=5))).values(), reverse=True)
        # rank 1 over rank 10 is 10**alpha (6.3 and 15.8); counts of ~2,000+ give a few % of noise
        assert counts[0] / counts[9] == pytest.approx(10**alpha, rel=0.15)
        # the log-log slope over the head is -alpha
        slope = np.polyfit(np.log(np.arange(1, 51)), np.log(counts[:50]), 1)[0]
        assert slope == pytest.approx(-alpha, abs=0.1)
    # the mean rate is rate_rps
    trace = zipf_trace(100, 20_000, alpha=1.0, seed=5, rate_rps=50.0)
    assert len(trace) / trace[-1].time_s == pytest.approx(50.0, rel=0.05)


def _hot(trace: list[Request], k: int = 20) -> set[str]:
    return {m for m, _ in Counter(_ids(trace)).most_common(k)}


def test_churn_changes_the_hot_set_and_nothing_else() -> None:
    still, full, half = (zipf_trace(2_000, 60_000, alpha=1.0, seed=9, churn=c, churn_every=20_000) for c in (0, 1, 0.5))
    # Same rank sequence and arrivals: only the rank-to-model mapping differs (as in anchors a and b).
    assert _times(still) == _times(full) == _times(half)
    assert _ids(still[:20_000]) == _ids(full[:20_000]) == _ids(half[:20_000])  # epoch 0 is shared
    epochs = [slice(0, 20_000), slice(20_000, 40_000), slice(40_000, 60_000)]
    assert len(_hot(still[epochs[0]]) & _hot(still[epochs[2]])) >= 17
    for e0, e1 in pairwise(epochs):
        assert len(_hot(full[e0]) & _hot(full[e1])) <= 2  # a full redraw: the hot set is new
        overlap = len(_hot(half[e0]) & _hot(half[e1]))
        assert 4 <= overlap <= 16  # about half the hot ranks keep their model
    # each epoch is itself Zipf: churn moves popularity, it does not flatten it
    top = Counter(_ids(full[epochs[1]])).most_common(1)[0][1]
    assert top == pytest.approx(20_000 / sum(1 / r for r in range(1, 2_001)), rel=0.1)


def test_churn_by_trace_time() -> None:
    trace = zipf_trace(500, 20_000, alpha=1.2, seed=4, rate_rps=100.0, churn=1.0, churn_period_s=50.0)
    by_epoch: dict[int, Counter[str]] = {}
    for r in trace:
        by_epoch.setdefault(int(r.time_s // 50.0), Counter())[r.model_id] += 1
    hottest = [by_epoch[e].most_common(1)[0][0] for e in sorted(by_epoch)]
    assert len(hottest) == math.ceil(trace[-1].time_s / 50.0)
    assert len(set(hottest)) >= len(hottest) - 2  # a new favourite almost every 50 s


def test_sweeps_insert_one_off_models_after_every_n_zipf_requests() -> None:
    base = zipf_trace(1_000, 10_000, alpha=1.0, seed=3)
    swept = zipf_trace(1_000, 10_000, alpha=1.0, seed=3, sweep_every=2_500, sweep_len=100)
    assert len(swept) == 10_000 + 3 * 100  # after Zipf requests 2,500, 5,000 and 7,500 (not 10,000)
    ids = _ids(swept)
    for k in range(3):
        start = 2_500 * (k + 1) + 100 * k
        assert ids[start : start + 100] == [str(1_000 + 100 * k + j) for j in range(100)]
    sweep_ids = {str(i) for i in range(1_000, 1_300)}
    assert [m for m in ids if m not in sweep_ids] == _ids(base)  # the Zipf sequence is unchanged
    assert all(n == 1 for m, n in Counter(ids).items() if m in sweep_ids)
    assert np.all(np.diff(_times(swept)) >= 0)


def test_bursty_arrivals_hit_the_requested_cv_and_rate() -> None:
    for cv in (1.0, 4.0):
        t = bursty_arrivals(200_000, rate_rps=20.0, cv=cv, seed=11)
        gaps = np.diff(np.concatenate(([0.0], t)))
        assert gaps.mean() == pytest.approx(1 / 20.0, rel=0.05)
        assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.05)
    assert np.array_equal(bursty_arrivals(100, rate_rps=1.0, seed=1), bursty_arrivals(100, rate_rps=1.0, seed=1))
    rng = np.random.default_rng(0)
    assert bursty_arrivals(10, rate_rps=1.0, seed=rng, start_s=100.0)[0] > 100.0
    with pytest.raises(ValueError):
        bursty_arrivals(10, rate_rps=0.0, seed=1)
    # the Zipf generator uses the same process
    trace = zipf_trace(50, 50_000, alpha=1.0, seed=2, cv=4.0)
    gaps = np.diff(_times(trace))
    assert gaps.std() / gaps.mean() == pytest.approx(4.0, rel=0.1)


# -- sizes and load costs -------------------------------------------------------------------------


def test_uniform_sizes_by_default() -> None:
    trace = zipf_trace(100, 2_000, alpha=1.0, seed=1)
    assert {(r.size_bytes, r.load_ms) for r in trace} == {(50 * MB, 120.0)}  # the anchors' a-c
    small = zipf_trace(10, 100, alpha=1.0, seed=1, sizes=SizeModel.uniform(MB, base_ms=5.0))
    assert {(r.size_bytes, r.load_ms) for r in small} == {(MB, 7.0)}


def test_lognormal_sizes_are_skewed_and_fixed_per_model() -> None:
    trace = zipf_trace(5_000, 50_000, alpha=0.8, seed=2, sizes=SizeModel.lognormal())
    per_model: dict[str, set[tuple[int, float]]] = {}
    for r in trace:
        per_model.setdefault(r.model_id, set()).add((r.size_bytes, r.load_ms))
    assert all(len(v) == 1 for v in per_model.values())  # a model's size never changes
    sizes = np.array([next(iter(v))[0] for v in per_model.values()])
    loads = np.array([next(iter(v))[1] for v in per_model.values()])
    assert sizes.dtype == np.int64 and sizes.min() >= MB and sizes.max() <= 2_000 * MB
    assert np.median(sizes) == pytest.approx(50 * MB, rel=0.1)  # anchors' d: median 49.7 MB
    assert sizes.mean() == pytest.approx(82.4 * MB, rel=0.1)  # exp(0.5) x median: mean 82.2 MB there
    assert np.allclose(loads, 20 + 2 * sizes / MB)  # load_ms = 20 + 2 * size_MB
    # same seed, other size model: the same requests, only sizes differ
    assert _ids(trace) == _ids(zipf_trace(5_000, 50_000, alpha=0.8, seed=2))


def test_load_noise_is_per_model_and_size_model_validation() -> None:
    sm = SizeModel.lognormal(load_noise_sigma=0.3)
    sizes, load = sm.draw(1_000, np.random.default_rng(1))
    ratio = load / (20 + 2 * sizes / MB)
    assert np.median(ratio) == pytest.approx(1.0, abs=0.05) and ratio.std() > 0.2
    trace = zipf_trace(300, 3_000, alpha=1.0, seed=1, sizes=sm)
    assert len({(r.model_id, r.load_ms) for r in trace}) == len({r.model_id for r in trace})
    with pytest.raises(ValueError):
        SizeModel.lognormal(median_bytes=10, min_bytes=100)
    with pytest.raises(ValueError):
        SizeModel("gaussian")  # type: ignore[arg-type]


# -- Azure Functions 2019 -------------------------------------------------------------------------


def test_azure_layout_parse_of_a_handwritten_file(tmp_path: Path) -> None:
    minutes = ",".join(str(i) for i in range(1, 1441))
    counts = ["0"] * 1440
    counts[0], counts[1439] = "7", "3"
    path = tmp_path / "invocations_per_function_md.anon.d01.csv"
    path.write_text(f"HashOwner,HashApp,HashFunction,Trigger,{minutes}\no1,a1,f1,http,{','.join(counts)}\n")
    (row,) = read_azure_counts(path)
    assert (row.owner, row.app, row.function, row.trigger) == ("o1", "a1", "f1", "http")
    assert row.counts.dtype == np.int32 and row.counts.shape == (1440,)
    assert row.counts[0] == 7 and row.counts[1439] == 3 and row.counts.sum() == 10


def test_synthetic_azure_fixture_round_trips_through_the_layout(tmp_path: Path) -> None:
    rows = synthetic_azure_counts(60, seed=4)
    again = synthetic_azure_counts(60, seed=4)
    assert all(a[:4] == b[:4] and np.array_equal(a.counts, b.counts) for a, b in zip(rows, again, strict=True))
    path = tmp_path / "invocations_per_function_md.anon.d01.csv"
    assert write_azure_counts(path, rows) == 60
    assert path.read_text().split("\n", 1)[0] == ",".join(AZURE_HEADER)
    back = read_azure_counts(path)
    assert [r[:4] for r in back] == [r[:4] for r in rows]
    assert all(np.array_equal(a.counts, b.counts) for a, b in zip(back, rows, strict=True))
    assert all(len(r.function) == 64 for r in rows)  # hashes shaped like the dataset's
    other = synthetic_azure_counts(60, seed=5)
    assert [r.function for r in other] != [r.function for r in rows]


def test_synthetic_azure_counts_look_like_the_dataset() -> None:
    rows = synthetic_azure_counts(400, seed=1)
    totals = np.array([r.counts.sum() for r in rows])
    assert totals.max() / max(np.median(totals), 1) > 100  # heavy-tailed rates
    triggers = Counter(r.trigger for r in rows)
    assert triggers.most_common(1)[0][0] == "http" and triggers["timer"] > 20
    for r in rows:
        if r.trigger == "timer":  # fixed period, one invocation per firing
            fired = np.flatnonzero(r.counts)
            assert r.counts.max() == 1 and len(set(np.diff(fired).tolist())) <= 1
    day = np.sum([r.counts for r in rows if r.trigger != "timer"], axis=0)
    assert day[12 * 60 : 16 * 60].sum() > day[0 : 4 * 60].sum()  # diurnal: afternoon over night


@pytest.mark.parametrize(
    ("edit", "line", "fragment"),
    [
        (lambda lines: [lines[0].replace("Trigger", "Kind"), *lines[1:]], 1, "not the Azure Functions 2019 layout"),
        (lambda lines: [lines[0], lines[1], lines[2].rsplit(",", 1)[0]], 3, "expected 1444 fields, got 1443"),
        (lambda lines: [lines[0], lines[1].replace(",0", ",-2", 1)], 2, "out of range"),
        (lambda lines: [lines[0], lines[1].replace(",0", ",x", 1)], 2, "count 'x' is not an integer"),
    ],
)
def test_azure_layout_errors(tmp_path: Path, edit: object, line: int, fragment: str) -> None:
    rows = [AzureFunctionCounts("o", "a", f"f{i}", "http", np.zeros(1440, np.int32)) for i in range(2)]
    buf = io.StringIO()
    write_azure_counts(buf, rows)
    path = tmp_path / "d01.csv"
    path.write_text("\n".join(edit(buf.getvalue().splitlines())) + "\n")  # type: ignore[operator]
    with pytest.raises(TraceError) as info:
        read_azure_counts(path)
    assert info.value.line == line and fragment in info.value.problem


def _minute_counts(trace: list[Request], n_models: int, start: int = 0, end: int = 1440) -> np.ndarray:
    edges = 60.0 * np.arange(start, end + 1)
    out = np.zeros((n_models, end - start), dtype=np.int64)
    t = np.array(_times(trace))
    assert np.all(t >= edges[0]) and np.all(t < edges[-1])
    minute = np.searchsorted(edges, t, side="right") - 1  # exact comparisons, no division
    np.add.at(out, (np.array([int(m) for m in _ids(trace)]), minute), 1)
    return out


@pytest.mark.parametrize("cv", [1.0, 4.0])
def test_azure_trace_reproduces_per_minute_counts_exactly(cv: float) -> None:
    rows = synthetic_azure_counts(40, seed=2, max_per_minute=10.0)
    trace = list(azure_trace(rows, seed=1, cv=cv))
    assert trace == list(azure_trace(rows, seed=1, cv=cv))  # deterministic
    assert _times(trace) != _times(list(azure_trace(rows, seed=2, cv=cv)))
    assert np.all(np.diff(_times(trace)) >= 0)
    expected = np.stack([r.counts for r in rows])
    assert expected.sum() > 10_000
    assert np.array_equal(_minute_counts(trace, len(rows)), expected)
    per_model: dict[str, set[tuple[int, float]]] = {}
    for r in trace:
        per_model.setdefault(r.model_id, set()).add((r.size_bytes, r.load_ms))
    assert all(len(v) == 1 for v in per_model.values())


def test_azure_trace_is_bursty_inside_minutes_with_cv() -> None:
    row = AzureFunctionCounts("o", "a", "f", "http", np.full(1440, 200, np.int32))
    for cv, lo, hi in ((1.0, 0.9, 1.1), (4.0, 2.5, 4.5)):
        t = np.array(_times(list(azure_trace([row], seed=3, cv=cv, end_minute=60))))
        gaps = np.diff(t)
        assert lo < gaps.std() / gaps.mean() < hi


def test_azure_trace_stripes_functions_and_windows_are_slices_of_the_day() -> None:
    rows = synthetic_azure_counts(30, seed=6, max_per_minute=5.0)
    rows.append(AzureFunctionCounts("o", "a", "idle", "http", np.zeros(1440, np.int32)))
    striped = list(azure_trace(rows, seed=1, n_models=4, cv=2.0, sizes=SizeModel.lognormal()))
    assert {r.model_id for r in striped} <= {"0", "1", "2", "3"}
    active = [r for r in rows if r.counts.any()]  # AlpaServe stripes the functions with requests
    expected = np.zeros((4, 1440), dtype=np.int64)
    for i, r in enumerate(active):
        expected[i % 4] += r.counts
    assert np.array_equal(_minute_counts(striped, 4), expected)
    # a window reproduces the same minutes of the full day's replay exactly
    kw = {"seed": 1, "n_models": 4, "cv": 2.0, "sizes": SizeModel.lognormal()}
    window = list(azure_trace(rows, start_minute=600, end_minute=660, **kw))  # type: ignore[arg-type]
    assert window == [r for r in striped if 36_000.0 <= r.time_s < 39_600.0]
    with pytest.raises(ValueError):
        azure_trace(rows, seed=1, start_minute=10, end_minute=5)
