"""The peers' fit mode: room for K of the models only, so every system loads and evicts while measured.

``K = max(1, round(F x models))``. Ray Serve's multiplexing counts models: one replica holds an LRU of
``max_num_models_per_replica = K``. MLServer cannot evict and is not given a share (it holds all).

Our mesh counts bytes, so K models of room has to be turned into a capacity, and by measurement:
the runtimes charge a loaded model its *measured* size ``s`` (the larger of the loader's accounting
and the process's memory growth during the load) and, while it loads, its *predicted* size ``P``
(its file's size x the ratio learned for its type, issue 18; before, at least
``runtime.default_model_size_bytes``, 64 KiB, several times what these sklearn models measure).
``loadtest.scenarios.many_models.calibrate`` measures both on a cluster of its own (24 loads, one
at a time, sizes read from the placement records, ``s`` the mean without the largest eighth). A
load first makes room for ``P`` (evicting until ``used + P <= C``), then its reservation shrinks to
``s``; so between loads a runtime holds ``n`` models with
``(n - 1) x s <= C - P``, that is ``n = floor((C - P) / s) + 1``. Each runtime therefore gets

    C = P + (K - 1) / 2 x s

which makes ``n = floor((K - 1) / 2) + 1``: the two runtimes together hold K models between loads
(K + 1 when K is odd; one fewer on a runtime while it loads). Sizes differ from model to model
(about 4 to 33 KB here), so what is held is "about K", not exactly K. And every model must fit a
runtime at all: since the prediction has no 64 KiB floor (issue 18), ``P`` is a few KB and for a
small K the formula gave less room than the largest of these models measures (17 KB against 33 KB
for K = 5), which is not a cache that holds "about K" but one that refuses some models outright.
So C is at least the largest calibrated size (plus the rounding of a top-up, one page):

    C = max(P + (K - 1) / 2 x s, largest size + 4 KiB) For a small K, C < 2 P: a
runtime's second concurrent load waits for the first one's reservation to shrink, so loads run one
at a time per runtime, as Ray's do per replica (its model-cache lock). ``calibrate``'s own capacity
(``many_models``: ``fit x N / R x s + load slots x P``) is not used: it guarantees the share while
every load slot is busy, and between loads leaves room for ``P / s`` (6 to 11 here) more models
per runtime, which for a small K is more than K itself.

Counters, read just before and just after each measured part (never across a warm-up):
our mesh's runtimes' Prometheus metrics (``modelmesh_loadmodel_milliseconds_count`` for loads,
``mesh_cache_requests_total`` for hits and misses, ``mesh_evictions_total{reason="capacity"}``; the
URLs are those the runtimes log at start-up, ``mesh up`` giving them free ports); Ray's loader's
lines in its loads file (``ray_app``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from loadtest.peers._proc import wait_until
from loadtest.peers.drive import Target

RUNTIMES = 2  # `mesh up --runtimes 2`, as in the default mode


def k_models(fit: float, models: int) -> int:
    """The models that fit: Ray's ``max_num_models_per_replica``, our mesh's share."""
    return max(1, round(fit * models))


@dataclass(frozen=True)
class MeshRoom:
    """Our mesh's capacity per runtime for K models, and the measurement it comes from."""

    k: int
    capacity_bytes: int  # per runtime
    size_bytes: int  # s: the calibrated (trimmed mean) measured size of one model
    predicted_bytes: int  # P: what a runtime reserves for a model while it loads
    sizes: list[int]  # the calibration loads' measured sizes
    # Of capacity_bytes, a pass-through room (runtime.passthrough_bytes) that peers --passthrough
    # auto gives the runtimes: ``passthrough_room``.
    passthrough_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"capacity_bytes_per_runtime": self.capacity_bytes, "runtimes": RUNTIMES,
                "size_bytes": self.size_bytes, "predicted_bytes": self.predicted_bytes,
                "calibration_sizes": self.sizes,
                "formula": "max(P + (K - 1) / 2 x s, largest size + 4 KiB) per runtime",
                "method": "loadtest.scenarios.many_models.calibrate: 24 loads on a private runtime, "
                          "s = trimmed mean of their measured sizes, P = the runtime's predicted size"}


