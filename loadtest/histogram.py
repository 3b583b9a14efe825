"""A mergeable latency histogram with log-linear buckets (the HdrHistogram layout, 2 significant digits).

Values are recorded in seconds and kept as integer microseconds. Below 256 µs every microsecond has
its own bucket; above, each power of two is split into 128 equal buckets, so a bucket is at most
1/128 (0.8 %) of its lower bound wide: every quantile is within that relative error of the exact
one (or within 1 µs, below 256 µs). The layout is fixed (1 µs .. 100 s, about 2,700 counters), so
two histograms merge by adding their counters: a worker process records into its own and the
parent merges them at the end, which a list of samples could not do at a million requests.

Values above 100 s are counted in the top bucket; ``max`` keeps the exact largest value.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

_SUB_BITS = 7  # 128 buckets per power of two: 2 significant digits
_SUB = 1 << _SUB_BITS
_LINEAR = 2 * _SUB  # values below this (µs) are exact
MAX_US = 100_000_000  # 100 s
MAX_RELATIVE_ERROR = 1 / _SUB


def _index(us: int) -> int:
    if us < _LINEAR:
        return us
    shift = us.bit_length() - (_SUB_BITS + 1)
    return _LINEAR + (shift - 1) * _SUB + ((us >> shift) - _SUB)


def _bounds(index: int) -> tuple[int, int]:
    """[low, high) in µs of bucket ``index``."""
    if index < _LINEAR:
        return index, index + 1
    shift = (index - _LINEAR) // _SUB + 1
    low = ((index - _LINEAR) % _SUB + _SUB) << shift
    return low, low + (1 << shift)


N_BUCKETS = _index(MAX_US) + 1


class Histogram:
    """Latencies in seconds; quantiles within ``MAX_RELATIVE_ERROR`` (or 1 µs) of the exact value."""

    __slots__ = ("counts", "max_s", "min_s", "n", "sum_s")

    def __init__(self) -> None:
        self.counts = np.zeros(N_BUCKETS, dtype=np.int64)
        self.n = 0
        self.sum_s = 0.0
        self.min_s = math.inf
        self.max_s = 0.0

    def record(self, seconds: float) -> None:
        seconds = max(seconds, 0.0)
        us = min(int(seconds * 1e6), MAX_US)
        self.counts[_index(us)] += 1
        self.n += 1
        self.sum_s += seconds
        self.min_s = min(self.min_s, seconds)
        self.max_s = max(self.max_s, seconds)

    def record_many(self, values: Iterable[float]) -> None:
        for v in values:
            self.record(v)

    def merge(self, other: Histogram) -> Histogram:
        """Add ``other``'s counts into this histogram (in place); returns self."""
        self.counts += other.counts
        self.n += other.n
        self.sum_s += other.sum_s
        self.min_s = min(self.min_s, other.min_s)
        self.max_s = max(self.max_s, other.max_s)
        return self

    def quantile(self, q: float) -> float:
        """The value (seconds) at quantile ``q`` in [0, 1]: the ceil(q*n)-th smallest, to the bucket's
        precision (the middle of its bucket, kept within the recorded min and max). NaN when empty."""
        if self.n == 0:
            return math.nan
        rank = min(max(math.ceil(q * self.n - 1e-9), 1), self.n)
        index = int(np.searchsorted(np.cumsum(self.counts), rank))
        low, high = _bounds(index)
        mid = (low + high - 1) / 2 / 1e6
        return min(max(mid, self.min_s), self.max_s)

    @property
    def mean_s(self) -> float:
        return self.sum_s / self.n if self.n else math.nan

    def summary_ms(self) -> dict[str, float]:
        """p50, p90, p99, p99.9, max and mean in milliseconds (NaN when empty)."""
        out = {name: self.quantile(q) * 1000 for name, q in
               (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999))}
        out["max"] = self.max_s * 1000 if self.n else math.nan
        out["mean"] = self.mean_s * 1000
        return out
