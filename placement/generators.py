"""Synthetic workloads for the placement simulator: Zipf with churn and sweeps, bursty arrivals, Azure.

The Zipf workloads follow the definitions of the cache anchors (reference/cache-anchors.md), so that a
policy's miss ratio on them can be set against the anchors' tables:

- **Popularity**: truncated Zipf over ``n_models`` ranks, ``P(rank r) ~ r**-alpha``, sampled by inverse
  CDF; a random permutation maps rank to model, and model ids are ``"0" .. str(n_models - 1)``.
- **Churn** (anchor b): the anchors redraw the whole rank-to-model permutation every 100,000 requests.
  ``churn`` generalises that to a fraction: at each epoch boundary ``round(churn * n_models)`` ranks are
  picked at random and the models at those ranks are shuffled among them (a picked model may land on its
  own rank again). ``churn=1.0`` picks every rank, which redraws the permutation uniformly and
  independently of the last one: the anchors' b. Epochs count Zipf requests (``churn_every``, anchors'
  100,000) or, with ``churn_period_s``, trace time.
- **Sweeps** (anchor c): after Zipf request ``k * sweep_every`` (for every such k below ``n_requests``)
  come ``sweep_len`` never-seen models, in id order, each requested once, with ids ``n_models +
  sweep_len * (k - 1) + j``: the anchors' 1,000-model sweeps every 100,000 requests are
  ``sweep_every=100_000, sweep_len=1_000``. ``n_requests`` counts the Zipf requests only (the anchors'
  c has 1,009,000 requests), and the arrival process runs over all of them.
- **Sizes** (anchor d, ``SizeModel.lognormal()``): per-model size lognormal with median 50 MB and sigma
  1.0, clipped to [1 MB, 2 GB] (MB = 10**6 B), ``load_ms = 20 + 2 * size_MB``. The uniform default
  (anchors a-c) gives every model 50,000,000 B and the same formula's 120 ms.
- **Arrivals**: Poisson at ``rate_rps`` (anchors: 100 req/s); ``cv > 1`` makes them bursty.

What is not reproduced is the anchors' exact byte stream: they draw from numpy's legacy ``RandomState``
with per-workload seeds and a call order we do not have, while these generators use ``default_rng``
(PCG64). Equal definitions give statistically equal workloads, so miss ratios agree to within sampling
noise, not to the last digit.

Every random quantity has its own stream, derived from ``seed`` by ``SeedSequence`` spawn keys: the rank
sequence, the arrivals, the rank-to-model permutations, the sizes and the sweep models' sizes. So, as in
the anchors, workloads that differ in one knob share the rest: ``churn=1.0`` and ``churn=0.0`` with the
same seed request the same ranks at the same times and differ only in which model holds each rank, and
changing the size model does not change which models are requested.

**Bursty arrivals** (AlpaServe's ``GammaProcess``): inter-arrival gaps are Gamma with shape ``1/cv**2``
and mean ``1/rate``, so the coefficient of variation of the gaps is ``cv``; ``cv=1`` uses exponential gaps
(a Poisson process) exactly.

**Azure Functions 2019** (peers.md 5.2) gives only per-minute counts per function. ``azure_trace`` keeps
them *exactly* (every minute of every function has as many requests as the input says; a test checks
it) and synthesises times inside each minute: the minute is cut into ``count + 1`` spacings drawn i.i.d.
Gamma(shape ``1/cv**2``) and normalised to fill the minute, the arrivals sitting at the cuts. For
``cv=1`` that is exactly a Poisson process conditioned on its count (uniform order statistics); for
``cv > 1`` arrivals clump inside the minute as a Gamma renewal process would. AlpaServe instead fits a
Poisson or Gamma process to each interval's rate and samples it afresh, which changes the counts; keeping
them makes a replay comparable with the trace and puts the trace's own burstiness across minutes first.
Functions map to models one to one, or are striped onto ``n_models`` models (the ``k``-th function
with any request goes to model ``k % n_models``, AlpaServe's "stripe"; AlpaServe filters on the replayed
window, we on the whole day, so that a window maps functions as the day does). ``synthetic_azure_counts``
makes plausible rows in that layout, since the real dataset cannot be downloaded here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from placement.request import Request
from placement.traces import MINUTES_PER_DAY, AzureFunctionCounts

__all__ = [
    "SizeModel",
    "azure_trace",
    "bursty_arrivals",
    "synthetic_azure_counts",
    "zipf_trace",
    "zipf_weights",
]

MB = 1_000_000  # the anchors' MB: 10**6 bytes

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

# Spawn keys of the independent random streams derived from one seed (see the module docstring).
_RANKS, _ARRIVALS, _PERMUTATION, _SIZES, _SWEEP_SIZES, _AZURE_MINUTE, _AZURE_ROWS = range(7)


def _stream(seed: int, *key: int) -> np.random.Generator:
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


# -- sizes and load costs -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SizeModel:
    """How per-model ``size_bytes`` and ``load_ms`` are drawn; each model keeps its draw for the whole trace.

    ``kind="uniform"``: every model is ``median_bytes``. ``kind="lognormal"``: ``median_bytes * exp(sigma * Z)``,
    clipped to ``[min_bytes, max_bytes]``. Then ``load_ms = base_ms + ms_per_mb * size_MB``, times a
    lognormal factor ``exp(load_noise_sigma * Z')`` (median 1) when ``load_noise_sigma > 0``. The defaults
    are the anchors' d (2 ms per MB is 500 MB/s; no noise, so load cost is a function of size).
    """

    kind: Literal["uniform", "lognormal"] = "lognormal"
    median_bytes: int = 50 * MB
    sigma: float = 1.0
    min_bytes: int = 1 * MB
    max_bytes: int = 2_000 * MB
    base_ms: float = 20.0
    ms_per_mb: float = 2.0
    load_noise_sigma: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("uniform", "lognormal"):
            raise ValueError(f"kind must be 'uniform' or 'lognormal', got {self.kind!r}")
        if not 0 <= self.min_bytes <= self.median_bytes <= self.max_bytes:
            raise ValueError("need 0 <= min_bytes <= median_bytes <= max_bytes")
        if self.sigma < 0 or self.load_noise_sigma < 0 or self.base_ms < 0 or self.ms_per_mb < 0:
            raise ValueError("sigma, load_noise_sigma, base_ms and ms_per_mb must be >= 0")

    @classmethod
    def uniform(cls, size_bytes: int = 50 * MB, *, base_ms: float = 20.0, ms_per_mb: float = 2.0) -> SizeModel:
        """Every model the same size: the anchors' a-c (50,000,000 B and 120 ms by default)."""
        return cls("uniform", size_bytes, 0.0, size_bytes, size_bytes, base_ms, ms_per_mb, 0.0)

    @classmethod
    def lognormal(
        cls,
        median_bytes: int = 50 * MB,
        sigma: float = 1.0,
        *,
        min_bytes: int = 1 * MB,
        max_bytes: int = 2_000 * MB,
        base_ms: float = 20.0,
        ms_per_mb: float = 2.0,
        load_noise_sigma: float = 0.0,
    ) -> SizeModel:
        """Skewed sizes: by default the anchors' d."""
        return cls("lognormal", median_bytes, sigma, min_bytes, max_bytes, base_ms, ms_per_mb, load_noise_sigma)

    def draw(self, n_models: int, rng: np.random.Generator) -> tuple[IntArray, FloatArray]:
        """``(size_bytes, load_ms)`` of ``n_models`` models, as arrays indexed by model."""
        if self.kind == "uniform":
            sizes = np.full(n_models, self.median_bytes, dtype=np.int64)
        else:
            raw = self.median_bytes * np.exp(self.sigma * rng.standard_normal(n_models))
            sizes = np.rint(np.clip(raw, self.min_bytes, self.max_bytes)).astype(np.int64)
        load = self.base_ms + self.ms_per_mb * (sizes / MB)
        if self.load_noise_sigma > 0:
            load = load * np.exp(self.load_noise_sigma * rng.standard_normal(n_models))
        return sizes, load


UNIFORM = SizeModel.uniform()


def _requests(times: FloatArray, model_idx: IntArray, sizes: IntArray, load: FloatArray) -> list[Request]:
    # One Python object per request is unavoidable; build them in a single map over plain lists, and
    # share one id string per model (the requests of a model hold the same str object).
    names = [str(i) for i in range(len(sizes))]
    idx = model_idx.tolist()
    ids = [names[i] for i in idx]
    return list(map(Request, times.tolist(), ids, sizes[model_idx].tolist(), load[model_idx].tolist()))


# -- arrivals -------------------------------------------------------------------------------------


def bursty_arrivals(
    n: int, *, rate_rps: float, cv: float = 1.0, seed: int | np.random.Generator, start_s: float = 0.0
) -> FloatArray:
    """``n`` sorted arrival times (s) of a renewal process at ``rate_rps`` whose gaps have CV ``cv``.

    Gaps are Gamma(shape ``1/cv**2``, mean ``1/rate_rps``), AlpaServe's Gamma process: ``cv=1`` is Poisson
    (exponential gaps, drawn as such), ``cv > 1`` bursty, ``cv < 1`` more regular than Poisson. The first
    arrival is one gap after ``start_s``. ``seed`` is a seed or a Generator to draw from.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not (rate_rps > 0 and math.isfinite(rate_rps)) or not (cv > 0 and math.isfinite(cv)):
        raise ValueError(f"rate_rps and cv must be finite and > 0, got {rate_rps!r}, {cv!r}")
    rng = seed if isinstance(seed, np.random.Generator) else _stream(seed, _ARRIVALS)
    if cv == 1.0:
        gaps = rng.exponential(1.0 / rate_rps, n)
    else:
        shape = 1.0 / (cv * cv)
        gaps = rng.gamma(shape, 1.0 / (rate_rps * shape), n)
    times: FloatArray = start_s + np.cumsum(gaps)
    return times


# -- Zipf -----------------------------------------------------------------------------------------


def zipf_weights(n_models: int, alpha: float) -> FloatArray:
    """The request probability of each rank (index 0 is rank 1): ``r**-alpha``, normalised."""
    if n_models < 1:
        raise ValueError(f"n_models must be >= 1, got {n_models}")
    if not (alpha >= 0 and math.isfinite(alpha)):
        raise ValueError(f"alpha must be finite and >= 0, got {alpha!r}")
    w: FloatArray = np.arange(1, n_models + 1, dtype=np.float64) ** -alpha
    w /= w.sum()
    return w


def _epoch_bounds(n: int, times: FloatArray, churn_every: int, churn_period_s: float | None) -> list[int]:
    """Start index of each churn epoch among the ``n`` Zipf requests (epochs may be empty)."""
    if churn_period_s is None:
        return list(range(0, n, churn_every)) or [0]
    n_epochs = int(times[-1] // churn_period_s) + 1 if n else 1
    edges = np.arange(n_epochs, dtype=np.float64) * churn_period_s
    return [int(i) for i in np.searchsorted(times, edges, side="left")]


def zipf_trace(
    n_models: int,
    n_requests: int,
    *,
    alpha: float,
    seed: int,
    rate_rps: float = 100.0,
    cv: float = 1.0,
    sizes: SizeModel = UNIFORM,
    churn: float = 0.0,
    churn_every: int = 100_000,
    churn_period_s: float | None = None,
    sweep_every: int = 0,
    sweep_len: int = 1_000,
) -> list[Request]:
    """A Zipf(``alpha``) workload over ``n_models`` models, sorted by time (definitions: module docstring).

    ``n_requests`` Zipf requests arrive at ``rate_rps`` with gap CV ``cv`` (1: Poisson). ``churn`` in
    [0, 1] is the fraction of ranks reshuffled at each epoch boundary, an epoch being ``churn_every``
    Zipf requests or, when given, ``churn_period_s`` seconds. ``sweep_every > 0`` inserts a sweep of
    ``sweep_len`` one-off models after every ``sweep_every`` Zipf requests. The anchors' workloads, with
    N = 10,000 and 1,000,000 requests: a ``alpha=a``; b ``alpha=1.0, churn=1.0``; c ``alpha=1.0,
    sweep_every=100_000``; d ``alpha=1.0, sizes=SizeModel.lognormal()``.
    """
    if n_requests < 0:
        raise ValueError(f"n_requests must be >= 0, got {n_requests}")
    if not 0.0 <= churn <= 1.0:
        raise ValueError(f"churn must be in [0, 1], got {churn!r}")
    if churn_every < 1 or (churn_period_s is not None and not churn_period_s > 0):
        raise ValueError("churn_every must be >= 1 and churn_period_s > 0")
    if sweep_every < 0 or sweep_len < 0:
        raise ValueError("sweep_every and sweep_len must be >= 0")
    cdf = np.cumsum(zipf_weights(n_models, alpha))
    cdf[-1] = 1.0  # so that no uniform draw in [0, 1) falls past the last rank by rounding
    ranks = np.searchsorted(cdf, _stream(seed, _RANKS).random(n_requests), side="right")

    n_sweeps = (n_requests - 1) // sweep_every if sweep_every and n_requests else 0
    n_total = n_requests + n_sweeps * sweep_len
    times = bursty_arrivals(n_total, rate_rps=rate_rps, cv=cv, seed=_stream(seed, _ARRIVALS))
    # Epochs by time are judged on the Zipf requests' own times (sweeps do not shift them).
    zipf_pos = np.arange(n_requests, dtype=np.int64)
    if n_sweeps:
        zipf_pos += np.minimum(zipf_pos // sweep_every, n_sweeps) * sweep_len

    perm_rng = _stream(seed, _PERMUTATION)
    perm = perm_rng.permutation(n_models)  # perm[rank index] = model index
    n_moved = round(churn * n_models)
    bounds = _epoch_bounds(n_requests, times[zipf_pos], churn_every, churn_period_s)
    models = np.empty(n_requests, dtype=np.int64)
    for e, lo in enumerate(bounds):
        if e and n_moved:
            picked = perm_rng.choice(n_models, n_moved, replace=False)
            perm[picked] = perm[perm_rng.permutation(picked)]
        hi = bounds[e + 1] if e + 1 < len(bounds) else n_requests
        models[lo:hi] = perm[ranks[lo:hi]]

    size_arr, load_arr = sizes.draw(n_models, _stream(seed, _SIZES))
    if n_sweeps:
        sweep_sizes, sweep_load = sizes.draw(n_sweeps * sweep_len, _stream(seed, _SWEEP_SIZES))
        size_arr = np.concatenate([size_arr, sweep_sizes])
        load_arr = np.concatenate([load_arr, sweep_load])
        all_models = np.empty(n_total, dtype=np.int64)
        all_models[zipf_pos] = models
        is_sweep = np.ones(n_total, dtype=bool)
        is_sweep[zipf_pos] = False
        all_models[is_sweep] = n_models + np.arange(n_sweeps * sweep_len)  # ids in sweep order
        models = all_models
    return _requests(times, models, size_arr, load_arr)


# -- Azure Functions 2019 -------------------------------------------------------------------------


def azure_trace(
    rows: Sequence[AzureFunctionCounts],
    *,
    seed: int,
    n_models: int | None = None,
    cv: float = 1.0,
    sizes: SizeModel = UNIFORM,
    start_minute: int = 0,
    end_minute: int = MINUTES_PER_DAY,
) -> Iterator[Request]:
    """Requests that reproduce the per-minute counts of ``rows`` over ``[start_minute, end_minute)``.

    Streams minute by minute, in time order (a busy day's requests need not fit in memory at once); a
    request of minute ``m`` has ``60 * m <= time_s < 60 * (m + 1)``. With ``n_models=None`` function ``i``
    (its index in ``rows``) is model ``str(i)``; otherwise functions are striped onto models ``"0" ..
    str(n_models - 1)``: the ``k``-th function with any request in the day (in ``rows`` order) goes to
    model ``k % n_models``. Times inside a minute: module docstring.
    Each minute draws from its own stream (seed, minute), so a window reproduces the same minutes of
    a longer replay exactly.
    """
    if not 0 <= start_minute <= end_minute <= MINUTES_PER_DAY:
        raise ValueError(f"need 0 <= start_minute <= end_minute <= {MINUTES_PER_DAY}")
    if not (cv > 0 and math.isfinite(cv)):
        raise ValueError(f"cv must be finite and > 0, got {cv!r}")
    if n_models is not None and n_models < 1:
        raise ValueError(f"n_models must be >= 1, got {n_models}")
    _stream(seed)  # validates the seed now rather than at the first next()
    return _azure_requests(rows, seed, n_models, cv, sizes, start_minute, end_minute)


def _azure_requests(
    rows: Sequence[AzureFunctionCounts],
    seed: int,
    n_models: int | None,
    cv: float,
    sizes: SizeModel,
    start: int,
    end: int,
) -> Iterator[Request]:
    if n_models is None:
        model_of = np.arange(len(rows), dtype=np.int64)
        n_out = len(rows)
    else:
        # Striped over the functions with any request in the day, not just in the window, so that a
        # window of a replay maps functions to models as the whole day does.
        active = [i for i, r in enumerate(rows) if r.counts.any()]
        model_of = np.zeros(len(rows), dtype=np.int64)
        model_of[active] = np.arange(len(active), dtype=np.int64) % n_models
        n_out = n_models
    size_arr, load_arr = sizes.draw(n_out, _stream(seed, _SIZES))
    names = [str(i) for i in range(n_out)]
    sizes_l, load_l = size_arr.tolist(), load_arr.tolist()
    shape = 1.0 / (cv * cv)
    block = 60  # minutes gathered per pass: keeps memory at functions x 60 counts, not x 1440
    for b0 in range(start, end, block):
        b1 = min(b0 + block, end)
        counts = np.stack([r.counts[b0:b1] for r in rows]) if rows else np.zeros((0, b1 - b0), np.int32)
        for k in range(b1 - b0):
            minute = b0 + k
            col = counts[:, k].astype(np.int64)
            fn = np.flatnonzero(col)
            if not len(fn):
                continue
            c = col[fn]
            rng = _stream(seed, _AZURE_MINUTE, minute)
            frac = _fractions(c, shape, rng) if cv != 1.0 else rng.random(int(c.sum()))
            owner = np.repeat(fn, c)
            order = np.argsort(frac, kind="stable")
            t0 = 60.0 * minute
            times = t0 + 60.0 * frac[order]
            # Rounding may carry t0 + 60 * frac (frac < 1) up to the next minute: keep each in its own.
            np.minimum(times, math.nextafter(t0 + 60.0, 0.0), out=times)
            m_idx = model_of[owner[order]].tolist()
            for t, m in zip(times.tolist(), m_idx, strict=True):
                yield Request(t, names[m], sizes_l[m], load_l[m])


def _fractions(c: IntArray, shape: float, rng: np.random.Generator) -> FloatArray:
    """For groups of ``c[i]`` arrivals, positions in [0, 1): each group's ``c[i] + 1`` Gamma spacings,
    normalised to sum to 1, cumulated (the last spacing is the gap to the minute's end)."""
    lengths = c + 1
    starts = np.cumsum(lengths) - lengths
    gaps = rng.gamma(shape, 1.0, int(lengths.sum()))
    totals = np.add.reduceat(gaps, starts)
    # All spacings of a group can underflow to 0 when cv is large; such a group lands at its start.
    totals[totals <= 0.0] = 1.0
    gaps /= np.repeat(totals, lengths)
    # Cumulate inside each group: a global cumsum minus the value just before the group's start. The
    # normalised spacings keep the global sum at most the number of groups, so the error stays ~1e-12.
    cum = np.cumsum(gaps)
    before = np.concatenate(([0.0], cum))[starts]
    pos = cum - np.repeat(before, lengths)
    last = np.cumsum(lengths) - 1
    keep = np.ones(len(gaps), dtype=bool)
    keep[last] = False
    frac: FloatArray = np.clip(pos[keep], 0.0, math.nextafter(1.0, 0.0))
    return frac


_TRIGGERS = ("http", "queue", "timer", "orchestration", "storage", "event", "others")
# Share of functions by trigger in Shahrad et al. (ATC'20) Fig. 3, approximately.
_TRIGGER_SHARE = np.array([55.0, 15.2, 15.6, 6.9, 2.8, 2.2, 2.2])


def synthetic_azure_counts(
    n_functions: int, *, seed: int, max_per_minute: float = 1_000.0
) -> list[AzureFunctionCounts]:
    """Plausible Azure Functions 2019 rows (one day), for tests and demos; not calibrated to the data.

    - Mean rate per function: log10(per minute) ~ Normal(-1.56, 1.77), capped at ``max_per_minute``.
      That puts 45% of functions at most once an hour and 81% at most once a minute, the shares of
      *apps* reported by Shahrad et al., over eight orders of magnitude: a heavy tail.
    - Triggers in the paper's proportions. Timer functions fire on a fixed period (1 to 60 minutes,
      random phase), one invocation each time.
    - Others follow a diurnal cycle (peak near 14:00 with a per-function phase jitter of about an hour,
      amplitude 20-80%) times Gamma noise (mean 1, CV 0.7) per minute, then Poisson counts.
    - Owner, app and function hashes are 64 hex digits like the dataset's; apps hold 1-4 functions.
    """
    if n_functions < 0:
        raise ValueError(f"n_functions must be >= 0, got {n_functions}")
    rng = _stream(seed, _AZURE_ROWS)
    minutes = np.arange(MINUTES_PER_DAY, dtype=np.float64)
    rows: list[AzureFunctionCounts] = []
    owner = app = ""
    left_in_app = 0
    triggers = rng.choice(len(_TRIGGERS), n_functions, p=_TRIGGER_SHARE / _TRIGGER_SHARE.sum())
    for i in range(n_functions):
        if left_in_app == 0:
            if not owner or rng.random() < 0.7:  # most owners have one app
                owner = rng.bytes(32).hex()
            app = rng.bytes(32).hex()
            left_in_app = int(min(rng.geometric(0.5), 4))
        left_in_app -= 1
        trigger = _TRIGGERS[int(triggers[i])]
        if trigger == "timer":
            period = int(rng.choice([1, 5, 10, 15, 30, 60]))
            counts = (((minutes.astype(np.int64) + int(rng.integers(period))) % period) == 0).astype(np.int32)
        else:
            rate = min(10.0 ** rng.normal(-1.56, 1.77), max_per_minute)
            phase = 14 * 60 + rng.normal(0.0, 60.0)
            diurnal = 1.0 + rng.uniform(0.2, 0.8) * np.cos(2 * np.pi * (minutes - phase) / MINUTES_PER_DAY)
            noise = rng.gamma(2.0, 0.5, MINUTES_PER_DAY)
            counts = rng.poisson(rate * diurnal * noise).astype(np.int32)
        rows.append(AzureFunctionCounts(owner, app, rng.bytes(32).hex(), trigger, counts))
    return rows
