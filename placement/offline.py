"""The offline reference of a trace: Belady's optimum, or a bracket around it, to compare policies with.

Per instance: a cluster's reference is the sum of its instances' references, each computed on the
requests its models' plain home receives (``placement.cluster.home_partition``). The algorithms are
``placement.belady``'s; this module picks the exact one when sizes are uniform and brackets the
optimum otherwise (see ``OfflineReference``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from placement import belady as ref
from placement.request import Request
from placement.stats import MissRatios, Stats, gap_closed

__all__ = ["OfflineReference", "offline_reference"]


@dataclass(frozen=True, slots=True)
class OfflineReference(MissRatios):
    """The offline optimum of a trace, or a bracket around it, in the three miss measures.

    Uniform sizes: Belady's MIN, exact for the miss count (and for the cost when costs are uniform too);
    the ``*_lower`` fields equal the others. Variable sizes (or costs): the optimum is NP-hard, so each
    measure is a bracket, ``*_lower`` from the PFOO-L lower bound and the other from the Belady-Size
    offline heuristic for that measure (a feasible policy: an upper bound). Gaps closed are reported
    against both (``gap``): the true gap lies in between. Sums over the instances of a cluster.
    """

    label: str
    exact_misses: bool
    exact_cost: bool
    requests: int
    misses: float
    misses_lower: float
    bytes_requested: int
    bytes_missed: float
    bytes_missed_lower: float
    cost_requested_ms: float
    cost_missed_ms: float
    cost_missed_lower_ms: float


    def gap(self, lru: Stats, policy: Stats, measure: str = "misses") -> tuple[float | None, float | None]:
        """``(lo, hi)`` share of the LRU-to-OPT gap ``policy`` closes on ``measure`` ("misses", "bytes"
        or "cost"): lo against the lower bound, hi against the feasible reference; equal when exact."""
        if measure == "misses":
            return (gap_closed(lru.misses, policy.misses, self.misses_lower),
                    gap_closed(lru.misses, policy.misses, self.misses))
        if measure == "bytes":
            return (gap_closed(lru.bytes_missed, policy.bytes_missed, self.bytes_missed_lower),
                    gap_closed(lru.bytes_missed, policy.bytes_missed, self.bytes_missed))
        if measure == "cost":
            return (gap_closed(lru.cost_missed_ms, policy.cost_missed_ms, self.cost_missed_lower_ms),
                    gap_closed(lru.cost_missed_ms, policy.cost_missed_ms, self.cost_missed_ms))
        raise ValueError(f"measure must be misses, bytes or cost, got {measure!r}")

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        n, nbytes, cost = self.requests, self.bytes_requested, self.cost_requested_ms
        data.update(miss_ratio=self.miss_ratio, byte_miss_ratio=self.byte_miss_ratio,
                    cost_miss_ratio=self.cost_miss_ratio,
                    miss_ratio_lower=self.misses_lower / n if n else math.nan,
                    byte_miss_ratio_lower=self.bytes_missed_lower / nbytes if nbytes else math.nan,
                    cost_miss_ratio_lower=self.cost_missed_lower_ms / cost if cost else math.nan)
        return data


def offline_reference(parts: Sequence[Sequence[Request]], capacity_bytes: int) -> OfflineReference:
    """The offline reference of each trace in ``parts`` (one per instance, each a cache of
    ``capacity_bytes``; see ``home_partition``), summed. See ``OfflineReference`` for what it is."""
    sizes = {r.size_bytes for part in parts for r in part}
    costs = {r.load_ms for part in parts for r in part}
    uniform = len(sizes) <= 1
    exact_cost = uniform and len(costs) <= 1
    totals = dict.fromkeys(("requests", "misses", "misses_lower", "bytes_requested", "bytes_missed",
                            "bytes_missed_lower", "cost_requested_ms", "cost_missed_ms",
                            "cost_missed_lower_ms"), 0.0)
    for part in parts:
        if not part:
            continue
        keys = [r.model_id for r in part]
        size_l = [r.size_bytes for r in part]
        cost_l = [r.load_ms for r in part]
        if uniform:
            size = size_l[0]
            slots = capacity_bytes // size if size > 0 else len(set(keys))
            opt = ref.belady(keys, slots, sizes=size_l, costs=cost_l)
            lower_misses, lower_bytes = float(opt.misses), float(opt.bytes_missed)
            upper_misses, upper_bytes = float(opt.misses), float(opt.bytes_missed)
            cost_hi = cost_lo = opt.cost_missed
            if not exact_cost:
                cost_hi = ref.belady_size(keys, size_l, capacity_bytes, costs=cost_l, objective="cost").cost_missed
                cost_lo = ref.pfoo_lower_bound(keys, size_l, capacity_bytes, costs=cost_l).cost_missed
        else:
            bound = ref.pfoo_lower_bound(keys, size_l, capacity_bytes, costs=cost_l)
            by_count = ref.belady_size(keys, size_l, capacity_bytes, costs=cost_l, objective="object")
            by_bytes = ref.belady_size(keys, size_l, capacity_bytes, costs=cost_l, objective="byte")
            by_cost = ref.belady_size(keys, size_l, capacity_bytes, costs=cost_l, objective="cost")
            upper_misses, lower_misses = float(by_count.misses), bound.misses
            upper_bytes, lower_bytes = float(by_bytes.bytes_missed), bound.bytes_missed
            cost_hi, cost_lo = by_cost.cost_missed, bound.cost_missed
        totals["requests"] += len(part)
        totals["misses"] += upper_misses
        totals["misses_lower"] += lower_misses
        totals["bytes_requested"] += sum(size_l)
        totals["bytes_missed"] += upper_bytes
        totals["bytes_missed_lower"] += lower_bytes
        totals["cost_requested_ms"] += math.fsum(cost_l)
        totals["cost_missed_ms"] += cost_hi
        totals["cost_missed_lower_ms"] += cost_lo
    if uniform:
        label = "Belady (exact)" if exact_cost else "Belady (exact for misses; cost: PFOO-L..Belady-Size)"
    else:
        label = "PFOO-L lower bound .. Belady-Size heuristic (variable sizes: OPT is bracketed)"
    return OfflineReference(
        label=label, exact_misses=uniform, exact_cost=exact_cost, requests=int(totals["requests"]),
        misses=totals["misses"], misses_lower=totals["misses_lower"],
        bytes_requested=int(totals["bytes_requested"]), bytes_missed=totals["bytes_missed"],
        bytes_missed_lower=totals["bytes_missed_lower"], cost_requested_ms=totals["cost_requested_ms"],
        cost_missed_ms=totals["cost_missed_ms"], cost_missed_lower_ms=totals["cost_missed_lower_ms"])
