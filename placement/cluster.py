"""Trace-driven simulation of a cluster: a router and runtime instances, deciding with the shipped code.

``simulate_cluster``: ``instances`` runtime instances, each with its own policy object and capacity,
and a router in front of them, driven by the trace's timestamps (a discrete-event simulation; no
clock is read). Every decision is made by the code the router and the runtime run, the decision
kernel (``placement.kernel``); this module only keeps the state those decisions read (which copies
are loaded or loading where, requests and loads in flight, bytes reserved) and counts outcomes.

Routing (``kernel.choose_copy``, as ``mesh.router.routing.pick_copy``): a loaded copy, the one with
the fewest requests in flight (the first in the order copies appeared on a tie; with more than four
copies, the better of two drawn at random, from a seeded generator); else a copy still loading, whose
load the request joins (single flight); else the model's home (``kernel.choose_home`` over every
instance with ``load = loads running or queued + requests in flight``, rendezvous hashing with
bounded load), which loads it.

Loading (the runtime's ``mesh.runtime.cache``): each instance runs at most ``load_slots`` loads at
once (``max_concurrent_loads``); a further load queues in arrival order. When a load gets its slot,
the admission filter is asked (``kernel.admission``) and room is made (``kernel.make_room``): its
bytes are reserved from then, the victims are evicted then, and the model enters the policy when the
load completes (so a loading model is never a victim). A model the filter refuses is loaded and
stays as the first to go, entering the eviction order ``REFUSED_AGE_S`` in the past, as in the
runtime (``refused="pass-through"`` drops it instead, as the one-cache ``replay`` does). With
``passthrough_bytes``, each instance holds that much of its capacity back as the runtime's
pass-through room: a refused model that the main room cannot take without evicting goes there
instead (``kernel.pool_room`` drops the room's least recently used copies), serves hits while it
stays, waits (holding its load slot) while the room is held by another load into it, and goes to
the main room as the first to go only when the room cannot hold it at all. A miss's
*added latency* is the time from its arrival until its load completes (queueing for a slot, then
``load_ms``); a request that joins a load waits for the rest of it; a hit adds nothing.
``infer_ms`` (when the trace has it) keeps a request in flight for that long after its model is
ready, which is what the router's load figures and the queueing signal of copy scaling see.

Copy scaling (``ScalingConfig``, the rules of ``placement.scaling``): each request is observed with
the model's requests in flight; when a copy is due, it is loaded on the next instance of the model's
rendezvous order that has none (``kernel.copy_targets``, as ``mesh.router.replicas``), through the
same load slots, entering the eviction order ``hold_s`` ahead of its load, as the router asks the
runtime to; pinned models (and models with ``min_copies``) are never evicted. Nothing is unloaded
when scaling releases a copy: it ages in the eviction order like any other. Models holding extra
copies are re-examined every ``SWEEP_S`` of trace time, so a model whose traffic stops still gives
its copies back.

Simplifications (what this simulator does not model of the deployed system):

- One router with a perfect, instant view of the cluster (the real ones see placements through the
  registry's watch, milliseconds late); requests never fail and loads never fail or time out.
- Inference has unlimited concurrency: ``infer_ms`` is time in flight, not a queue.
- An evicted copy frees its bytes at once (the runtime keeps them counted until its in-flight requests
  finish, a few milliseconds, and a load waiting for them evicts nothing more: ``make_room``'s
  ``freeing``). A pass-through load (too large, or no room because every resident model is
  protected) holds no bytes while it runs.
- When a load's room cannot be made (every resident model is protected), the load is a pass-through
  instead of waiting for space (``no_room``).
- A model's size and load time are those of the request that triggers the load. A load reserves the
  model's ``predicted`` size (default: that size) when it gets its slot and its measured size when
  it completes, making room again if that is larger (the runtime's top-up; it would wait for room
  held by other loads, where the simulator passes the load through, ``no_room``).
- Copy scaling decides on every request (the router decides once a second) and sees every request
  (each router sees its own share).
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any, Literal

from placement.hashing import Candidate, rendezvous_order
from placement.kernel import (
    COPY_LOADED,
    COPY_LOADING,
    admission,
    choose_copy,
    choose_home,
    copy_targets,
    make_room,
    pool_room,
)
from placement.policy import EvictionPolicy
from placement.registry import build_policy
from placement.request import Request
from placement.scaling import ScalingConfig, ScalingPolicy
from placement.stats import ClusterStats, Stats, out_of_order, sum_stats, with_waits

__all__ = ["SWEEP_S", "PolicyFactory", "home_partition", "instance_names", "simulate_cluster"]

# How often (trace seconds) models holding extra copies are re-examined when they get no requests.
SWEEP_S = 10.0

PolicyFactory = Callable[[], EvictionPolicy]
Refused = Literal["first-to-go", "pass-through"]


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
    __slots__ = ("copy", "cost_ms", "keep", "last_used", "model", "node", "pooled", "reserve", "size", "waiters")

    def __init__(self, node: _Node, model: str, size: int, cost_ms: float, keep: bool, copy: bool,
                 reserve: int | None = None) -> None:
        self.node = node
        self.model = model
        self.size = size  # measured: what the model holds once loaded
        self.reserve = size if reserve is None else reserve  # predicted: what it holds while loading
        self.cost_ms = cost_ms
        self.keep = keep  # False: a pass-through, the model does not stay
        self.copy = copy  # loaded by copy scaling, not by a request
        self.pooled = False  # held in its node's pass-through room
        self.last_used: float | None = None  # where it enters the eviction order (None: when loaded)
        self.waiters: list[tuple[float, float]] = []  # (arrival time, infer_ms) of waiting requests


class _Node:
    __slots__ = ("bypassed", "bytes_missed", "bytes_requested", "capacity", "copy_loads", "cost_missed",
                 "cost_requested", "evictions", "hits", "index", "joined", "loading", "misses",
                 "name", "policy", "pool", "pool_capacity", "pool_used", "pool_waiting", "queue", "requests",
                 "reserved", "running", "waits")

    def __init__(self, index: int, name: str, policy: EvictionPolicy, capacity: int, pool_capacity: int = 0) -> None:
        self.index = index
        self.name = name
        self.policy = policy
        self.capacity = capacity  # the main room's (the pass-through room's is apart)
        self.pool_capacity = pool_capacity
        self.pool_used = 0  # bytes of the pass-through room's copies and of loads into it
        self.pool: dict[str, int] = {}  # its loaded copies and their sizes, least recently used first
        self.pool_waiting: deque[_Load] = deque()  # loads (holding their slots) waiting for that room
        self.reserved = 0  # bytes of loads running that will stay
        self.running = 0  # loads holding a slot
        self.queue: deque[_Load] = deque()  # loads waiting for a slot
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
        return with_waits(stats, self.waits)


_LOAD_DONE = 0
_INFER_DONE = 1


def _copy_state(state: int, node: _Node) -> int:
    """``kernel.choose_copy``'s classifier: the simulator stores each copy's state as the kernel's
    rank already (no instance here is ever shutting down)."""
    return state


def _pinned(scaling: ScalingConfig | None) -> frozenset[str]:
    """The models no instance evicts, as the runtime's cache protects them: pinned, or registered
    with a minimum of copies (``min_copies > 0``). A copy that scaling merely holds is not among
    them: it enters the eviction order ``hold_s`` ahead instead (see ``_Cluster.apply``)."""
    if scaling is None:
        return frozenset()
    return frozenset(m for m, rule in scaling.models.items() if rule.pinned or rule.min_copies > 0)


class _Cluster:
    """The state of ``simulate_cluster``; one object so that the event handlers share it cheaply."""

    def __init__(self, nodes: list[_Node], *, load_slots: int, load_factor: float,
                 scaling: ScalingPolicy | None, refused: Refused, seed: int,
                 predicted: Mapping[str, int] | None = None) -> None:
        self.nodes = nodes
        self.names = [n.name for n in nodes]
        self.by_name = {n.name: n for n in nodes}
        self.load_slots = load_slots
        self.load_factor = load_factor
        self.scaling = scaling
        self.keep_refused = refused == "first-to-go"
        self.predicted = predicted or {}
        self.rng = random.Random(seed)  # the router's power-of-two choices among many copies
        self.where: dict[str, list[_Node]] = {}  # loaded copies per model
        # Every copy per model, node name -> COPY_LOADED or COPY_LOADING: what the router's view
        # holds as placements, read by kernel.choose_copy in place.
        self.copies: dict[str, dict[str, int]] = {}
        self.loading: dict[str, list[_Load]] = {}  # loads in progress (or queued) per model
        self.inflight: dict[str, int] = dict.fromkeys(self.names, 0)  # requests in flight per instance
        self.model_inflight: dict[str, int] = {}
        self.events: list[tuple[float, int, int, Any]] = []
        self.seq = 0
        self.no_room = self.refused = self.copies_added = self.copies_removed = self.pooled = 0
        self.protection = _pinned(scaling.config if scaling is not None else None)

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
        self.inflight[node.name] -= count
        left = self.model_inflight[model] - count
        self.model_inflight[model] = left
        if self.scaling is not None:
            self.scaling.set_inflight(model, left)

    def hold(self, node: _Node, model: str) -> None:
        self.inflight[node.name] += 1
        self.model_inflight[model] = self.model_inflight.get(model, 0) + 1

    # -- copies -------------------------------------------------------------------------------

    def _set_copy(self, model: str, node: _Node, state: int) -> None:
        self.copies.setdefault(model, {})[node.name] = state

    def _drop_copy(self, model: str, node: _Node) -> None:
        copies = self.copies.get(model)
        if copies is not None:
            copies.pop(node.name, None)
            if not copies:
                del self.copies[model]

    # -- loads --------------------------------------------------------------------------------

    def enqueue(self, load: _Load, now: float) -> None:
        node = load.node
        node.loading[load.model] = load
        self.loading.setdefault(load.model, []).append(load)
        self._set_copy(load.model, node, COPY_LOADING)
        if node.running < self.load_slots:
            self.start_load(load, now)
        else:
            node.queue.append(load)

    def start_load(self, load: _Load, now: float) -> None:
        node = load.node
        node.running += 1
        policy = node.policy
        if load.keep and not load.copy:
            # The runtime asks the filter when the load has its slot (ModelCache._place).
            admitted, load.last_used = admission(policy, load.model, load.reserve, now, held=node.reserved)
            if not admitted:
                self.refused += 1
                if not self.keep_refused:
                    load.keep = False
                    node.bypassed += 1
                elif (0 < load.reserve <= node.pool_capacity
                      and policy.total_size + node.reserved + load.reserve > node.capacity):
                    load.pooled = self.pool_fits(load, load.reserve)
                    if not load.pooled and node.pool_used > sum(node.pool.values()):
                        node.pool_waiting.append(load)  # the room is held by a load into it: wait
                        return
        self.begin_load(load, now)

    def begin_load(self, load: _Load, now: float) -> None:
        """The load's bytes reserved (unless it is in the pass-through room already), it runs."""
        if load.keep and not load.pooled:
            if self.fits(load, load.reserve, now):
                load.node.reserved += load.reserve
            else:
                load.keep = False
        self.push(now + load.cost_ms / 1000.0, _LOAD_DONE, load)

    def fits(self, load: _Load, size: int, now: float) -> bool:
        """Make room for ``size`` more bytes of ``load`` on its node (``kernel.make_room``, evicting
        its victims); whether they fit. When they do not, the load passes through (``no_room``)."""
        node = load.node
        policy = node.policy
        if policy.total_size + node.reserved + size <= node.capacity:
            return True
        room = make_room(policy, size, used=policy.total_size + node.reserved, capacity=node.capacity,
                         now=now, protected=self.protection)
        for victim in room.victims:
            if victim in policy:
                policy.remove(victim)
                node.evictions += 1
                self.where[victim].remove(node)
                if not self.where[victim]:
                    del self.where[victim]
                self._drop_copy(victim, node)
        if policy.total_size + node.reserved + size <= node.capacity:
            return True
        node.bypassed += 1
        self.no_room += 1
        return False

    def pool_fits(self, load: _Load, size: int) -> bool:
        """Make room for ``size`` more bytes of ``load`` in its node's pass-through room
        (``kernel.pool_room``, dropping its victims) and count them; whether they fit."""
        node = load.node
        room = pool_room(node.pool, node.pool, size, used=node.pool_used, capacity=node.pool_capacity)
        if not room.enough:
            return False
        for victim in room.victims:
            node.pool_used -= node.pool.pop(victim)
            node.evictions += 1
            self.where[victim].remove(node)
            if not self.where[victim]:
                del self.where[victim]
            self._drop_copy(victim, node)
        node.pool_used += size
        return True

    def wake_pool_waiters(self, node: _Node, now: float) -> None:
        """The loads waiting for ``node``'s pass-through room, in turn: into it where it has room now;
        else the rest wait on while another load into it holds it, or go to the main room when none
        does (as the runtime's, whose waiting loads the end of any load into the room wakes, one that
        moved to the main room included)."""
        while node.pool_waiting:
            waiting = node.pool_waiting[0]
            waiting.pooled = self.pool_fits(waiting, waiting.reserve)
            if not waiting.pooled and node.pool_used > sum(node.pool.values()):
                return
            node.pool_waiting.popleft()
            self.begin_load(waiting, now)

    def finish_load(self, load: _Load, now: float) -> None:
        node, model = load.node, load.model
        into_pool = load.pooled  # its bytes held the room, whether it stays there or not
        node.running -= 1
        del node.loading[model]
        loads = self.loading[model]
        loads.remove(load)
        if not loads:
            del self.loading[model]
        if load.pooled:
            extra = load.size - load.reserve
            if extra > 0 and not self.pool_fits(load, extra):
                # Larger than the room can hold: into the main room as the first to go, as the runtime.
                node.pool_used -= load.reserve
                load.pooled = False
                load.keep = self.fits(load, load.size, now)
            elif extra < 0:
                node.pool_used += extra
        elif load.keep:
            node.reserved -= load.reserve
            # Measured above its prediction: the rest is made room for now, as the runtime's top-up.
            if load.size > load.reserve and not self.fits(load, load.size, now):
                load.keep = False
        if load.pooled:
            node.pool[model] = load.size
            self.pooled += 1
            self.where.setdefault(model, []).append(node)
            self._set_copy(model, node, COPY_LOADED)
        elif load.keep:
            node.policy.insert(model, load.size, now, last_used=load.last_used, cost=load.cost_ms)
            self.where.setdefault(model, []).append(node)
            self._set_copy(model, node, COPY_LOADED)
        else:
            self._drop_copy(model, node)
        if into_pool:  # the loads waiting for the room go on (its waiters are served)
            self.wake_pool_waiters(node, now)
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

    def route(self, model: str) -> tuple[str, int] | None:
        """The copy a request for ``model`` goes to and its state, by the router's rule; ``None``:
        no copy, the request goes to the model's home."""
        copies = self.copies.get(model)
        return choose_copy(copies, self.by_name, _copy_state, self.inflight, self.rng) if copies else None

    def request(self, t: float, model: str, size: int, cost_ms: float, infer_ms: float) -> None:
        chosen = self.route(model)
        if chosen is not None and chosen[1] == COPY_LOADED:
            node = self.by_name[chosen[0]]
            node.requests += 1
            node.hits += 1
            node.bytes_requested += size
            node.cost_requested += cost_ms
            node.policy.touch(model, t)
            if model in node.pool:  # its use moves it in the pass-through room's order
                node.pool[model] = node.pool.pop(model)
            if infer_ms > 0:
                self.hold(node, model)
                self.push(t + infer_ms / 1000.0, _INFER_DONE, (node, model, 1))
        else:
            if chosen is not None:  # a copy loading: join its load (single flight)
                node = self.by_name[chosen[0]]
                load = node.loading[model]
                node.joined += 1
            else:
                node = self.home(model, size)
                load = _Load(node, model, size, cost_ms, size <= node.capacity, copy=False,
                             reserve=self.predicted.get(model))
                node.misses += 1
                node.bytes_missed += size
                node.cost_missed += cost_ms
                if not load.keep:
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
        inflight = self.inflight
        candidates = [Candidate(n.name, n.capacity, float(n.running + len(n.queue) + inflight[n.name]))
                      for n in self.nodes]
        name = choose_home(model, candidates, size, load_factor=self.load_factor)
        if name is None:  # fits nowhere: it goes to its plain home and passes through
            name = rendezvous_order(model, self.names)[0]
        return self.by_name[name]

    # -- copy scaling -------------------------------------------------------------------------

    def held_copies(self, model: str) -> list[_Node]:
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
        holding = self.held_copies(model)
        able = [n.name for n in self.nodes if n.capacity >= size]
        decision = scaling.decide(model, t, len(holding), limit=len(able))
        self.copies_removed += decision.release
        if decision.add <= 0:
            return
        busy = {n.name for n in holding}
        busy.update(ld.node.name for ld in self.loading.get(model, ()))
        added = copy_targets(model, able, decision.add, busy=busy)
        for name in added:
            node = self.by_name[name]
            node.copy_loads += 1
            load = _Load(node, model, size, cost_ms, keep=True, copy=True, reserve=self.predicted.get(model))
            # As the router asks the runtime (mesh.router.replicas): not filtered (kernel.admission),
            # and entering the eviction order hold_s ahead, so that cold misses do not evict it first.
            load.last_used = t + scaling.config.hold_s
            self.enqueue(load, t)
        self.copies_added += len(added)

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
    refused: Refused = "first-to-go",
    seed: int = 0,
    predicted: Mapping[str, int] | None = None,
    passthrough_bytes: int = 0,
) -> ClusterStats:
    """Simulate a router and ``instances`` runtime instances of ``capacity_bytes`` each on ``requests``.

    ``policy`` is a registered policy name (built with ``policy_params`` once per instance) or a
    factory of fresh policy objects. ``scaling`` enables copy scaling with those rules (``None``: one
    copy per model, as with scaling off). ``refused``: what becomes of a model the admission filter
    refuses, ``"first-to-go"`` (the runtime's rule) or ``"pass-through"`` (``replay``'s). ``seed``
    seeds the router's random choices (only used with more than four copies of a model).
    ``predicted``: the bytes a load of each model reserves until it is measured (the runtime's
    prediction; a model not in it reserves its request's size). ``passthrough_bytes``: the part of
    each instance's capacity held back as its pass-through room (the runtime's
    ``runtime.passthrough_bytes``). See the module docstring.
    """
    if instances < 1:
        raise ValueError(f"instances must be >= 1, got {instances}")
    if load_slots < 1:
        raise ValueError(f"load_slots must be >= 1, got {load_slots}")
    if capacity_bytes < 0:
        raise ValueError(f"capacity must be >= 0 bytes, got {capacity_bytes}")
    if not load_factor >= 1.0:
        raise ValueError(f"load_factor must be >= 1, got {load_factor!r}")
    if refused not in ("first-to-go", "pass-through"):
        raise ValueError(f"refused must be 'first-to-go' or 'pass-through', got {refused!r}")
    if not 0 <= passthrough_bytes <= capacity_bytes // 2:
        raise ValueError(f"passthrough_bytes must be 0 to half the capacity, got {passthrough_bytes}")
    main_bytes = capacity_bytes - passthrough_bytes
    if isinstance(policy, str):
        name, params = policy, dict(policy_params or {})

        def factory() -> EvictionPolicy:
            return build_policy(name, main_bytes, params)
    else:
        factory = policy
    nodes = [_Node(i, name, factory(), main_bytes, passthrough_bytes)
             for i, name in enumerate(instance_names(instances))]
    cluster = _Cluster(nodes, load_slots=load_slots, load_factor=load_factor,
                       scaling=ScalingPolicy(scaling) if scaling is not None else None,
                       refused=refused, seed=seed, predicted=predicted)

    sizes: dict[str, tuple[int, float]] = {}  # the last known size and load time, for sweeps
    first = last = math.nan
    next_sweep = math.inf
    for t, model, size, cost_ms, infer_ms in requests:
        if t < last:
            raise out_of_order(t, last)
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
    total = with_waits(replace(sum_stats(list(per_node.values())), start_s=first, end_s=last), waits)
    return ClusterStats(total=total, instances=per_node, no_room=cluster.no_room, refused=cluster.refused,
                        copies_added=cluster.copies_added, copies_removed=cluster.copies_removed,
                        pooled=cluster.pooled)
