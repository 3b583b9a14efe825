"""Runtimes that scale with demand, simulated over a day against fixed fleets (issue 16, part 4).

``python -m loadtest.scenarios.autoscale [--quick] [--trace azure|zipf|both] [--out FILE] [--json]``

Method. A day-long trace (1,440 minutes) is replayed three times, each time against a simulated fleet
of runtime replicas behind one router:

* **autoscaled**: every ``TICK_S`` (10 s, the router's ``autoscale_interval_s``) the signal of
  ``placement.autoscale`` (the router's kernel, same defaults: 10-minute window, fill 0.8, 300 s
  hold) is fed the working set (bytes of the models requested within the window, evicted or not),
  the request rate over the last minute and the ready replicas, and the fleet follows its desired
  count as an HPA would: a new pod is ready ``--pod-start`` seconds (30) after it is asked for; a
  removed one (the highest ordinal, as a StatefulSet removes) first re-homes the models it served
  in the last ``REHOME_RECENT_S`` (300 s, ``runtime.rehome_recent_s``) onto their new homes, keeps
  serving them until those loads are done, then leaves;
* **fixed at the peak**: as many replicas as the autoscaled run's peak, all day;
* **fixed, same budget**: the autoscaled run's mean replica count rounded down (no more
  runtime-hours than the autoscaled fleet), all day.

Each replica is an LRU cache of ``--capacity`` bytes (8 GB: a 16 GiB pod at the base's capacity
fraction 0.5) with 2 load slots (``runtime.max_concurrent_loads``). Routing is the router's: a
loaded copy (a leaving replica's copy serves until its model is re-homed), else a copy loading
(the request joins it), else the model's home by rendezvous hashing over the ready replicas
(``placement.hashing``), which loads it, evicting least recently used models first. A load takes
the model's ``load_ms``; a request that finds no loaded copy waits for the load, queueing for a
slot included. Were the fleet ever at zero replicas, a request would wait for the first pod too.

Traces (``placement.generators``):

* **azure**: ``synthetic_azure_counts`` (heavy-tailed per-function rates, diurnal cycle peaking
  near 14:00, timer functions, Gamma noise), one model per function, replayed with
  ``azure_trace`` (per-minute counts kept exactly). Sizes lognormal (median 50 MB, sigma 1,
  clipped to [1 MB, 2 GB]), ``load_ms = 20 + 2 x MB``.
* **zipf**: Zipf(0.9) popularity over ``n`` models at a diurnal rate (a cosine from a 02:00 trough to
  a 14:00 peak, 8x the trough), Poisson counts per minute, times uniform within the minute; same
  size model. Its active set swings more with the rate than the Azure-like day's, whose many
  always-on functions (timers, heavy hitters) keep a large floor.

Reported per fleet: runtime-hours (the integral of pods that exist: starting, ready or leaving),
peak and mean replicas, loads (all, and those caused by scaling: re-homes, plus reloads of models
a removed replica held without re-homing them), requests that waited for a load or a pod and their
total wait, the hit ratio, and for the autoscaled fleet its scale-ups and -downs and how often the
memory or the load set the need.

Simplifications: one router with an instant view; inference has unlimited concurrency (the load
need is computed and reported, with ``--target-rps`` per replica, but a busy replica does not queue
requests); loads never fail; a re-home load and a demand load share the target's slots; a model
has one copy (no copy scaling).
"""

from __future__ import annotations

import argparse
import heapq
import math
import multiprocessing
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from loadtest.report import add_output_args, emit, machine, machine_line, table
from placement.autoscale import AutoscaleConfig, AutoscaleError, Autoscaler, Demand
from placement.generators import SizeModel, azure_trace, synthetic_azure_counts, zipf_weights
from placement.hashing import rendezvous_order
from placement.traces import MINUTES_PER_DAY

TICK_S = 10.0
REHOME_RECENT_S = 300.0
REHOME_TIMEOUT_S = 20.0  # runtime.rehome_timeout_s: a removed pod leaves by then whatever is left
LOAD_SLOTS = 2
GB = 10**9
DAY_S = MINUTES_PER_DAY * 60.0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- traces --------------------------------------------------------------------------------------

