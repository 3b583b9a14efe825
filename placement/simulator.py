"""Trace-driven simulation of the placement engine: one cache, or a cluster of runtime instances.

Two levels, as in the method of the reference notes (peers, section 5.3):

**One cache** (``replay``): an instance's model cache of ``capacity_bytes`` under an eviction policy,
fed a trace of requests. The decisions are exactly the runtime's (``mesh/runtime/cache.py``):

- a hit (the model is in the cache) is a ``touch``;
- a miss asks ``admit``; if admitted, ``victims(need)`` names models to evict until the newcomer fits,
  each is ``remove``d, and the model is ``insert``ed with its size and ``cost = load_ms``;
- a model larger than the capacity, or one the policy refuses to admit, is a miss that does not stay
  (it is loaded, served and dropped: a pass-through, counted in ``bypassed``).

Loads take no time at this level: a miss costs its ``load_ms`` as added latency and nothing else. This
is the level at which policies are compared with each other and with the offline optimum (Belady),
since it is the level those references are defined at; it is also the one that has to be fast (the
loop binds the policy's methods once and allocates nothing per request besides the policy's own work).

**A cluster** (``simulate_cluster``): ``instances`` runtime instances, each with its own policy object
and capacity, and a router in front of them, driven by the trace's timestamps (a discrete-event
simulation; no clock is read). Routing is the router's (``mesh/router/routing.py``):

1. a loaded copy, the one with the fewest requests in flight (ties broken round-robin per model,
   standing in for the router's random choice of two);
2. else a copy still loading: the request joins that load (single flight);
3. else the model's home, ``placement.hashing.choose_home`` over every instance with
   ``load = loads running or queued + requests in flight`` (rendezvous hashing with bounded load),
   which loads it.

Each instance runs at most ``load_slots`` loads at once (the runtime's ``max_concurrent_loads``); a
further load queues in arrival order. Room for a load is made when it gets its slot, as the runtime's
``_reserve`` does: its bytes are reserved from then, the victims are evicted then, and the model enters
the policy when the load completes (so a loading model is never a victim). A miss's *added latency*
is the time from its arrival until its load completes (queueing for a slot, then ``load_ms``); a
request that joins a load waits for the rest of it; a hit adds nothing. ``infer_ms`` (when the trace
has it) keeps a request in flight for that long after its model is ready, which is what the
router's load figures and the queueing signal of copy scaling see.

Copy scaling (``ScalingConfig``, the rules of ``placement.scaling``): each request is observed with
the model's requests in flight; when a copy is due, it is loaded on the next instance of the model's
``copy_order`` that has none, through the same load slots; copies the scaling holds are protected from
eviction (and pinned models everywhere), and an extra copy that is released falls back to the cache
policy: nothing is unloaded, it just becomes evictable. Models holding extra copies are re-examined
every ``SWEEP_S`` of trace time, so a model whose traffic stops still gives its copies back.

Simplifications, each chosen because it does not change a policy comparison:

- One router with a perfect, instant view of the cluster (the real ones see placements through the
  registry's watch, milliseconds late); requests never fail and loads never fail or time out.
- Inference has unlimited concurrency: ``infer_ms`` is time in flight, not a queue.
- An evicted copy frees its bytes at once (the runtime keeps them counted until its in-flight requests
  finish, a few milliseconds). A pass-through load (too large, refused, or no room because every
  resident model is protected) holds no bytes while it runs.
- When a load's room cannot be made (every resident model is protected), the load is a pass-through
  instead of waiting for space (``no_room``).
- A model's size and load time are those of the request that triggers the load.

Metrics, at both levels (``Stats``; the same quantities as the Grafana panels): requests, hits, misses,
miss ratio, byte miss ratio (bytes loaded on demand / bytes requested), cost-weighted miss ratio
(``load_ms`` of the demand loads / ``load_ms`` of all requests), loads per second over the trace's
duration (scale-out copies included: it measures churn), added latency percentiles over all requests
(hits count as 0), evictions; at cluster level also copies added and released. ``gap_closed`` is the
headline comparison with the offline optimum: (LRU - policy) / (LRU - OPT).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from itertools import chain
from typing import Any

from placement import belady as ref
from placement.hashing import Candidate, choose_home, rendezvous_order
from placement.policy import EvictionPolicy, make_policy
from placement.request import Request
from placement.scaling import ScalingConfig, ScalingPolicy

__all__ = [
    "ClusterStats",
    "OfflineReference",
    "Stats",
    "build_policy",
    "gap_closed",
    "home_partition",
    "instance_names",
    "offline_reference",
    "replay",
    "simulate_cluster",
    "sum_stats",
]

# How often (trace seconds) models holding extra copies are re-examined when they get no requests.
SWEEP_S = 10.0

PolicyFactory = Callable[[], EvictionPolicy]


# -- metrics --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Stats:
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
    def miss_ratio(self) -> float:
        return self.misses / self.requests if self.requests else math.nan

    @property
    def byte_miss_ratio(self) -> float:
        return self.bytes_missed / self.bytes_requested if self.bytes_requested else math.nan

    @property
    def cost_miss_ratio(self) -> float:
        return self.cost_missed_ms / self.cost_requested_ms if self.cost_requested_ms else math.nan

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
    ``copies_added``: copies loaded by scaling; ``copies_removed``: extra copies released back to the
    cache policy.
    """

    total: Stats
    instances: Mapping[str, Stats]
    no_room: int = 0
    copies_added: int = 0
    copies_removed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"total": self.total.as_dict(), "no_room": self.no_room,
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


