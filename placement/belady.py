"""Offline references for judging an eviction policy: the optimum where it is known, bounds where not.

All three need the whole trace in advance (the next use of every request), so they are yardsticks for
the simulator, never policies for the runtime. They take a trace as parallel sequences: the key of each
request, and where it matters its size in bytes and its cost (``load_ms``). Each returns its number of
misses with their bytes and cost, so that the three miss ratios of the reference notes (request, byte,
cost-weighted) come from one run.

1. ``belady``: Belady's MIN (Belady 1966; Mattson et al. 1970), **exact** for a cache that counts
   objects (all sizes equal, ``capacity`` in objects): on a miss with the cache full, evict the resident
   whose next request is furthest in the future (never requested again counts as furthest). It is
   optimal in the *demand-fetch* model, where every miss is loaded and stays, as a model must be
   resident to serve its request. With ``bypass=True`` it may instead not cache the newcomer when the
   newcomer's next request comes after every resident's; that variant is optimal when misses may pass
   through (the model served and dropped), which is what admission filters do, and can be lower.
   O(n log n): next uses come from one stable ``argsort`` (numpy), and a max-heap of next uses with
   lazy invalidation picks each victim.

2. ``belady_size``: for variable sizes, where the optimum is NP-hard (Berger, Beckmann,
   Harchol-Balter, "Practical Bounds on Optimal Caching with Variable Object Sizes", SIGMETRICS'18), a
   **heuristic**: on a miss, evict residents in decreasing order of ``distance to next use x size /
   cost`` until the newcomer fits. It is a feasible offline demand-fetch policy, so its misses are an
   **upper bound** on the optimum's, not the optimum. The weight depends on the objective:
   ``"object"`` (miss count: size, so a large model far in the future goes first), ``"byte"`` (byte
   misses: 1, i.e. size-blind MIN), ``"cost"`` (sum of ``load_ms`` missed: size / cost). This is the
   reference anchors' OfflineHeur and libCacheSim's BeladySize without its random sampling. Each
   eviction scans the residents' scores with numpy: O(residents) per eviction, a few seconds per
   million requests for caches of a few thousand models.

3. ``pfoo_lower_bound``: the PFOO-L **lower bound** of Berger et al. Each request that is requested
   again defines a reuse interval; keeping the object through it costs size x length in
   space-time, and the cache offers at most capacity x (number of requests). Any policy, offline or
   not, with or without bypass, hits only on intervals it keeps and keeps at any moment at most
   ``capacity`` bytes, so the best fractional choice of intervals within that budget (a greedy by value
   per space-time, value = 1, the size or the cost of the next request per objective) misses no more
   than the optimum. O(n log n) with numpy; one bound per objective.

For variable sizes the optimum thus lies in ``[pfoo_lower_bound, belady_size]`` (the bracket the
reference anchors report; theirs is 0.002-0.005 wide on their size workload). For equal sizes,
``belady`` is the optimum and PFOO-L sits at or below it.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from heapq import heapify, heappop, heappush
from typing import Literal

import numpy as np
from numpy.typing import NDArray

__all__ = ["Bounds", "OfflineResult", "belady", "belady_size", "encode_keys", "next_use", "pfoo_lower_bound"]

Objective = Literal["object", "byte", "cost"]
_OBJECTIVES = ("object", "byte", "cost")
_MIN_COST = 1e-9  # a zero cost would make a score infinite; such a miss is free and evicted first anyway


@dataclass(frozen=True, slots=True)
class OfflineResult:
    """The misses of an offline policy on a trace. ``exact``: the policy is the optimum."""

    method: str
    exact: bool
    requests: int
    misses: int
    bytes_requested: int
    bytes_missed: int
    cost_requested: float
    cost_missed: float
    hits: NDArray[np.bool_] | None = None  # per request, when asked for

    @property
    def miss_ratio(self) -> float:
        return self.misses / self.requests if self.requests else 0.0

    @property
    def byte_miss_ratio(self) -> float:
        return self.bytes_missed / self.bytes_requested if self.bytes_requested else 0.0

    @property
    def cost_miss_ratio(self) -> float:
        return self.cost_missed / self.cost_requested if self.cost_requested else 0.0


@dataclass(frozen=True, slots=True)
class Bounds:
    """Lower bounds on the misses of any policy (fractional: the relaxation may keep part of an interval)."""

    requests: int
    misses: float
    bytes_requested: int
    bytes_missed: float
    cost_requested: float
    cost_missed: float

    @property
    def miss_ratio(self) -> float:
        return self.misses / self.requests if self.requests else 0.0

    @property
    def byte_miss_ratio(self) -> float:
        return self.bytes_missed / self.bytes_requested if self.bytes_requested else 0.0

    @property
    def cost_miss_ratio(self) -> float:
        return self.cost_missed / self.cost_requested if self.cost_requested else 0.0


# -- the trace ------------------------------------------------------------------------------------


def encode_keys(keys: Iterable[Hashable] | NDArray[np.integer]) -> NDArray[np.int64]:
    """Dense integer codes for ``keys`` (equal keys, equal codes), numbered in order of first appearance
    for a Python sequence, in sorted order for a numpy integer array."""
    if isinstance(keys, np.ndarray):
        _, inverse = np.unique(keys, return_inverse=True)
        return np.asarray(inverse, dtype=np.int64).reshape(-1)
    index: dict[Hashable, int] = {}
    setdefault = index.setdefault
    return np.fromiter((setdefault(k, len(index)) for k in keys), dtype=np.int64)


def next_use(codes: NDArray[np.integer]) -> NDArray[np.int64]:
    """For each request, the index of the next request for the same key, or ``len(codes)`` if none."""
    n = len(codes)
    nxt = np.full(n, n, dtype=np.int64)
    if n < 2:
        return nxt
    order = np.argsort(codes, kind="stable")  # by key, then by time within a key
    same = codes[order[1:]] == codes[order[:-1]]
    nxt[order[:-1][same]] = order[1:][same]
    return nxt


def _trace(
    keys: Sequence[Hashable] | NDArray[np.integer],
    sizes: Sequence[int] | NDArray[np.integer] | None,
    costs: Sequence[float] | NDArray[np.floating] | None,
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.float64]]:
    codes = encode_keys(keys)
    n = len(codes)
    size_arr = np.ones(n, dtype=np.int64) if sizes is None else np.asarray(sizes, dtype=np.int64)
    cost_arr = np.ones(n, dtype=np.float64) if costs is None else np.asarray(costs, dtype=np.float64)
    if size_arr.shape != (n,) or cost_arr.shape != (n,):
        raise ValueError(f"sizes and costs must have one value per request ({n})")
    if n and int(size_arr.min()) < 0:
        raise ValueError("sizes must be >= 0 bytes")
    if n and not (np.isfinite(cost_arr).all() and float(cost_arr.min()) >= 0):
        raise ValueError("costs must be finite and >= 0")
    return codes, size_arr, cost_arr


def _result(method: str, exact: bool, hit_flags: bytearray, sizes: NDArray[np.int64],
            costs: NDArray[np.float64], record_hits: bool) -> OfflineResult:
    hits = np.frombuffer(bytes(hit_flags), dtype=np.bool_).copy()
    missed = ~hits
    return OfflineResult(
        method=method, exact=exact, requests=len(hits), misses=int(missed.sum()),
        bytes_requested=int(sizes.sum()), bytes_missed=int(sizes[missed].sum()),
        cost_requested=math.fsum(costs.tolist()), cost_missed=math.fsum(costs[missed].tolist()),
        hits=hits if record_hits else None)


# -- Belady's MIN ---------------------------------------------------------------------------------


def belady(
    keys: Sequence[Hashable] | NDArray[np.integer],
    capacity: int,
    *,
    bypass: bool = False,
    sizes: Sequence[int] | NDArray[np.integer] | None = None,
    costs: Sequence[float] | NDArray[np.floating] | None = None,
    record_hits: bool = False,
) -> OfflineResult:
    """Belady's MIN on a cache of ``capacity`` objects: the exact optimum of the miss count.

    ``sizes`` and ``costs`` (one per request) only feed the byte and cost figures of the result; the
    cache counts objects whatever they are. ``bypass``: a newcomer needed later than every resident is
    not cached (optimal when misses may pass through). ``record_hits``: keep the per-request hit flags.
    """
    if capacity < 0:
        raise ValueError(f"capacity must be >= 0 objects, got {capacity}")
    codes, size_arr, cost_arr = _trace(keys, sizes, costs)
    n = len(codes)
    nxt = next_use(codes).tolist()
    hit_flags = bytearray(n)
    resident: dict[int, int] = {}  # code -> the index of its next request
    heap: list[tuple[int, int]] = []  # (-next use, code); stale when the code's next use has moved on
    for t, code in enumerate(codes.tolist()):
        use = nxt[t]
        if code in resident:
            hit_flags[t] = 1
            resident[code] = use
            heappush(heap, (-use, code))
        elif capacity:
            if len(resident) >= capacity:
                while True:
                    far, victim = heap[0]
                    if resident.get(victim) == -far:
                        break
                    heappop(heap)
                if bypass and use >= -far:
                    continue  # the newcomer would be the furthest: serve it without caching
                heappop(heap)
                del resident[victim]
            resident[code] = use
            heappush(heap, (-use, code))
        else:
            continue
        if len(heap) > 2 * len(resident) + 1024:
            heap = [(-u, c) for c, u in resident.items()]
            heapify(heap)
    return _result("belady-bypass" if bypass else "belady", True, hit_flags, size_arr, cost_arr, record_hits)


# -- variable sizes: a heuristic (upper bound) ----------------------------------------------------


def belady_size(
    keys: Sequence[Hashable] | NDArray[np.integer],
    sizes: Sequence[int] | NDArray[np.integer],
    capacity: int,
    *,
    costs: Sequence[float] | NDArray[np.floating] | None = None,
    objective: Objective = "object",
    record_hits: bool = False,
) -> OfflineResult:
    """An offline demand-fetch heuristic for a cache of ``capacity`` bytes; not optimal (an upper bound).

    On a miss, residents are evicted in decreasing order of ``(next use - now) x weight`` until the
    newcomer fits, weight = size (``objective="object"``), 1 (``"byte"``) or size / cost (``"cost"``,
    costs per request, default 1). A request larger than the cache is a miss that is not cached.
    """
    if capacity < 0:
        raise ValueError(f"capacity must be >= 0 bytes, got {capacity}")
    if objective not in _OBJECTIVES:
        raise ValueError(f"objective must be one of {_OBJECTIVES}, got {objective!r}")
    codes, size_arr, cost_arr = _trace(keys, sizes, costs)
    n = len(codes)
    nxt = next_use(codes).astype(np.float64)
    nxt[nxt == n] = math.inf
    if objective == "object":
        weight = size_arr.astype(np.float64)
    elif objective == "byte":
        weight = np.ones(n, dtype=np.float64)
    else:
        weight = size_arr.astype(np.float64) / np.maximum(cost_arr, _MIN_COST)
    nxt_l, weight_l, size_l = nxt.tolist(), weight.tolist(), size_arr.tolist()

    # Residents live in slots of parallel arrays, so that one numpy expression scores them all. A free
    # slot has next use -inf and weight 1: its score is -inf, never the maximum.
    slots = 64
    slot_next = np.full(slots, -math.inf)
    slot_weight = np.ones(slots)
    slot_size = [0] * slots
    slot_code = [-1] * slots
    free: list[int] = []
    high = 0  # slots in use or freed
    slot_of: dict[int, int] = {}
    used = 0
    hit_flags = bytearray(n)
    for t, code in enumerate(codes.tolist()):
        slot = slot_of.get(code)
        if slot is not None:
            hit_flags[t] = 1
            slot_next[slot] = nxt_l[t]
            continue
        size = size_l[t]
        if size > capacity:
            continue
        need = used + size - capacity
        if need > 0:
            score = (slot_next[:high] - t) * slot_weight[:high]
            while need > 0:
                victim = int(score.argmax())
                score[victim] = -math.inf
                need -= slot_size[victim]
                used -= slot_size[victim]
                del slot_of[slot_code[victim]]
                slot_next[victim] = -math.inf
                slot_weight[victim] = 1.0
                free.append(victim)
        if free:
            slot = free.pop()
        else:
            if high == slots:
                slot_next = np.concatenate([slot_next, np.full(slots, -math.inf)])
                slot_weight = np.concatenate([slot_weight, np.ones(slots)])
                slot_size.extend([0] * slots)
                slot_code.extend([-1] * slots)
                slots *= 2
            slot = high
            high += 1
        slot_next[slot] = nxt_l[t]
        slot_weight[slot] = weight_l[t]
        slot_size[slot] = size
        slot_code[slot] = code
        slot_of[code] = slot
        used += size
    return _result(f"belady-size-{objective}", False, hit_flags, size_arr, cost_arr, record_hits)


# -- variable sizes: a lower bound ----------------------------------------------------------------


def pfoo_lower_bound(
    keys: Sequence[Hashable] | NDArray[np.integer],
    sizes: Sequence[int] | NDArray[np.integer],
    capacity: int,
    *,
    costs: Sequence[float] | NDArray[np.floating] | None = None,
) -> Bounds:
    """PFOO-L: lower bounds on the misses, byte misses and cost missed of any policy with a cache of
    ``capacity`` bytes on this trace (one greedy relaxation per objective)."""
    if capacity < 0:
        raise ValueError(f"capacity must be >= 0 bytes, got {capacity}")
    codes, size_arr, cost_arr = _trace(keys, sizes, costs)
    n = len(codes)
    nxt = next_use(codes)
    start = np.nonzero(nxt < n)[0]
    end = nxt[start]
    # Space-time of keeping the object from one request to its next (the hit at ``end`` is the gain).
    spacetime = size_arr[start].astype(np.float64) * (end - start).astype(np.float64)
    budget = float(capacity) * float(n)
    gains = {
        "object": np.ones(len(start), dtype=np.float64),
        "byte": size_arr[end].astype(np.float64),
        "cost": cost_arr[end],
    }
    saved = {name: _fractional_knapsack(spacetime, gain, budget) for name, gain in gains.items()}
    bytes_requested = int(size_arr.sum())
    cost_requested = math.fsum(cost_arr.tolist())
    return Bounds(
        requests=n, misses=max(0.0, n - saved["object"]),
        bytes_requested=bytes_requested, bytes_missed=max(0.0, bytes_requested - saved["byte"]),
        cost_requested=cost_requested, cost_missed=max(0.0, cost_requested - saved["cost"]))


def _fractional_knapsack(weight: NDArray[np.float64], gain: NDArray[np.float64], budget: float) -> float:
    """The most gain that items of ``weight`` fit in ``budget``, items divisible: densest first."""
    useful = gain > 0
    weight, gain = weight[useful], gain[useful]
    if not len(weight):
        return 0.0
    free = weight <= 0  # zero-size objects cost no space: always kept
    total = float(gain[free].sum())
    weight, gain = weight[~free], gain[~free]
    order = np.argsort(weight / gain, kind="stable")
    weight, gain = weight[order], gain[order]
    spent = np.cumsum(weight)
    whole = int(np.searchsorted(spent, budget, side="right"))
    total += float(gain[:whole].sum())
    if whole < len(weight):
        left = budget - (float(spent[whole - 1]) if whole else 0.0)
        total += float(gain[whole]) * left / float(weight[whole])
    return total
