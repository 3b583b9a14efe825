"""When requests are sent and to which model: arrival schedules and model popularity.

An open-loop run sends at precomputed times, so a slow server cannot slow the client down (which
would hide the latency it causes: coordinated omission). The schedule is built before the run:
Poisson (exponential gaps), bursty (Gamma gaps with a chosen coefficient of variation: CV 1 is
Poisson, larger is burstier), or a trace's own times. Popularity picks a model index per request:
Zipf (rank ``i`` has weight ``1 / (i+1)**s``), uniform, or a trace's own order.

Everything takes a numpy ``Generator``, so a worker process with its own seed gets its own
independent schedule and tests are deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from placement.traces import load_trace


class ScheduleError(ValueError):
    """A popularity or arrival specification that cannot be used."""


def poisson_times(rate: float, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    """Send times (seconds from 0, sorted, < duration) of a Poisson process of ``rate`` per second."""
    return gamma_times(rate, 1.0, duration_s, rng)


def gamma_times(rate: float, cv: float, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    """Send times with Gamma inter-arrivals of mean 1/rate and coefficient of variation ``cv``.

    Gamma(shape k, scale θ) has mean kθ and CV 1/sqrt(k): k = 1/cv², θ = 1/(rate k).
    """
    if rate <= 0 or duration_s <= 0:
        return np.zeros(0)
    if cv <= 0:
        raise ScheduleError(f"bursty CV must be > 0, got {cv}")
    shape = 1.0 / (cv * cv)
    scale = 1.0 / (rate * shape)
    # Draw enough gaps for the expected count plus a generous margin, then top up if still short.
    times: list[np.ndarray] = []
    t = 0.0
    while t < duration_s:
        n = int(rate * (duration_s - t) * 1.2) + 100
        chunk = t + np.cumsum(rng.gamma(shape, scale, n))
        times.append(chunk)
        t = float(chunk[-1])
    out = np.concatenate(times)
    return out[out < duration_s]


def zipf_weights(n: int, s: float) -> np.ndarray:
    """Probabilities of ranks 0..n-1 under Zipf with exponent ``s`` (0: uniform)."""
    w: np.ndarray = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** s
    return w / float(w.sum())


@dataclass(frozen=True)
class Popularity:
    """``weights`` over model indices, or a fixed ``order`` of indices (a trace) that repeats."""

    weights: np.ndarray | None = None
    order: np.ndarray | None = None

    def pick(self, n: int, rng: np.random.Generator, offset: int = 0, stride: int = 1) -> np.ndarray:
        """``n`` model indices. A trace's order is replayed from position ``offset`` every ``stride``
        (worker ``i`` of ``P`` takes requests i, i+P, ...), wrapping around."""
        if self.order is not None:
            return self.order[(offset + stride * np.arange(n)) % len(self.order)]
        assert self.weights is not None
        return rng.choice(len(self.weights), size=n, p=self.weights)


@dataclass(frozen=True)
class Trace:
    """A trace's requests: relative ``times`` (first at 0), ``models`` (indices into ``ids``)."""

    times: np.ndarray
    models: np.ndarray
    ids: list[str]


def read_trace(path: str) -> Trace:
    """A trace in placement's CSV format (``placement.traces``), times shifted to start at 0."""
    requests = load_trace(path)
    if not requests:
        raise ScheduleError(f"{path}: the trace has no requests")
    index: dict[str, int] = {}
    models = np.fromiter((index.setdefault(r.model_id, len(index)) for r in requests), dtype=np.int64,
                         count=len(requests))
    times = np.fromiter((r.time_s for r in requests), dtype=np.float64, count=len(requests))
    return Trace(times - times[0], models, list(index))


def parse_popularity(spec: str, n_models: int, trace: Trace | None) -> Popularity:
    """``zipf:S``, ``zipf`` (S = 1), ``uniform`` or ``trace:FILE`` (``trace`` already read)."""
    if spec == "uniform":
        return Popularity(weights=zipf_weights(n_models, 0.0))
    if spec == "zipf" or spec.startswith("zipf:"):
        try:
            s = float(spec.partition(":")[2] or 1.0)
        except ValueError:
            raise ScheduleError(f"bad zipf exponent in {spec!r}") from None
        if s < 0:
            raise ScheduleError(f"the zipf exponent must be >= 0, got {s}")
        return Popularity(weights=zipf_weights(n_models, s))
    if spec.startswith("trace:"):
        assert trace is not None
        return Popularity(order=trace.models)
    raise ScheduleError(f"unknown popularity {spec!r}: use zipf:S, uniform or trace:FILE")


def parse_arrivals(spec: str) -> tuple[str, float]:
    """(kind, cv): ``poisson`` -> cv 1, ``bursty:CV``, ``trace`` (cv unused)."""
    if spec == "poisson":
        return "poisson", 1.0
    if spec == "trace":
        return "trace", 0.0
    if spec.startswith("bursty:"):
        try:
            cv = float(spec.partition(":")[2])
        except ValueError:
            raise ScheduleError(f"bad CV in {spec!r}") from None
        if cv <= 0:
            raise ScheduleError(f"bursty CV must be > 0, got {cv}")
        return "bursty", cv
    raise ScheduleError(f"unknown arrivals {spec!r}: use poisson, bursty:CV or trace")


def open_loop_schedule(kind: str, cv: float, rate: float, duration_s: float, rng: np.random.Generator,
                       trace: Trace | None, worker: int = 0, workers: int = 1) -> np.ndarray:
    """One worker's send times over ``duration_s``. With trace arrivals, the worker takes every
    ``workers``-th request of the trace from ``worker`` on (cut at ``duration_s``); otherwise it
    gets a process of ``rate / workers`` of its own."""
    if kind == "trace":
        assert trace is not None
        times = trace.times[worker::workers]
        return times[times < duration_s]
    return gamma_times(rate / workers, cv, duration_s, rng)
