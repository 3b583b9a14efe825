"""Graceful shutdown of a runtime: re-home its hot models, then drain its in-flight requests.

Order (``serve_runtime``'s ``finally``): publish shutting-down; :func:`rehome`; withdraw our
placements; :func:`drain`; stop the server; revoke the lease.

Who re-homes: the leaving runtime itself, not the routers. It alone knows which of its copies are
hot (its cache's last-used times; routers see only their own share of the traffic), there is one of
it, so each model is asked for once (every router sees the shutting-down event, and N routers
reacting to it would send N loads per model: the thundering herd), and it must wait for the copies
anyway before it may exit. Where a copy goes: the model's home by the routers' own rule, rendezvous
hashing with bounded load over the other eligible instances (``placement.hashing.choose_home``), so
that the copy lands where the routers would have sent the model's next cold request; the target's
cache is single-flight per model, so a load a router triggers meanwhile joins ours.

While re-homing, routers still send requests for a copy held only here (``routing.pick_copy``
uses a shutting-down instance's loaded copies as a last resort, hit-only), so clients see no cold
miss; once the copy elsewhere is loaded they go there. Models unused for ``rehome_recent_s`` are not
re-homed: their next request loads them elsewhere, as after any eviction.

The wait is bounded (``runtime.rehome_timeout_s``), and the drain after it too
(``runtime.drain_timeout_s``), so that the whole shutdown fits the pod's grace period.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from mesh.errors import MeshError
from mesh.registry.records import LOADED, InstanceRecord, PlacementRecord, gpu_tier
from mesh.registry.registry import Registry
from mesh.runtime.cache import Entry, ModelCache
from mesh.transport.runtime_client import RuntimeClient
from placement.hashing import Candidate, choose_home

log = structlog.get_logger(__name__)

PARALLEL_LOADS = 4  # loads asked at once, over all targets (each target queues its own beyond its limit)
POLL_S = 0.1  # registry polling while waiting for the copies' placements
SETTLE_S = 2.0  # no new copy published for this long: the rest were evicted by their targets
QUIET_S = 0.2  # drain: no new request for this long (routers have seen the withdrawal)


@dataclass
class RehomeResult:
    hot: int = 0  # recently used models held here
    elsewhere: int = 0  # of them, already loaded on another instance
    asked: int = 0  # loads asked of other instances
    loaded: int = 0  # of them, loaded and published before the deadline
    failed: int = 0
    no_target: int = 0  # no other instance could take it


def hot_entries(cache: ModelCache, recent_s: float, max_models: int, now: float) -> list[Entry]:
    """Loaded copies used within ``recent_s``, most recent first, at most ``max_models``."""
    hot = [e for e in cache.entries() if e.state == LOADED and now - e.last_used <= recent_s]
    hot.sort(key=lambda e: e.last_used, reverse=True)
    return hot[:max_models]


def _target(entry: Entry, others: list[InstanceRecord], load_factor: float) -> InstanceRecord | None:
    """The model's home among the others, by the routers' rule (``routing.pick_home``), sized by
    its measured size, which this instance knows and the routers do not."""
    spec = entry.spec
    fit = {r.instance_id: r for r in others if r.accepts_loads and r.can_serve(spec)}
    candidates = [Candidate(node=r.instance_id, load=float(r.loading_count), capacity_bytes=r.capacity_for(spec))
                  for r in fit.values()]
    home = choose_home(spec.model_id, candidates, entry.reserved_bytes, load_factor=load_factor,
                       prefer=gpu_tier(spec, fit.values()))
    return fit.get(home) if home is not None else None


async def rehome(*, instance_id: str, registry: Registry, cache: ModelCache, runtimes: RuntimeClient,
                 load_factor: float, recent_s: float, max_models: int, timeout_s: float) -> RehomeResult:
    """Load this instance's hot models on other instances; return when each has a published
    loaded copy elsewhere, or at the deadline (the caller bounds nothing else)."""
    deadline = time.monotonic() + timeout_s
    result = RehomeResult()
    hot = hot_entries(cache, recent_s, max_models, time.time())
    result.hot = len(hot)
    if not hot:
        return result
    keys = registry.keys
    instances = [InstanceRecord.from_json(kv.value) for kv in (await registry.store.get_prefix(keys.instances))[0]]
    others = [r for r in instances if r.instance_id != instance_id and not r.shutting_down]

    async def copies_elsewhere() -> set[str]:
        kvs, _ = await registry.store.get_prefix(keys.placements)
        live = {r.instance_id for r in others}
        return {p.model_id for p in (PlacementRecord.from_json(kv.value) for kv in kvs)
                if p.state == LOADED and p.instance_id in live}

    wanted = {e.model_id for e in hot}
    have = await copies_elsewhere() & wanted
    result.elsewhere = len(have)
    todo = [e for e in hot if e.model_id not in have]
    gate = asyncio.Semaphore(PARALLEL_LOADS)
    asked: set[str] = set()  # loaded elsewhere at our request (a failed load is not waited for)

    async def one(entry: Entry) -> None:
        target = _target(entry, others, load_factor)
        if target is None:
            result.no_target += 1
            return
        async with gate:
            result.asked += 1
            try:
                # The copy keeps our recency, so the target does not take it for a cold newcomer.
                await runtimes.load(target, entry.spec, int(entry.last_used * 1000), deadline - time.monotonic())
                asked.add(entry.model_id)
            except MeshError as err:
                result.failed += 1
                log.warning("re-homing a model failed", model_id=entry.model_id, target=target.instance_id,
                            code=err.code.name, reason=err.message)

    await asyncio.gather(*(one(e) for e in todo))
    # Loaded is not yet routable: wait for the targets to publish the copies' placements. A copy
    # seen published once counts even if its target evicts it later (on a full fleet it will:
    # waiting for it to come back would only run out the deadline), and once nothing new has
    # been published for SETTLE_S, the rest were evicted before we saw them.
    seen: set[str] = set()
    last_news = time.monotonic()
    while asked and time.monotonic() < deadline:
        published = await copies_elsewhere() & asked
        if published - seen:
            seen |= published
            last_news = time.monotonic()
        result.loaded = len(seen)
        if seen == asked or time.monotonic() - last_news >= SETTLE_S:
            break
        await asyncio.sleep(POLL_S)
    return result


async def drain(inflight: Callable[[], int], last_started: Callable[[], float], timeout_s: float) -> int:
    """Wait until no request is in flight and none arrived for ``QUIET_S``, or the deadline;
    returns the requests still in flight then."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if inflight() == 0 and time.perf_counter() - last_started() >= QUIET_S:
            return 0
        await asyncio.sleep(0.02)
    return inflight()
