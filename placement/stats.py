"""The outcome of a simulation: counts, ratios and added latency, for one cache or a cluster.

Metrics, at both levels (``Stats``; the same quantities as the Grafana panels): requests, hits, misses,
miss ratio, byte miss ratio (bytes loaded on demand / bytes requested), cost-weighted miss ratio
(``load_ms`` of the demand loads / ``load_ms`` of all requests), loads per second over the trace's
duration (scale-out copies included: it measures churn), added latency percentiles over all requests
(hits count as 0), evictions; at cluster level also copies added and released. ``gap_closed`` is the
headline comparison with the offline optimum: (LRU - policy) / (LRU - OPT).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

__all__ = ["ClusterStats", "Stats", "gap_closed", "out_of_order", "sum_stats", "with_waits"]


class MissRatios:
    """The three miss measures as ratios, for a record of these counts: a replay's (``Stats``) or the
    offline optimum's (``placement.offline.OfflineReference``)."""

    __slots__ = ()
    requests: int
    misses: float
    bytes_requested: int
    bytes_missed: float
    cost_requested_ms: float
    cost_missed_ms: float

    @property
    def miss_ratio(self) -> float:
        return self.misses / self.requests if self.requests else math.nan

    @property
    def byte_miss_ratio(self) -> float:
        return self.bytes_missed / self.bytes_requested if self.bytes_requested else math.nan

    @property
    def cost_miss_ratio(self) -> float:
        return self.cost_missed_ms / self.cost_requested_ms if self.cost_requested_ms else math.nan


@dataclass(frozen=True, slots=True)
class Stats(MissRatios):
    """The outcome of a replay, for one cache or summed over a cluster.

    Every request is a hit (a loaded copy served it), a miss (it found no copy loaded or loading and
    started a load: a *demand load*) or, in a cluster, ``joined`` a load already in progress (single
    flight; it waits but costs no load). So ``hits + misses + joined == requests``, and the miss counts
    are the runtime's own counters. ``bytes_missed`` and ``cost_missed_ms`` sum the size and ``load_ms``
    of the demand loads. ``copy_loads`` are the loads made by copy scaling, with no request waiting.
    ``bypassed``: loads whose model did not stay (pass-through). The latency figures are the added
    latency of every request in milliseconds (0 for a hit), by nearest rank.
    """

    requests: int = 0
    hits: int = 0
    misses: int = 0
    joined: int = 0
    copy_loads: int = 0
    bypassed: int = 0
    evictions: int = 0
    bytes_requested: int = 0
    bytes_missed: int = 0
    cost_requested_ms: float = 0.0
    cost_missed_ms: float = 0.0
    start_s: float = math.nan
    end_s: float = math.nan
    wait_mean_ms: float = math.nan
    wait_p50_ms: float = math.nan
    wait_p99_ms: float = math.nan
    wait_max_ms: float = math.nan


    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s

    @property
    def loads(self) -> int:
        """Every load: demand loads (``misses``) and scale-out copies."""
        return self.misses + self.copy_loads

    @property
    def loads_per_s(self) -> float:
        """All loads (demand and scale-out) per second of trace; NaN for a trace of no duration."""
        duration = self.duration_s
        return self.loads / duration if duration > 0 else math.nan

    def as_dict(self) -> dict[str, Any]:
        """Every field and ratio, JSON-ready (NaN stays NaN: the caller chooses how to write it)."""
        data = asdict(self)
        data.update(miss_ratio=self.miss_ratio, byte_miss_ratio=self.byte_miss_ratio,
                    cost_miss_ratio=self.cost_miss_ratio, duration_s=self.duration_s,
                    loads=self.loads, loads_per_s=self.loads_per_s)
        return data


@dataclass(frozen=True, slots=True)
class ClusterStats:
    """The outcome of ``simulate_cluster``: the cluster's totals, each instance's share, and scaling.

    ``no_room``: loads that became pass-throughs because every resident model was protected.
    ``refused``: demand loads the admission filter refused (served; kept as the first to go, or
    passed through, as ``simulate_cluster`` was asked); ``pooled``: those of them held in an
    instance's pass-through room (``passthrough_bytes``). ``copies_added``: copies loaded by scaling;
    ``copies_removed``: extra copies released back to the cache policy.
    """

    total: Stats
    instances: Mapping[str, Stats]
    no_room: int = 0
    refused: int = 0
    copies_added: int = 0
    copies_removed: int = 0
    pooled: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"total": self.total.as_dict(), "no_room": self.no_room, "refused": self.refused,
                "pooled": self.pooled,
                "copies_added": self.copies_added, "copies_removed": self.copies_removed,
                "instances": {name: s.as_dict() for name, s in self.instances.items()}}


def sum_stats(parts: Sequence[Stats]) -> Stats:
    """The counts of ``parts`` (for example the instances of a cluster, replayed one by one) added up.

    The time span is the union of theirs. Latency percentiles do not add up, so they are NaN; the mean
    is weighted by requests.
    """
    requests = sum(p.requests for p in parts)
    starts = [p.start_s for p in parts if p.requests]
    ends = [p.end_s for p in parts if p.requests]
    waited = math.fsum(p.wait_mean_ms * p.requests for p in parts if p.requests)
    return Stats(
        requests=requests, hits=sum(p.hits for p in parts), misses=sum(p.misses for p in parts),
        joined=sum(p.joined for p in parts), copy_loads=sum(p.copy_loads for p in parts),
        bypassed=sum(p.bypassed for p in parts), evictions=sum(p.evictions for p in parts),
        bytes_requested=sum(p.bytes_requested for p in parts), bytes_missed=sum(p.bytes_missed for p in parts),
        cost_requested_ms=math.fsum(p.cost_requested_ms for p in parts),
        cost_missed_ms=math.fsum(p.cost_missed_ms for p in parts),
        start_s=min(starts, default=math.nan), end_s=max(ends, default=math.nan),
        wait_mean_ms=waited / requests if requests else math.nan)


def gap_closed(lru: float, policy: float, opt: float) -> float | None:
    """The share of the LRU-to-OPT gap a policy closes: (LRU - policy) / (LRU - OPT).

    1.0 for a policy as good as OPT, 0.0 for LRU, negative for worse than LRU. Works on counts or
    ratios alike (misses, or cost-weighted misses). ``None`` when LRU is already optimal (no gap).
    """
    gap = lru - opt
    if gap == 0 or not math.isfinite(gap):
        return None
    return (lru - policy) / gap


def with_waits(stats: Stats, waits: list[float]) -> Stats:
    """``stats`` with the mean, p50, p99 and max of the added latency over its requests, of which
    those not in ``waits`` waited 0. Nearest-rank percentiles: each figure is a latency that occurred."""
    n = stats.requests
    if n == 0:
        return stats
    ordered = sorted(waits)
    zeros = n - len(ordered)

    def rank(q: float) -> float:
        r = max(1, math.ceil(q * n / 100.0))
        return 0.0 if r <= zeros else ordered[r - zeros - 1]

    return replace(stats, wait_mean_ms=math.fsum(ordered) / n, wait_p50_ms=rank(50.0),
                   wait_p99_ms=rank(99.0), wait_max_ms=ordered[-1] if ordered else 0.0)



def out_of_order(t: float, last: float) -> ValueError:
    """The error for a trace whose request at ``t`` follows one at ``last > t``."""
    return ValueError(f"the trace is not in time order: a request at {t!r} s follows one at {last!r} s")