def _with_waits(stats: Stats, waits: list[float]) -> Stats:
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


@dataclass(frozen=True, slots=True)
class OfflineReference:
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

    @property
    def miss_ratio(self) -> float:
        return self.misses / self.requests if self.requests else math.nan

    @property
    def byte_miss_ratio(self) -> float:
        return self.bytes_missed / self.bytes_requested if self.bytes_requested else math.nan

    @property
    def cost_miss_ratio(self) -> float:
        return self.cost_missed_ms / self.cost_requested_ms if self.cost_requested_ms else math.nan

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


def _out_of_order(t: float, last: float) -> ValueError:
    return ValueError(f"the trace is not in time order: a request at {t!r} s follows one at {last!r} s")


# -- one cache ------------------------------------------------------------------------------------


def replay(requests: Iterable[Request], policy: EvictionPolicy, capacity_bytes: int) -> Stats:
    """Replay ``requests`` (in time order) through one cache of ``capacity_bytes`` under ``policy``.

    ``policy`` should start empty; it is left in its final state. Loads take no time (see the module
    docstring): a miss adds its ``load_ms`` of latency.
    """
    if capacity_bytes < 0:
        raise ValueError(f"capacity must be >= 0 bytes, got {capacity_bytes}")
    capacity = capacity_bytes
    # Bound once: the loop below runs millions of times.
    touch = policy.touch
    admit = policy.admit
    victims = policy.victims
    remove = policy.remove
    insert = policy.insert
    waits: list[float] = []
    wait = waits.append
    n = misses = bypassed = evictions = 0
    nbytes = missed_bytes = 0
    cost = missed_cost = 0.0
    stream = iter(requests)
    head = next(stream, None)
    if head is None:
        return Stats()
    first = last = head.time_s
    for t, key, size, load_ms, _ in chain((head,), stream):
        if t < last:
            raise _out_of_order(t, last)
        last = t
        n += 1
        nbytes += size
        cost += load_ms
        if key in policy:
            touch(key, t)
            continue
        misses += 1
        missed_bytes += size
        missed_cost += load_ms
        wait(load_ms)
        if size > capacity or not admit(key, size, t):
            bypassed += 1
            continue
        need = policy.total_size + size - capacity
        if need > 0:
            for victim in victims(need, t):
                if victim in policy:
                    remove(victim)
                    evictions += 1
            if policy.total_size + size > capacity:  # a policy that proposed too little
                bypassed += 1
                continue
        insert(key, size, t, cost=load_ms)
    stats = Stats(requests=n, hits=n - misses, misses=misses, bypassed=bypassed,
                  evictions=evictions, bytes_requested=nbytes, bytes_missed=missed_bytes,
                  cost_requested_ms=cost, cost_missed_ms=missed_cost, start_s=first, end_s=last)
    return _with_waits(stats, waits)