@dataclass
class Trace:
    name: str
    times: list[float]
    models: list[int]
    sizes: list[int]  # by model
    load_s: list[float]  # by model
    description: str

    @property
    def requests(self) -> int:
        return len(self.times)


SIZES = SizeModel.lognormal()


def azure_day(n_functions: int, seed: int = 1, max_per_minute: float = 4.0) -> Trace:
    rows = synthetic_azure_counts(n_functions, seed=seed, max_per_minute=max_per_minute)
    times: list[float] = []
    models: list[int] = []
    sizes: dict[int, int] = {}
    loads: dict[int, float] = {}
    for r in azure_trace(rows, seed=seed, sizes=SIZES):
        m = int(r.model_id)
        times.append(r.time_s)
        models.append(m)
        if m not in sizes:
            sizes[m], loads[m] = r.size_bytes, r.load_ms / 1000.0
    n = len(rows)
    return Trace("azure", times, models, [sizes.get(i, 0) for i in range(n)], [loads.get(i, 0.0) for i in range(n)],
                 f"synthetic Azure Functions day: {n_functions:,} functions (= models), at most "
                 f"{max_per_minute:g}/min each, seed {seed}")


def zipf_day(n_models: int, peak_rps: float, seed: int = 1, alpha: float = 0.9, swing: float = 8.0) -> Trace:
    rng = np.random.default_rng(seed)
    minutes = np.arange(MINUTES_PER_DAY, dtype=np.float64)
    trough = peak_rps / swing
    rate = trough + (peak_rps - trough) * (1 - np.cos(2 * np.pi * (minutes - 120) / MINUTES_PER_DAY)) / 2
    counts = rng.poisson(rate * 60)
    weights = zipf_weights(n_models, alpha)
    permutation = rng.permutation(n_models)  # rank -> model
    total = int(counts.sum())
    ranks = rng.choice(n_models, size=total, p=weights)
    minute_of = np.repeat(minutes, counts)
    times = minute_of * 60.0 + rng.random(total) * 60.0
    order = np.argsort(times, kind="stable")
    size_arr, load_arr = SIZES.draw(n_models, rng)
    return Trace("zipf", times[order].tolist(), permutation[ranks[order]].tolist(), size_arr.tolist(),
                 (load_arr / 1000.0).tolist(),
                 f"Zipf({alpha}) over {n_models:,} models, {trough:.1f} req/s at 02:00 to {peak_rps:.1f} req/s "
                 f"at 14:00 (cosine), seed {seed}")


# --- the simulated fleet ------------------------------------------------------------------------

class Replica:
    __slots__ = ("cache", "leaving", "name", "ordinal", "slots", "used")

    def __init__(self, ordinal: int) -> None:
        self.ordinal = ordinal
        self.name = f"mesh-runtime-{ordinal}"
        self.cache: OrderedDict[int, list[float]] = OrderedDict()  # model -> [size, last_used, ready_at]
        self.used = 0
        self.slots = [0.0] * LOAD_SLOTS  # when each load slot is free
        self.leaving = False


# Event kinds, in the order they are handled at equal times.
_READY, _REHOMED, _REMOVE, _TICK = range(4)


@dataclass
class Result:
    fleet: str
    replicas_fixed: int | None
    runtime_hours: float = 0.0
    peak_replicas: int = 0
    requests: int = 0
    hits: int = 0
    misses: int = 0
    joined: int = 0
    waited: int = 0
    wait_s: float = 0.0
    loads: int = 0
    scaling_loads: int = 0
    rehome_loads: int = 0
    lost_reloads: int = 0
    evictions: int = 0
    scale_ups: int = 0
    scale_downs: int = 0
    bound_ticks: dict[str, int] = field(default_factory=dict)
    peak_working_set_gb: float = 0.0
    peak_load_replicas: int = 0

    def as_dict(self) -> dict[str, Any]:
        out = dict(vars(self))
        out["hit_ratio"] = self.hits / self.requests if self.requests else 0.0
        out["mean_replicas"] = self.runtime_hours / 24.0
        out["mean_wait_ms"] = 1000 * self.wait_s / self.waited if self.waited else 0.0
        return out