def room_for(k: int, size_bytes: int, predicted_bytes: int, largest_bytes: int = 0) -> int:
    """Capacity per runtime so that the runtimes hold about ``k`` models between loads, and at
    least room for the largest model (module docstring)."""
    return max(predicted_bytes + round((k - 1) / 2 * size_bytes), largest_bytes + 4096 if largest_bytes else 0)


def measure_room(models: Sequence[tuple[Target, Path]], k: int) -> MeshRoom:
    """Calibrate on the benchmark's own model files (a private cluster, stopped before returning)."""
    from loadtest.models import TrainedModel
    from loadtest.scenarios.many_models import Settings, calibrate

    files = [TrainedModel(t.model_id, f, t.sample.shape[1], t.sample) for t, f in models]
    # The Settings only size calibrate's own capacity, which is not used (module docstring).
    cal = calibrate(Settings(models=len(models), runtimes=RUNTIMES, fit=k / len(models)), files)
    largest = max(cal.sizes, default=0)
    capacity = room_for(k, cal.size_bytes, cal.predicted_bytes, largest)
    return MeshRoom(k=k, capacity_bytes=capacity, size_bytes=cal.size_bytes, predicted_bytes=cal.predicted_bytes,
                    sizes=list(cal.sizes), passthrough_bytes=passthrough_room(capacity, largest, cal.predicted_bytes))