# -- a cluster ------------------------------------------------------------------------------------


def build_policy(name: str, capacity_bytes: int, params: Mapping[str, object] | None = None) -> EvictionPolicy:
    """``make_policy(name, **params)``, telling the policy the cache's capacity when it takes one.

    Admission filters size themselves from the capacity (``capacity=``); plain eviction policies do not
    take it. The registry does not say which is which, so the capacity is offered first and dropped
    when the policy refuses the parameter (a parameter the caller gave is never dropped).
    """
    given = dict(params or {})
    if "capacity" not in given:
        try:
            return make_policy(name, capacity=capacity_bytes, **given)
        except ValueError as exc:
            if "bad parameters" not in str(exc):
                raise
    return make_policy(name, **given)


def instance_names(count: int) -> list[str]:
    """The names the simulated instances get: ``runtime-0`` ... ``runtime-<count-1>``."""
    return [f"runtime-{i}" for i in range(count)]


def home_partition(requests: Iterable[Request], instances: int) -> list[list[Request]]:
    """``requests`` split by their model's home when load is ignored (the first of its HRW order over
    ``instance_names(instances)``): the per-instance traces of a cluster without bounded load or
    copies, on which per-instance references (Belady) are computed."""
    names = instance_names(instances)
    index = {name: i for i, name in enumerate(names)}
    parts: list[list[Request]] = [[] for _ in names]
    homes: dict[str, int] = {}
    for r in requests:
        home = homes.get(r.model_id)
        if home is None:
            home = homes[r.model_id] = index[rendezvous_order(r.model_id, names)[0]]
        parts[home].append(r)
    return parts


class _Load:
    __slots__ = ("copy", "cost_ms", "keep", "model", "node", "size", "waiters")

    def __init__(self, node: _Node, model: str, size: int, cost_ms: float, keep: bool, copy: bool) -> None:
        self.node = node
        self.model = model
        self.size = size
        self.cost_ms = cost_ms
        self.keep = keep  # False: a pass-through, the model does not stay
        self.copy = copy  # loaded by copy scaling, not by a request
        self.waiters: list[tuple[float, float]] = []  # (arrival time, infer_ms) of waiting requests


class _Node:
    __slots__ = ("bypassed", "bytes_missed", "bytes_requested", "capacity", "copy_loads", "cost_missed",
                 "cost_requested", "evictions", "hits", "index", "inflight", "joined", "loading", "misses",
                 "name", "policy", "queue", "requests", "reserved", "running", "waits")

    def __init__(self, index: int, name: str, policy: EvictionPolicy, capacity: int) -> None:
        self.index = index
        self.name = name
        self.policy = policy
        self.capacity = capacity
        self.reserved = 0  # bytes of loads running that will stay
        self.running = 0  # loads holding a slot
        self.queue: deque[_Load] = deque()  # loads waiting for a slot
        self.inflight = 0  # requests sent here and not finished (waiting for a load or inferring)
        self.loading: dict[str, _Load] = {}
        self.requests = self.hits = self.misses = self.joined = self.copy_loads = 0
        self.bypassed = self.evictions = self.bytes_requested = self.bytes_missed = 0
        self.cost_requested = self.cost_missed = 0.0
        self.waits: list[float] = []

    def stats(self, start: float, end: float) -> Stats:
        stats = Stats(requests=self.requests, hits=self.hits, misses=self.misses, joined=self.joined,
                      copy_loads=self.copy_loads, bypassed=self.bypassed, evictions=self.evictions,
                      bytes_requested=self.bytes_requested, bytes_missed=self.bytes_missed,
                      cost_requested_ms=self.cost_requested, cost_missed_ms=self.cost_missed,
                      start_s=start, end_s=end)
        return _with_waits(stats, self.waits)