class Fleet:
    def __init__(self, trace: Trace, *, capacity: int, fixed: int | None, config: AutoscaleConfig,
                 pod_start_s: float, name: str) -> None:
        self.trace = trace
        self.capacity = capacity
        self.fixed = fixed
        self.pod_start_s = pod_start_s
        self.kernel = Autoscaler(config)
        self.window_s = config.window_s
        self.result = Result(name, fixed)
        self.replicas: dict[int, Replica] = {}  # by ordinal: starting, ready and leaving pods
        self.ready: list[str] = []
        self.by_name: dict[str, Replica] = {}
        self.starting: set[int] = set()
        self.where: dict[int, Replica] = {}  # model -> the replica with its copy (loaded or loading)
        self.lost: set[int] = set()  # models a removed replica dropped without re-homing
        self.events: list[tuple[float, int, int, Any]] = []
        self.seq = 0
        self.alive_since = 0.0  # for the runtime-hours integral
        self.recent: OrderedDict[int, float] = OrderedDict()  # model -> last use (the signal's window)
        self.working_set = 0
        self.tick_counts = [0] * 6  # requests in each of the last six ticks (one minute)
        self._homes: dict[int, str] = {}
        if fixed is not None:
            for _ in range(fixed):
                self._add_pod(0.0, ready_now=True)
        else:
            # The day starts warm: as many ready pods as the first window's models need, as after a
            # night of autoscaling (starting from one would bury it under a cold start's loads).
            for _ in range(self._first_need(config)):
                self._add_pod(0.0, ready_now=True)
            self._push(0.0, _TICK, None)

    def _first_need(self, config: AutoscaleConfig) -> int:
        first: set[int] = set()
        for t, model in zip(self.trace.times, self.trace.models, strict=True):
            if t >= config.window_s:
                break
            first.add(model)
        working_set = sum(self.trace.sizes[m] for m in first)
        return max(1, math.ceil(working_set / (self.capacity * config.target_fill)))

    # events
    def _push(self, when: float, kind: int, payload: Any) -> None:
        self.seq += 1
        heapq.heappush(self.events, (when, kind, self.seq, payload))

    def _count_pods(self, now: float) -> None:
        """Close the runtime-hours integral up to ``now`` (call before the pod count changes)."""
        self.result.runtime_hours += len(self.replicas) * (now - self.alive_since) / 3600.0
        self.alive_since = now

    def _add_pod(self, now: float, ready_now: bool = False) -> None:
        self._count_pods(now)
        ordinal = next(i for i in range(len(self.replicas) + 1) if i not in self.replicas)
        replica = self.replicas[ordinal] = Replica(ordinal)
        self.by_name[replica.name] = replica
        if ready_now:
            self._ready(replica)
        else:
            self.starting.add(ordinal)
            self._push(now + self.pod_start_s, _READY, ordinal)
        self.result.peak_replicas = max(self.result.peak_replicas, len(self.replicas))

    def _ready(self, replica: Replica) -> None:
        self.starting.discard(replica.ordinal)
        self.ready.append(replica.name)
        self._homes.clear()

    def _home(self, model: int) -> Replica:
        name = self._homes.get(model)
        if name is None:
            name = self._homes[model] = rendezvous_order(str(model), self.ready)[0]
        return self.by_name[name]

    def _load(self, replica: Replica, model: int, now: float) -> float:
        """Start loading ``model`` on ``replica`` (room made now, LRU first); when it is loaded."""
        size = self.trace.sizes[model]
        cache = replica.cache
        if replica.used + size > self.capacity:
            for victim in list(cache):
                if replica.used + size <= self.capacity:
                    break
                entry = cache[victim]
                if entry[2] > now:
                    continue  # loading: never a victim
                del cache[victim]
                replica.used -= int(entry[0])
                self.result.evictions += 1
                if self.where.get(victim) is replica:
                    del self.where[victim]
        slot = min(range(LOAD_SLOTS), key=replica.slots.__getitem__)
        done = max(now, replica.slots[slot]) + self.trace.load_s[model]
        replica.slots[slot] = done
        cache[model] = [size, now, done]
        replica.used += size
        self.result.loads += 1
        return done

    def _scale(self, now: float) -> None:
        """One signal tick: feed the kernel, move the fleet towards its desired count."""
        since = now - self.window_s
        recent = self.recent
        while recent:
            model, last = next(iter(recent.items()))
            if last >= since:
                break
            del recent[model]
            self.working_set -= self.trace.sizes[model]
        rps = sum(self.tick_counts) / (TICK_S * len(self.tick_counts))
        self.tick_counts = [*self.tick_counts[1:], 0]
        signal = self.kernel.decide(Demand("", len(self.ready), self.capacity, working_set_bytes=self.working_set,
                                           request_rps=rps, models=len(recent)), now)
        r = self.result
        r.bound_ticks[signal.bound] = r.bound_ticks.get(signal.bound, 0) + 1
        r.peak_working_set_gb = max(r.peak_working_set_gb, self.working_set / GB)
        r.peak_load_replicas = max(r.peak_load_replicas, signal.load_replicas)
        asked = len(self.ready) + len(self.starting)  # the StatefulSet's replicas, as the HPA sets them
        if signal.desired > asked:
            r.scale_ups += 1
            for _ in range(signal.desired - asked):
                self._add_pod(now)
        elif signal.desired < asked:
            r.scale_downs += 1
            for _ in range(asked - signal.desired):
                self._remove_one(now)
        self._push(now + TICK_S, _TICK, None)

    def _remove_one(self, now: float) -> None:
        """The highest ordinal goes (a StatefulSet's order): re-home its recent models, then leave."""
        ordinal = max(o for o, rep in self.replicas.items() if not rep.leaving)
        replica = self.replicas[ordinal]
        replica.leaving = True
        if ordinal in self.starting:  # not ready yet: nothing to re-home
            self.starting.discard(ordinal)
            self._push(now, _REMOVE, ordinal)
            return
        self.ready.remove(replica.name)
        self._homes.clear()
        last_done = now
        for model, entry in reversed(replica.cache.items()):
            if entry[1] < now - REHOME_RECENT_S:
                break  # LRU order: the rest is older
            if entry[2] > now or self.where.get(model) is not replica:
                continue
            target = self._home(model)
            done = self._load(target, model, now)
            self.result.rehome_loads += 1
            self.result.scaling_loads += 1
            self._push(done, _REHOMED, (model, target.ordinal))
            last_done = max(last_done, done)
        self._push(min(last_done, now + REHOME_TIMEOUT_S), _REMOVE, ordinal)

    def _handle(self, when: float, kind: int, payload: Any) -> None:
        if kind == _TICK:
            self._scale(when)
        elif kind == _READY:
            replica = self.replicas.get(payload)
            if replica is not None and not replica.leaving:
                self._ready(replica)
        elif kind == _REHOMED:
            model, ordinal = payload
            target = self.replicas.get(ordinal)
            if target is not None and model in target.cache:
                self.where[model] = target
        elif kind == _REMOVE:
            self._count_pods(when)
            replica = self.replicas.pop(payload)
            del self.by_name[replica.name]
            for model in replica.cache:
                if self.where.get(model) is replica:
                    del self.where[model]
                    self.lost.add(model)

    def run(self) -> Result:
        r = self.result
        events = self.events
        sizes = self.trace.sizes
        recent = self.recent
        hits = misses = joined = waited = 0
        wait_s = 0.0
        for t, model in zip(self.trace.times, self.trace.models, strict=True):
            while events and events[0][0] <= t:
                when, kind, _, payload = heapq.heappop(events)
                self._handle(when, kind, payload)
            self.tick_counts[-1] += 1
            if model in recent:
                recent.move_to_end(model)
            else:
                self.working_set += sizes[model]
            recent[model] = t
            replica = self.where.get(model)
            if replica is not None:
                entry = replica.cache[model]
                entry[1] = t
                replica.cache.move_to_end(model)
                if entry[2] <= t:
                    hits += 1
                    continue
                joined += 1
                waited += 1
                wait_s += entry[2] - t
                continue
            misses += 1
            start = t
            if not self.ready:  # at zero: wait for the first pod (or ask for one)
                if not self.starting:
                    self._add_pod(t)
                while not self.ready:
                    when, kind, _, payload = heapq.heappop(events)
                    self._handle(when, kind, payload)
                    start = max(start, when)
            if model in self.lost:
                self.lost.discard(model)
                r.lost_reloads += 1
                r.scaling_loads += 1
            target = self._home(model)
            done = self._load(target, model, start)
            self.where[model] = target
            waited += 1
            wait_s += done - t
        end = max(DAY_S, self.trace.times[-1] if self.trace.times else 0.0)
        while events and events[0][0] <= end:
            when, kind, _, payload = heapq.heappop(events)
            if kind != _TICK:
                self._handle(when, kind, payload)
        self._count_pods(end)
        r.requests, r.hits, r.misses, r.joined = len(self.trace.times), hits, misses, joined
        r.waited, r.wait_s = waited, wait_s
        return r