def passthrough_room(capacity: int, largest: int, predicted: int) -> int:
    """A pass-through room out of ``capacity``: room for the largest model (+ 4 KiB), but never so
    much that the main room cannot hold the largest model itself (it would refuse it), and none
    when what is left is less than a typical model's prediction (it would hold nothing)."""
    room = min(largest + 4096, capacity - (largest + 4096), capacity // 2)
    return room if room >= predicted else 0


# -- counters ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Reading:
    """Cumulative counts at one moment; None where the system does not give the figure."""

    loads: float
    hits: float | None = None
    misses: float | None = None
    evictions: float | None = None
    # Our mesh's misses by reason (cold, evicted, routed_elsewhere, load_failed), the refusals of its
    # admission filter and the copies its router added: what tells its hit ratio from the simulator's.
    detail: tuple[tuple[str, float], ...] = ()


class Counter(Protocol):
    async def read(self) -> Reading: ...


class RayCounter:
    def __init__(self, peer: Any) -> None:  # ray_app.RayPeer
        self._peer = peer

    async def read(self) -> Reading:
        return Reading(loads=float(self._peer.loads()))


class MeshCounter:
    """The runtimes' (and router's) /metrics of one ``mesh up``, found from its logs."""

    def __init__(self, up_log: Path, *, timeout_s: float = 20.0) -> None:
        self.runtime_urls: list[str] = []
        self.router_url = ""
        wait_until(lambda: self._find(up_log), timeout_s=timeout_s, what="mesh metrics URLs")

    def _find(self, up_log: Path) -> bool:
        workdir = logs_dir(up_log)
        if workdir is None:
            return False
        runtimes = sorted(workdir.glob("runtime-*.log"))
        urls = [_metrics_url(p) for p in runtimes]
        router = _metrics_url(workdir / "router.log")
        if len(runtimes) != RUNTIMES or not all(urls) or not router:
            return False
        self.runtime_urls, self.router_url = [u for u in urls if u], router
        return True

    async def read(self) -> Reading:
        from loadtest.scenarios.many_models import snapshot

        snap = await snapshot(self.runtime_urls, self.router_url)
        detail = (*((f"miss_{reason}", value) for reason, value in snap.misses.items()),
                  ("refused", snap.refused), ("passed_through", snap.passed_through),
                  ("copies_added", snap.copies_added))
        return Reading(loads=snap.loads, hits=snap.cache.hits, misses=snap.cache.misses,
                       evictions=snap.evictions, detail=detail)


def logs_dir(up_log: Path) -> Path | None:
    """The folder of the processes' logs that ``mesh up`` announced on its first line (``logs: DIR
    (kept after exit; ...)``, ``mesh.embedded.up``), None until it has."""
    text = up_log.read_text(errors="replace")
    match = re.search(r"^logs: (?!removed )(.+?)(?: \(kept after exit[^)]*\))?$", text, re.MULTILINE)
    return Path(match.group(1).strip()) if match else None


def _metrics_url(log_path: Path) -> str | None:
    """The URL of the first ``metrics serving`` event a server logged (JSON lines), if any."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return None
    for line in lines:
        if '"metrics serving"' not in line:
            continue
        try:
            return str(json.loads(line)["url"])
        except (ValueError, KeyError, TypeError):
            continue
    return None


class Marks:
    """Readings taken at the start and end of each measured part, and what they add up to."""

    def __init__(self, counter: Counter | None) -> None:
        self._counter = counter
        self.readings: list[Reading] = []

    async def mark(self) -> None:
        if self._counter is not None:
            self.readings.append(await self._counter.read())

    def summary(self, phases: Sequence[str] = ("open", "closed")) -> dict[str, Any]:
        """Loads per measured part and in all; hits, misses and hit ratio where counted."""
        if self._counter is None:
            return {"loads": None, "hits": None, "misses": None, "hit_ratio": None}
        pairs = list(zip(self.readings[0::2], self.readings[1::2], strict=True))
        assert len(pairs) == len(phases), (len(pairs), phases)

        def total(field: str) -> float | None:
            """The field's growth summed over the measured parts; None if not counted."""
            grown = 0.0
            for a, b in pairs:
                start, end = getattr(a, field), getattr(b, field)
                if start is None or end is None:
                    return None
                grown += end - start
            return grown

        loads = {p: int(b.loads - a.loads) for p, (a, b) in zip(phases, pairs, strict=True)}
        hits, misses, evictions = total("hits"), total("misses"), total("evictions")
        out: dict[str, Any] = {"loads": sum(loads.values()), "loads_by_phase": loads,
                               "hits": None if hits is None else int(hits),
                               "misses": None if misses is None else int(misses),
                               "hit_ratio": None}
        if hits is not None and misses is not None and hits + misses > 0:
            out["hit_ratio"] = round(hits / (hits + misses), 4)
        if evictions is not None:
            out["evictions"] = int(evictions)
        detail: dict[str, int] = {}
        for a, b in pairs:
            before = dict(a.detail)
            for key, value in b.detail:
                detail[key] = detail.get(key, 0) + int(value - before.get(key, 0))
        if detail:
            out["detail"] = detail
        return out


# -- the simulator on the same requests ---------------------------------------------------------
#
# Issue 18's target: our hit ratio within 5 points of the simulator's prediction for the default
# policy at that capacity. The mesh run's request sequence is recorded as the driver draws it (the
# time each request is sent and its model), the measured parts are delimited by the counters' marks,
# and each model's size and load time are those its runtime logged when it loaded it ("model
# loaded": the measured size, the time the load held its slot, the size predicted before it; the
# median over its loads, the mean for the time). The cluster simulator (placement.cluster, deciding
# with placement.kernel as the router and the runtimes do) is fed the whole sequence, warm-ups
# included, so that its cache is in the state ours was when each measured part began; its hits and
# misses are counted inside the measured parts only, the way our counters are read: the counts of
# the sequence up to a mark's request, subtracted (a request's outcome is decided when it arrives,
# and depends only on the requests before it).


class RecordedOrder:
    """``order``, recording ``(clock(), index)`` each time the driver draws the next model: the send
    time of each request (``loadtest.peers.drive`` draws just before it sends). The driver cycles
    through ``order``; only its first pass is recorded (200,000 draws, more than any phase sends)."""

    def __init__(self, order: Sequence[int], sent: list[tuple[float, int]], clock: Any) -> None:
        self._order = order
        self._sent = sent
        self._clock = clock

    def __len__(self) -> int:
        return len(self._order)

    def __iter__(self) -> Any:
        sent, clock = self._sent, self._clock
        for index in self._order:
            sent.append((clock(), index))
            yield index


class Recorder:
    """The requests of one mesh run, and the times of the counters' marks, on one clock."""

    def __init__(self) -> None:
        import time

        self.clock = time.perf_counter
        self.sent: list[tuple[float, int]] = []
        self.marks: list[float] = []

    def order(self, order: Sequence[int]) -> RecordedOrder:
        return RecordedOrder(order, self.sent, self.clock)

    def mark(self) -> None:
        self.marks.append(self.clock())


def logged_loads(up_log: Path) -> dict[str, list[tuple[int, float, int]]]:
    """``(measured size, load ms, predicted size)`` of every load each runtime of a ``mesh up``
    logged, per model."""
    workdir = logs_dir(up_log)
    if workdir is None:
        return {}
    loads: dict[str, list[tuple[int, float, int]]] = {}
    for path in sorted(workdir.glob("runtime-*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if '"model loaded"' not in line:
                continue
            try:
                event = json.loads(line)
                # slot_ms: the time the load held its load slot, all of it (the runtime's load_ms
                # is the loader's part only), which is what a load costs in the simulator.
                loads.setdefault(str(event["model_id"]), []).append(
                    (int(event["size_bytes"]), float(event.get("slot_ms", event["load_ms"])),
                     int(event.get("predicted_bytes", event["size_bytes"]))))
            except (ValueError, KeyError, TypeError):
                continue
    return loads


def logged_warnings(up_log: Path, limit: int = 12) -> dict[str, int]:
    """The warnings and errors the router and runtimes of a ``mesh up`` logged, counted by process,
    event and the start of their message: why requests failed, when any did."""
    workdir = logs_dir(up_log)
    if workdir is None:
        return {}
    counts: dict[str, int] = {}
    for path in sorted(workdir.glob("*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if '"level": "warning"' not in line and '"level": "error"' not in line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue
            detail = str(event.get("error") or event.get("reason") or event.get("message") or "")[:100]
            key = f"{path.stem}: {event.get('event')}" + (f": {detail}" if detail else "")
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:limit])


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def simulate_run(recorder: Recorder, model_ids: Sequence[str], loads: dict[str, list[tuple[int, float, int]]], *,
                 capacity_bytes: int, infer_ms: Sequence[float], measured: dict[str, Any],
                 passthrough_bytes: int = 0) -> dict[str, Any]:
    """The cluster simulator on the recorded requests, against the mesh's measured counts.

    ``infer_ms``: the time a request stays in flight in each part between marks (the run's p50
    latency of that part: hits dominate it), which the router's load figures and copy scaling see.
    ``measured``: the mesh's ``Marks.summary()``. Instances, capacity, policy, load slots, the
    bounded-load factor and copy scaling are the mesh's (``mesh.settings`` defaults, the run's
    capacity); see the block comment above for the method.
    """
    from mesh.settings import load_settings
    from placement.cluster import simulate_cluster
    from placement.request import Request
    from placement.scaling import ScalingConfig

    # The settings the run's mesh had: the defaults, and MESH_* variables inherited from this process
    # (mesh up passes its environment on), e.g. MESH_RUNTIME_MAX_CONCURRENT_LOADS=1.
    settings = load_settings()
    rs, run = settings.router, settings.runtime
    if not recorder.sent or len(recorder.marks) % 2:
        raise RuntimeError(f"nothing to simulate: {len(recorder.sent)} requests, {len(recorder.marks)} marks")
    all_loads = [x for per in loads.values() for x in per]
    if not all_loads:
        raise RuntimeError("the runtimes logged no load: no size or load time to simulate with")
    default_size = int(_median([s for s, _, _ in all_loads]))
    # A load's time is its mean, not its median: how often a request finds its model loading (and
    # joins the load rather than starting one) grows with the loads' total time, which the few
    # slow loads of a busy machine dominate.
    default_ms = sum(ms for _, ms, _ in all_loads) / len(all_loads)
    facts = {m: (int(_median([s for s, _, _ in per])), sum(ms for _, ms, _ in per) / len(per))
             for m, per in loads.items()}
    # What a load reserves until it is measured: the runtime's prediction (issue 18 part 2).
    predicted = {m: int(_median([p for _, _, p in per])) for m, per in loads.items()}
    start = recorder.sent[0][0]
    marks = recorder.marks
    trace: list[Request] = []
    cut: list[int] = []  # the number of requests sent before each mark
    part = 0
    for when, index in recorder.sent:
        while part < len(marks) and when >= marks[part]:
            cut.append(len(trace))
            part += 1
        model = model_ids[index]
        size, load_ms = facts.get(model, (default_size, default_ms))
        trace.append(Request(when - start, model, size, load_ms, infer_ms[min(part, len(infer_ms) - 1)]))
    cut.extend([len(trace)] * (len(marks) - len(cut)))
    scaling = ScalingConfig(rps_threshold=rs.scale_rps_threshold, queue_threshold=rs.scale_queue_threshold,
                            max_copies=rs.scale_max_copies, hold_s=rs.scale_hold_s)

    def upto(n: int) -> Any:
        return simulate_cluster(trace[:n], instances=RUNTIMES, capacity_bytes=capacity_bytes,
                                policy=run.eviction_policy, load_factor=rs.load_factor,
                                scaling=scaling, load_slots=run.max_concurrent_loads, predicted=predicted,
                                passthrough_bytes=passthrough_bytes)

    dump = os.environ.get("MESH_PEERS_FIT_TRACE")
    if dump:  # for a look at the simulation afterwards: the trace (mesh sim's CSV) and the rest of it
        from placement.traces import write_trace

        write_trace(dump, trace)
        Path(dump + ".json").write_text(json.dumps({
            "cuts": cut, "predicted": predicted, "capacity_bytes": capacity_bytes, "loads": loads,
            "policy": run.eviction_policy, "load_factor": rs.load_factor,
            "load_slots": run.max_concurrent_loads, "passthrough_bytes": passthrough_bytes}))
    hits = misses = joined = loads_total = evictions = refused = copies_added = bypassed = no_room = pooled = 0
    for a, b in zip(cut[0::2], cut[1::2], strict=True):
        before, after = upto(a), upto(b)
        hits += after.total.hits - before.total.hits
        misses += after.total.misses - before.total.misses
        joined += after.total.joined - before.total.joined
        loads_total += after.total.loads - before.total.loads
        evictions += after.total.evictions - before.total.evictions
        refused += after.refused - before.refused
        pooled += after.pooled - before.pooled
        copies_added += after.copies_added - before.copies_added
        bypassed += after.total.bypassed - before.total.bypassed
        no_room += after.no_room - before.no_room
    requests = sum(b - a for a, b in zip(cut[0::2], cut[1::2], strict=True))
    # Our runtimes count every request that finds its model not loaded as a miss, including one
    # that joins a load in progress (and a request sent on to another instance counts at both), so
    # the simulator's ratio in those terms counts its joined requests as misses.
    sim_ratio = hits / (hits + misses + joined) if hits + misses + joined else None
    ours = measured.get("hit_ratio")
    sim: dict[str, Any] = {
        "policy": run.eviction_policy, "instances": RUNTIMES, "capacity_bytes_per_runtime": capacity_bytes,
        "load_slots": run.max_concurrent_loads, "load_factor": rs.load_factor,
        "requests_recorded": len(trace), "requests_measured": requests,
        "models_loaded": len(facts), "size_bytes_median": default_size, "load_ms_mean": round(default_ms, 2),
        "load_ms_median": round(_median([ms for _, ms, _ in all_loads]), 2),
        "infer_ms": [round(x, 3) for x in infer_ms],
        "hits": hits, "misses": misses, "joined": joined, "loads": loads_total,
        "evictions": evictions, "refused": refused, "pooled": pooled, "copies_added": copies_added,
        "passed_through": bypassed, "no_room": no_room, "passthrough_bytes": passthrough_bytes,
        "hit_ratio": None if sim_ratio is None else round(sim_ratio, 4),
        "loads_per_request": round(loads_total / requests, 4) if requests else None,
    }
    mesh_requests = (measured.get("hits") or 0) + (measured.get("misses") or 0)
    # A request the router sent to a copy evicted meanwhile (its view is milliseconds late) is
    # counted at both runtimes: "routed_elsewhere" at the first, then a hit or a miss at the next.
    # Counted once, as the runtime that served it answered, it is what the simulator's figure is
    # (the simulator's router sees the cluster at once, so it never sends a request astray).
    twice = measured.get("detail", {}).get("miss_routed_elsewhere", 0)
    once = mesh_requests - twice
    per_request = round(measured["hits"] / once, 4) if once and measured.get("hits") is not None else None
    sim["mesh"] = {"hit_ratio": ours, "hit_ratio_per_request": per_request, "loads": measured.get("loads"),
                   "loads_per_request_counted": round(measured["loads"] / requests, 4)
                   if requests and measured.get("loads") is not None else None,
                   "hits_plus_misses": mesh_requests, "evictions": measured.get("evictions"),
                   **measured.get("detail", {})}
    sim["difference_points"] = (round(100 * (per_request - sim_ratio), 2)
                                if per_request is not None and sim_ratio is not None else None)
    sim["difference_points_counted"] = (round(100 * (ours - sim_ratio), 2)
                                        if ours is not None and sim_ratio is not None else None)
    return sim