_LOAD_DONE = 0
_INFER_DONE = 1


class _Protection:
    """``protected`` for one instance's victims: pinned models, and the copies scaling holds there.

    When a model has more copies than scaling holds, the held ones are the first in its copy order.
    """

    __slots__ = ("_cluster", "_node")

    def __init__(self, cluster: _Cluster, node: _Node) -> None:
        self._cluster = cluster
        self._node = node

    def __bool__(self) -> bool:
        """Whether any key can be protected (an empty protection is falsy, like an empty set)."""
        scaling = self._cluster.scaling
        return scaling is not None and bool(scaling.protected())

    def __contains__(self, key: object) -> bool:
        scaling = self._cluster.scaling
        if scaling is None or not isinstance(key, str) or key not in scaling.protected():
            return False
        kept = scaling.kept(key)
        if kept is None:
            return True
        holders = self._cluster.where.get(key, [])
        if len(holders) <= kept:
            return True
        held = {n.name for n in holders}
        first = [name for name in rendezvous_order(key, self._cluster.names) if name in held][:kept]
        return self._node.name in first


class _Cluster:
    """The state of ``simulate_cluster``; one object so that the event handlers share it cheaply."""

    def __init__(self, nodes: list[_Node], *, load_slots: int, load_factor: float,
                 scaling: ScalingPolicy | None) -> None:
        self.nodes = nodes
        self.names = [n.name for n in nodes]
        self.by_name = {n.name: n for n in nodes}
        self.load_slots = load_slots
        self.load_factor = load_factor
        self.scaling = scaling
        self.where: dict[str, list[_Node]] = {}  # loaded copies per model
        self.loading: dict[str, list[_Load]] = {}  # loads in progress (or queued) per model
        self.model_inflight: dict[str, int] = {}
        self.turn: dict[str, int] = {}  # round-robin among equally busy copies
        self.events: list[tuple[float, int, int, Any]] = []
        self.seq = 0
        self.no_room = self.copies_added = self.copies_removed = 0
        self.protection = {n.index: _Protection(self, n) for n in nodes}

    # -- events -------------------------------------------------------------------------------

    def push(self, when: float, kind: int, payload: Any) -> None:
        self.seq += 1
        heapq.heappush(self.events, (when, self.seq, kind, payload))

    def run_until(self, t: float) -> None:
        events = self.events
        while events and events[0][0] <= t:
            when, _, kind, payload = heapq.heappop(events)
            if kind == _LOAD_DONE:
                self.finish_load(payload, when)
            else:
                node, model, count = payload
                self.release(node, model, count)

    def release(self, node: _Node, model: str, count: int) -> None:
        node.inflight -= count
        left = self.model_inflight[model] - count
        self.model_inflight[model] = left
        if self.scaling is not None:
            self.scaling.set_inflight(model, left)

    def hold(self, node: _Node, model: str) -> None:
        node.inflight += 1
        self.model_inflight[model] = self.model_inflight.get(model, 0) + 1

    # -- loads --------------------------------------------------------------------------------

    def enqueue(self, load: _Load, now: float) -> None:
        node = load.node
        node.loading[load.model] = load
        self.loading.setdefault(load.model, []).append(load)
        if node.running < self.load_slots:
            self.start_load(load, now)
        else:
            node.queue.append(load)

    def start_load(self, load: _Load, now: float) -> None:
        node = load.node
        node.running += 1
        if load.keep:
            policy = node.policy
            need = policy.total_size + node.reserved + load.size - node.capacity
            if need > 0:
                for victim in policy.victims(need, now, protected=self.protection[node.index]):
                    if victim in policy:
                        policy.remove(victim)
                        node.evictions += 1
                        self.where[victim].remove(node)
                        if not self.where[victim]:
                            del self.where[victim]
                if policy.total_size + node.reserved + load.size > node.capacity:
                    load.keep = False
                    node.bypassed += 1
                    self.no_room += 1
            if load.keep:
                node.reserved += load.size
        self.push(now + load.cost_ms / 1000.0, _LOAD_DONE, load)

    def finish_load(self, load: _Load, now: float) -> None:
        node, model = load.node, load.model
        node.running -= 1
        del node.loading[model]
        loads = self.loading[model]
        loads.remove(load)
        if not loads:
            del self.loading[model]
        if load.keep:
            node.reserved -= load.size
            node.policy.insert(model, load.size, now, cost=load.cost_ms)
            self.where.setdefault(model, []).append(node)
        if load.waiters:
            inferring = 0
            for arrived, infer_ms in load.waiters:
                node.waits.append((now - arrived) * 1000.0)
                if infer_ms > 0:
                    inferring += 1
                    self.push(now + infer_ms / 1000.0, _INFER_DONE, (node, model, 1))
            done = len(load.waiters) - inferring
            if done:
                self.release(node, model, done)
        if node.queue:
            self.start_load(node.queue.popleft(), now)

    # -- requests -----------------------------------------------------------------------------

    def least_busy(self, model: str, nodes: list[_Node]) -> _Node:
        if len(nodes) == 1:
            return nodes[0]
        low = min(n.inflight for n in nodes)
        tied = [n for n in nodes if n.inflight == low]
        if len(tied) == 1:
            return tied[0]
        turn = self.turn.get(model, 0)
        self.turn[model] = turn + 1
        return tied[turn % len(tied)]

    def request(self, t: float, model: str, size: int, cost_ms: float, infer_ms: float) -> None:
        holders = self.where.get(model)
        if holders:
            node = self.least_busy(model, holders)
            node.requests += 1
            node.hits += 1
            node.bytes_requested += size
            node.cost_requested += cost_ms
            node.policy.touch(model, t)
            if infer_ms > 0:
                self.hold(node, model)
                self.push(t + infer_ms / 1000.0, _INFER_DONE, (node, model, 1))
        else:
            in_progress = self.loading.get(model)
            if in_progress:
                load = min(in_progress, key=lambda ld: ld.node.inflight)
                node = load.node
                node.joined += 1
            else:
                node = self.home(model, size)
                keep = size <= node.capacity and node.policy.admit(model, size, t)
                load = _Load(node, model, size, cost_ms, keep, copy=False)
                node.misses += 1
                node.bytes_missed += size
                node.cost_missed += cost_ms
                if not keep:
                    node.bypassed += 1
                self.enqueue(load, t)
            node.requests += 1
            node.bytes_requested += size
            node.cost_requested += cost_ms
            load.waiters.append((t, infer_ms))
            self.hold(node, model)
        if self.scaling is not None:
            self.scale(model, t, size, cost_ms)

    def home(self, model: str, size: int) -> _Node:
        candidates = [Candidate(n.name, n.capacity, float(n.running + len(n.queue) + n.inflight))
                      for n in self.nodes]
        name = choose_home(model, candidates, size, load_factor=self.load_factor)
        if name is None:  # fits nowhere: it goes to its plain home and passes through
            name = rendezvous_order(model, self.names)[0]
        return self.by_name[name]

    # -- copy scaling -------------------------------------------------------------------------

    def copies(self, model: str) -> list[_Node]:
        nodes = list(self.where.get(model, ()))
        nodes.extend(ld.node for ld in self.loading.get(model, ()) if ld.keep)
        return nodes

    def scale(self, model: str, t: float, size: int, cost_ms: float) -> None:
        scaling = self.scaling
        assert scaling is not None
        scaling.observe(model, t, self.model_inflight.get(model, 0))
        self.apply(model, t, size, cost_ms)

    def apply(self, model: str, t: float, size: int, cost_ms: float) -> None:
        scaling = self.scaling
        assert scaling is not None
        holding = self.copies(model)
        limit = sum(1 for n in self.nodes if n.capacity >= size)
        decision = scaling.decide(model, t, len(holding), limit=limit)
        self.copies_removed += decision.release
        if decision.add <= 0:
            return
        taken = {n.name for n in holding}
        taken.update(ld.node.name for ld in self.loading.get(model, ()))
        added = 0
        for name in rendezvous_order(model, self.names):
            if added == decision.add:
                break
            node = self.by_name[name]
            if name in taken or node.capacity < size:
                continue
            node.copy_loads += 1
            self.enqueue(_Load(node, model, size, cost_ms, keep=True, copy=True), t)
            added += 1
        self.copies_added += added

    def sweep(self, t: float, sizes: Mapping[str, tuple[int, float]]) -> None:
        """Re-examine the models holding extra copies (their traffic may have stopped)."""
        assert self.scaling is not None
        for model in self.scaling.held_models():
            size, cost_ms = sizes[model]
            self.apply(model, t, size, cost_ms)