# --- the runs -----------------------------------------------------------------------------------

_TRACES: dict[str, Trace] = {}  # built in the parent, read by forked workers


def _run(job: tuple[str, str, int | None, int, float, dict[str, Any]]) -> dict[str, Any]:
    trace_name, fleet, fixed, capacity, pod_start_s, config = job
    started = time.process_time()
    result = Fleet(_TRACES[trace_name], capacity=capacity, fixed=fixed, config=AutoscaleConfig(**config),
                   pod_start_s=pod_start_s, name=fleet).run().as_dict()
    result["cpu_s"] = round(time.process_time() - started, 1)
    result["trace"] = trace_name
    return result


def _map(jobs: int, work: list[tuple[str, str, int | None, int, float, dict[str, Any]]]) -> list[dict[str, Any]]:
    if jobs > 1 and len(work) > 1:
        with multiprocessing.get_context("fork").Pool(min(jobs, len(work))) as pool:
            return pool.map(_run, work)
    return [_run(job) for job in work]


def run_trace(trace: Trace, *, capacity: int, pod_start_s: float, config: dict[str, Any], holds: list[float],
              jobs: int) -> list[dict[str, Any]]:
    """The autoscaled fleet once per hold (the first is the reference), then the two fixed fleets."""
    _TRACES[trace.name] = trace
    autos = _map(jobs, [(trace.name, "autoscaled" if i == 0 else f"autoscaled, hold {hold:g} s", None, capacity,
                         pod_start_s, {**config, "hold_s": hold}) for i, hold in enumerate(holds)])
    peak = autos[0]["peak_replicas"]
    budget = max(1, math.floor(autos[0]["mean_replicas"]))  # costs no more than the autoscaled fleet
    fixed = _map(jobs, [(trace.name, f"fixed at peak ({peak})", peak, capacity, pod_start_s, config),
                        (trace.name, f"fixed, same budget ({budget})", budget, capacity, pod_start_s, config)])
    return [*autos, *fixed]