def simulate_cluster(
    requests: Iterable[Request],
    *,
    instances: int,
    capacity_bytes: int,
    policy: str | PolicyFactory,
    policy_params: Mapping[str, object] | None = None,
    load_factor: float = 1.25,
    scaling: ScalingConfig | None = None,
    load_slots: int = 2,
) -> ClusterStats:
    """Simulate a router and ``instances`` runtime instances of ``capacity_bytes`` each on ``requests``.

    ``policy`` is a registered policy name (built with ``policy_params`` once per instance) or a
    factory of fresh policy objects. ``scaling`` enables copy scaling with those rules (``None``: one
    copy per model, as with scaling off). See the module docstring for the model.
    """
    if instances < 1:
        raise ValueError(f"instances must be >= 1, got {instances}")
    if load_slots < 1:
        raise ValueError(f"load_slots must be >= 1, got {load_slots}")
    if capacity_bytes < 0:
        raise ValueError(f"capacity must be >= 0 bytes, got {capacity_bytes}")
    if not load_factor >= 1.0:
        raise ValueError(f"load_factor must be >= 1, got {load_factor!r}")
    if isinstance(policy, str):
        name, params = policy, dict(policy_params or {})

        def factory() -> EvictionPolicy:
            return build_policy(name, capacity_bytes, params)
    else:
        factory = policy
    nodes = [_Node(i, name, factory(), capacity_bytes) for i, name in enumerate(instance_names(instances))]
    cluster = _Cluster(nodes, load_slots=load_slots, load_factor=load_factor,
                       scaling=ScalingPolicy(scaling) if scaling is not None else None)

    sizes: dict[str, tuple[int, float]] = {}  # the last known size and load time, for sweeps
    first = last = math.nan
    next_sweep = math.inf
    for t, model, size, cost_ms, infer_ms in requests:
        if t < last:
            raise _out_of_order(t, last)
        if last != last:  # NaN: the first request
            first = t
            next_sweep = t + SWEEP_S
        last = t
        if cluster.scaling is not None:
            sizes[model] = (size, cost_ms)
            # Sweeps happen at their own times, also in a lull without requests (that is when
            # traffic has stopped and copies should give way); with nothing held, skip ahead.
            while next_sweep <= t:
                if not cluster.scaling.held_extra():
                    next_sweep += (math.floor((t - next_sweep) / SWEEP_S) + 1) * SWEEP_S
                    break
                cluster.run_until(next_sweep)
                cluster.sweep(next_sweep, sizes)
                next_sweep += SWEEP_S
        cluster.run_until(t)
        cluster.request(t, model, size, cost_ms, infer_ms)
    cluster.run_until(math.inf)  # finish the loads in progress, so that their waiters are counted

    per_node = {n.name: n.stats(first, last) for n in nodes}
    waits = [w for n in nodes for w in n.waits]
    total = _with_waits(replace(sum_stats(list(per_node.values())), start_s=first, end_s=last), waits)
    return ClusterStats(total=total, instances=per_node, no_room=cluster.no_room,
                        copies_added=cluster.copies_added, copies_removed=cluster.copies_removed)