def render(result: dict[str, Any]) -> str:
    parts = [f"# Runtimes that scale with demand: a simulated day ({result['mode']})\n",
             machine_line(result["machine"]) + "\n",
             f"Replica capacity {result['capacity_gb']:g} GB, pod start {result['pod_start_s']:g} s, signal every "
             f"{TICK_S:g} s: window {result['config']['window_s']:g} s, fill {result['config']['target_fill']:g}, "
             f"{result['config']['target_rps']:g} req/s per replica, hold {result['config']['hold_s']:g} s.\n"]
    for trace in result["traces"]:
        parts.append(f"## {trace['name']}: {trace['description']}; {trace['requests']:,} requests\n")
        rows = []
        for r in trace["fleets"]:
            bound = r["bound_ticks"]
            ticks = sum(bound.values())
            rows.append([r["fleet"], f"{r['runtime_hours']:.1f}", f"{r['mean_replicas']:.2f}", r["peak_replicas"],
                         f"{r['loads']:,}", f"{r['scaling_loads']:,} ({r['rehome_loads']:,} + {r['lost_reloads']:,})",
                         f"{r['waited']:,}", f"{r['wait_s']:,.0f}", f"{r['hit_ratio']:.4f}",
                         f"{r['scale_ups']}/{r['scale_downs']}" if ticks else "-",
                         f"{bound.get('memory', 0) / ticks:.0%}/{bound.get('load', 0) / ticks:.0%}" if ticks else "-"])
        parts.append(table(["fleet", "runtime-hours", "mean replicas", "peak replicas", "loads",
                            "loads by scaling (re-home + dropped)", "requests that waited", "total wait s",
                            "hit ratio", "ups/downs", "memory/load-bound ticks"], rows) + "\n")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.scenarios.autoscale", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small traces (seconds): for tests")
    parser.add_argument("--trace", choices=("azure", "zipf", "both"), default="both")
    parser.add_argument("--capacity", type=float, default=8.0, help="model capacity per replica, GB (default 8)")
    parser.add_argument("--pod-start", type=float, default=30.0, help="seconds from asking for a pod to ready")
    parser.add_argument("--target-rps", type=float, default=500.0, help="req/s one replica serves comfortably")
    parser.add_argument("--hold", default="300,900",
                        help="the signal's scale-down hold, s; several (comma-separated) give one autoscaled fleet "
                             "each, the first being the one the fixed fleets are sized from (default 300,900)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes for the fixed fleets (default 2)")
    add_output_args(parser)
    args = parser.parse_args(argv)
    capacity = int(args.capacity * GB)
    try:
        holds = [float(h) for h in args.hold.split(",")]
    except ValueError:
        parser.error(f"--hold: not a list of seconds: {args.hold!r}")
    defaults = AutoscaleConfig()  # the router's defaults, but for the rps target given and no low maximum
    config = {"window_s": defaults.window_s, "target_fill": defaults.target_fill, "target_rps": args.target_rps,
              "hold_s": holds[0], "min_replicas": defaults.min_replicas, "max_replicas": 64}
    for hold in holds:  # a bad option fails here, before the traces are built
        try:
            AutoscaleConfig(**{**config, "hold_s": hold})
        except AutoscaleError as exc:
            parser.error(str(exc))
    wall = time.perf_counter()
    builders = {"azure": lambda: azure_day(700 if args.quick else 4000),
                "zipf": lambda: zipf_day(600 if args.quick else 3_000, 4.0 if args.quick else 20.0)}
    traces = []
    for name in (("azure", "zipf") if args.trace == "both" else (args.trace,)):
        started = time.perf_counter()
        trace = builders[name]()
        log(f"{name}: {trace.requests:,} requests built in {time.perf_counter() - started:.1f} s")
        fleets = run_trace(trace, capacity=capacity, pod_start_s=args.pod_start, config=config, holds=holds,
                           jobs=args.jobs)
        for r in fleets:
            log(f"  {r['fleet']}: {r['runtime_hours']:.1f} runtime-hours, {r['loads']:,} loads, "
                f"hit ratio {r['hit_ratio']:.4f} ({r['cpu_s']} s CPU)")
        traces.append({"name": name, "description": trace.description, "requests": trace.requests,
                       "fleets": fleets})
    result = {"machine": machine(), "mode": "quick" if args.quick else "default", "capacity_gb": args.capacity,
              "pod_start_s": args.pod_start, "config": config, "traces": traces,
              "seconds": round(time.perf_counter() - wall, 1)}
    emit(args, result, render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
