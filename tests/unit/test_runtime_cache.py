"""The runtime cache's promises: one load per cold model, bytes never over capacity (counting
loads in flight and unloads in progress), eviction by policy, clear failures. The loader is a
stand-in with controllable size and duration; the cache logic and its thread pool are real."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from mesh.errors import DeadlineExceeded, ModelLoadError, NotHere, ResourceExhausted, Unavailable
from mesh.registry.records import ModelSpec
from mesh.runtime.cache import DeviceBudget, Entry, ModelCache
from mesh.runtime.loaders.base import LoadedModel
from placement.registry import make_policy


class FakeModel(LoadedModel):
    def __init__(self, model_id: str, size: int) -> None:
        super().__init__(model_id=model_id, type="fake", device="ram", inputs=[], outputs=[])
        self.size = size
        self.closed = threading.Event()

    def _predict(self, inputs: Mapping[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        return {}

    def footprint_bytes(self) -> int:
        return self.size

    def _release(self) -> None:
        self.closed.set()


class Harness:
    def __init__(self, capacity: int, *, sizes: dict[str, int] | None = None, delay_s: float = 0.0,
                 timeout_s: float = 5.0, concurrent: int = 2, policy: str = "lru",
                 policy_params: Mapping[str, object] | None = None,
                 predictions: dict[str, int] | None = None, pool: int = 0) -> None:
        self.sizes = sizes or {}
        predicted = predictions or self.sizes
        self.delay_s = delay_s
        self.calls: list[str] = []
        self.fail: dict[str, Exception] = {}
        self.events: list[tuple[str, str]] = []
        self.now = 1000.0
        self.max_used = 0
        self.budget = DeviceBudget("ram", capacity, make_policy(policy, **(policy_params or {})),
                                   pool_capacity_bytes=pool)
        self.max_pool_used = 0
        self.pool = ThreadPoolExecutor(4)
        self.cache = ModelCache(
            budgets=[self.budget], load_fn=self.load, predict_size=lambda s, d: predicted.get(s.model_id, 100),
            observe_size=lambda s, d, n: None, choose_device=lambda s, b, p: "ram", executor=self.pool,
            max_concurrent_loads=concurrent, load_timeout_s=timeout_s, clock=lambda: self.now,
            listener=self, rss=lambda: 0)

    def load(self, spec: ModelSpec, device: str) -> LoadedModel:
        self.calls.append(spec.model_id)
        if self.delay_s:
            time.sleep(self.delay_s)
        if spec.model_id in self.fail:
            raise self.fail[spec.model_id]
        return FakeModel(spec.model_id, self.sizes.get(spec.model_id, 100))

    def on_change(self, entry: Entry, event: str) -> None:
        self.events.append((entry.model_id, event))
        self.max_used = max(self.max_used, self.budget.used_bytes)
        self.max_pool_used = max(self.max_pool_used, self.budget.pool_used_bytes)

    async def get(self, model_id: str, **kw: object) -> Entry:
        self.now += 1
        entry = await self.cache.acquire(ModelSpec(model_id=model_id, type="fake"), **kw)  # type: ignore[arg-type]
        self.max_used = max(self.max_used, self.budget.used_bytes)
        return entry


async def test_concurrent_first_requests_cause_one_load() -> None:
    h = Harness(10_000, delay_s=0.05)
    entries = await asyncio.gather(*(h.get("m") for _ in range(100)))
    assert h.calls == ["m"]
    assert all(e is entries[0] for e in entries)
    assert h.cache.stats().misses == 1


async def test_measured_size_replaces_the_prediction() -> None:
    h = Harness(10_000, sizes={"m": 300})
    h.cache._predict_size = lambda s, d: 50  # type: ignore[method-assign]
    entry = await h.get("m")
    assert entry.reserved_bytes == 300
    assert h.budget.used_bytes == 300


async def test_a_load_waiting_for_room_starts_when_a_loading_copy_shrinks_to_its_measured_size() -> None:
    # Each load reserves 64 (its prediction) and measures 10: b cannot reserve while a is loading
    # (a's 64 is not evictable), and fits once a is measured. It must start then, not wait out the
    # 30 s load timeout (which once made clients give up with DEADLINE_EXCEEDED).
    h = Harness(100, sizes={"a": 10, "b": 10}, predictions={"a": 64, "b": 64}, delay_s=0.05, timeout_s=30)
    a, b = await asyncio.wait_for(asyncio.gather(h.get("a"), h.get("b")), 10)
    assert (a.reserved_bytes, b.reserved_bytes) == (10, 10)
    assert h.calls == ["a", "b"] and h.max_used <= 100
    assert h.budget.used_bytes == 20


async def test_least_recently_used_model_is_evicted_and_capacity_holds() -> None:
    h = Harness(300, sizes={"a": 100, "b": 100, "c": 100, "d": 100})
    for m in ("a", "b", "c"):
        await h.get(m)
    await h.get("a")  # a is now more recent than b
    await h.get("d")
    await asyncio.sleep(0.05)  # the evicted copy's close runs in the pool
    assert h.cache.get("b") is None
    assert {e.model_id for e in h.cache.entries()} == {"a", "c", "d"}
    assert ("b", "evicted") in h.events
    assert h.max_used <= 300
    assert h.budget.used_bytes == 300


async def test_evicted_copy_in_use_stays_counted_until_its_requests_finish() -> None:
    h = Harness(200, sizes={"a": 100, "b": 100, "c": 100})
    a = await h.get("a")
    await h.get("b")
    h.cache.begin_use(a)  # a request is running on a
    load_c = asyncio.create_task(h.get("c"))
    await asyncio.sleep(0.1)
    # a was chosen as victim, stops taking requests, but its 100 bytes are still held: c waits.
    assert h.cache.get("a") is None
    assert not load_c.done()
    assert h.budget.used_bytes <= 200
    h.cache.end_use(a)
    await asyncio.wait_for(load_c, 2)
    assert h.max_used <= 200


async def test_a_load_waiting_for_a_draining_victim_evicts_nothing_more_when_woken() -> None:
    # c's room is on its way (a, evicted, drains its request). Another load ending wakes c's wait;
    # counting a's bytes as freeing (placement.kernel.make_room), c must not evict b for the same
    # room: that once evicted an extra model per wake-up under churn.
    h = Harness(200, sizes={"a": 100, "b": 100, "c": 100})
    a = await h.get("a")
    await h.get("b")
    h.cache.begin_use(a)
    load_c = asyncio.create_task(h.get("c"))
    await asyncio.sleep(0.1)
    assert h.cache.get("a") is None and not load_c.done()
    await h.cache._wake_space_waiters()  # what a load finishing elsewhere does
    await asyncio.sleep(0.05)
    assert h.cache.get("b") is not None and ("b", "evicted") not in h.events
    h.cache.end_use(a)
    await asyncio.wait_for(load_c, 2)
    assert {e.model_id for e in h.cache.entries()} == {"b", "c"} and h.max_used <= 200


async def test_model_larger_than_capacity_is_refused() -> None:
    h = Harness(100, sizes={"big": 500})
    with pytest.raises(ResourceExhausted, match="capacity"):
        await h.get("big")
    assert h.calls == []


async def test_an_estimate_a_little_over_capacity_is_tried_and_its_measured_size_decides() -> None:
    """A learned prediction up to twice the room (issue 18: file size x a ratio other models
    skewed) is loaded in all of the room; the model, measured at 90 bytes, stays."""
    h = Harness(100, sizes={"a": 30, "odd": 90}, predictions={"a": 30, "odd": 150})
    await h.get("a")
    entry = await h.get("odd")
    assert entry.reserved_bytes == 90 and h.max_used <= 100
    assert h.cache.get("a") is None  # the room was made for the whole capacity first


async def test_rss_growth_past_the_whole_capacity_is_not_charged_to_a_model_that_fits() -> None:
    """Memory other threads allocated during the load (requests served meanwhile) made a 20 KB model
    measure 61 KB on a 35 KB runtime: it is charged its footprint, not failed."""
    h = Harness(100, sizes={"m": 40})
    readings = iter([0, 300_000])  # before and after the load: 300 KB of growth, capped at 3 x 40
    h.cache._rss = lambda: next(readings, 300_000)  # type: ignore[method-assign]
    entry = await h.get("m")
    assert entry.reserved_bytes == 40 and h.max_used <= 100


async def test_model_measuring_larger_than_capacity_after_load_is_refused_and_released() -> None:
    h = Harness(100, sizes={"big": 500})
    h.cache._predict_size = lambda s, d: 10  # type: ignore[method-assign]
    with pytest.raises(ResourceExhausted, match="once loaded"):
        await h.get("big")
    assert h.budget.used_bytes == 0
    assert h.cache.get("big") is None


async def test_failed_load_reports_reason_and_leaves_nothing_counted() -> None:
    h = Harness(1000)
    h.fail["bad"] = ModelLoadError("sklearn: cannot load /x: truncated file")
    with pytest.raises(ModelLoadError, match="truncated file"):
        await h.get("bad")
    assert h.cache.get("bad") is None
    assert h.budget.used_bytes == 0
    assert ("bad", "failed") in h.events
    # an unexpected exception from a loader is wrapped with the model and type
    h.fail["odd"] = ValueError("boom")
    with pytest.raises(ModelLoadError, match=r"'odd'.*boom"):
        await h.get("odd")


async def test_load_timeout_keeps_bytes_counted_until_the_thread_finishes() -> None:
    h = Harness(1000, sizes={"slow": 400}, delay_s=0.4, timeout_s=0.1)
    with pytest.raises(DeadlineExceeded, match=r"longer than 0\.1 s"):
        await h.get("slow")
    assert h.budget.used_bytes == 400  # the loader thread is still running and holds memory
    await asyncio.sleep(0.6)
    assert h.budget.used_bytes == 0


async def test_hung_loads_release_their_slots_and_too_many_stop_loading() -> None:
    """Loads that never return (a stuck mount, a hung library) give their slot back at the
    deadline, so the next model loads at once; past ``max_stuck_loads`` the cache refuses loads
    (UNAVAILABLE, naming them) until their threads end, and their bytes stay counted until then."""
    release = threading.Event()
    h = Harness(10_000, sizes={"hang-1": 300, "hang-2": 300, "hang-3": 300, "ok": 100}, timeout_s=0.2,
                concurrent=2)
    h.cache._max_stuck_loads = 3
    real_load = h.load

    def load(spec: ModelSpec, device: str) -> LoadedModel:
        if spec.model_id.startswith("hang"):
            release.wait(10)
        return real_load(spec, device)

    h.cache._load_fn = load
    for m in ("hang-1", "hang-2"):
        with pytest.raises(DeadlineExceeded, match=r"took longer than 0\.2 s"):
            await h.get(m)
    started = time.perf_counter()
    await h.get("ok")  # both slots were given back; a thread pool of 2 would be full here
    assert time.perf_counter() - started < 0.15
    assert h.cache.stuck_loads == ["hang-1", "hang-2"]
    assert h.budget.used_bytes == 300 + 300 + 100  # the hung loads' reservations stay
    with pytest.raises(DeadlineExceeded):
        await h.get("hang-3")
    with pytest.raises(Unavailable, match="3 loads on this instance never returned"):
        await h.get("another")
    release.set()
    for _ in range(100):
        await asyncio.sleep(0.01)
        if not h.cache.stuck_loads:
            break
    assert h.cache.stuck_loads == [] and h.budget.used_bytes == 100
    await h.get("another")


async def test_hit_only_request_for_missing_copy_answers_not_here() -> None:
    h = Harness(1000)
    with pytest.raises(NotHere):
        await h.get("m", allow_load=False)
    assert h.calls == []


async def test_preloaded_model_enters_the_order_in_the_past() -> None:
    h = Harness(300, sizes={"a": 100, "b": 100, "pre": 100, "c": 100})
    await h.get("a")
    await h.get("b")
    await h.get("pre", last_used=h.now - 3600)  # ensureLoaded of a new registration
    await h.get("c")
    assert h.cache.get("pre") is None  # first to go, although loaded last
    assert h.cache.get("a") is not None


async def test_unload_waits_for_release() -> None:
    h = Harness(1000)
    entry = await h.get("m")
    model = entry.model
    assert await h.cache.unload("m") is True
    assert isinstance(model, FakeModel) and model.closed.is_set()
    assert h.budget.used_bytes == 0
    assert await h.cache.unload("m") is False


async def test_loads_run_at_most_max_concurrent_loads_at_once() -> None:
    h = Harness(10_000, delay_s=0.1, concurrent=2)
    running = peak = 0
    inner = h.load

    def counting(spec: ModelSpec, device: str) -> LoadedModel:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            return inner(spec, device)
        finally:
            running -= 1

    h.cache._load_fn = counting  # type: ignore[method-assign]
    await asyncio.gather(*(h.get(f"m{i}") for i in range(6)))
    assert peak == 2
    assert len(h.calls) == 6


async def test_pinned_models_are_never_evicted() -> None:
    h = Harness(300, sizes={"pinned": 100, "b": 100, "c": 100, "d": 100})
    await h.cache.acquire(ModelSpec(model_id="pinned", type="fake", min_copies=1))
    for m in ("b", "c", "d"):
        await h.get(m)
    await asyncio.sleep(0.05)
    assert h.cache.get("pinned") is not None  # the least recently used, yet it stayed
    assert h.cache.get("b") is None


async def test_a_refused_newcomer_is_served_and_then_goes_first() -> None:
    """ModelMesh's churn guard on a full cache whose models are all in recent use: the newcomer is
    served, but it enters the eviction order behind the models in use, so the next load displaces it
    rather than one of them."""
    h = Harness(300, sizes={m: 100 for m in "abcxy"}, policy="lru+churnguard",
                policy_params={"capacity": 300, "min_churn_age": 600.0})
    for m in "abc":
        await h.get(m)
    assert (await h.get("x")).model_id == "x"  # refused, yet served
    assert h.cache.stats().refused == 1
    await h.get("y")  # the oldest model is now the refused one: evicting it is no churn, y is admitted
    await asyncio.sleep(0.05)
    assert [m for m, event in h.events if event == "evicted"] == ["a", "x"]
    assert {e.model_id for e in h.cache.entries()} == {"b", "c", "y"}
    assert h.cache.stats().refused == 1
    assert h.max_used <= 300


def churn_guarded(capacity: int, pool: int, models: str, size: int = 100, **kw: object) -> Harness:
    """A cache whose admission filter refuses every newcomer while its models are in recent use."""
    return Harness(capacity, sizes={m: size for m in models}, policy="lru+churnguard",
                   policy_params={"capacity": capacity, "min_churn_age": 600.0}, pool=pool, **kw)  # type: ignore[arg-type]


def evicted(h: Harness) -> list[str]:
    return [m for m, event in h.events if event == "evicted"]


async def test_refused_newcomers_take_turns_in_the_pass_through_room_and_evict_no_admitted_model() -> None:
    h = churn_guarded(300, 100, "abcxyz")
    for m in "abc":
        await h.get(m)
    for m in "xyz":
        assert (await h.get(m)).model_id == m  # refused, yet served
    await asyncio.sleep(0.05)
    assert evicted(h) == ["x", "y"]  # the room's earlier copies, never an admitted model
    assert {e.model_id for e in h.cache.entries()} == {"a", "b", "c", "z"}
    assert h.cache.get("z").pooled and not h.cache.get("a").pooled  # type: ignore[union-attr]
    stats = h.cache.stats()
    assert (stats.refused, stats.passed_through) == (3, 3)
    assert h.max_used <= 300 and h.max_pool_used <= 100
    assert (h.budget.used_bytes, h.budget.pool_used_bytes) == (300, 100)


async def test_a_refused_pinned_model_goes_to_the_main_room_where_it_is_never_evicted() -> None:
    h = churn_guarded(300, 100, "abcpx")
    for m in "abc":
        await h.get(m)
    pinned = await h.cache.acquire(ModelSpec(model_id="p", type="fake", min_copies=1))
    assert not pinned.admitted and not pinned.pooled
    await h.get("x")  # a newcomer after it: the pinned model, first in the order, still stays
    await asyncio.sleep(0.05)
    assert h.cache.get("p") is not None and h.cache.get("x") is not None
    assert h.max_used <= 300 and h.max_pool_used <= 100


async def test_a_copy_in_the_pass_through_room_serves_hits_while_it_stays() -> None:
    h = churn_guarded(200, 100, "abx")
    for m in "abx":
        await h.get(m)
    before = h.cache.stats().hits
    assert (await h.get("x")).pooled
    assert h.calls == ["a", "b", "x"]
    assert h.cache.stats().hits == before + 1
    assert list(h.budget.pool) == ["x"]


async def test_without_a_room_a_refused_newcomer_still_goes_first_from_the_main_room() -> None:
    h = churn_guarded(300, 0, "abcx")
    for m in "abcx":
        await h.get(m)
    await asyncio.sleep(0.05)
    assert evicted(h) == ["a"]
    assert not h.cache.get("x").pooled  # type: ignore[union-attr]
    assert h.cache.stats().passed_through == 0


async def test_a_refused_model_larger_than_the_room_goes_to_the_main_room_as_first_to_go() -> None:
    h = churn_guarded(300, 100, "abcx")
    h.sizes["x"] = 150
    for m in "abcx":
        await h.get(m)
    await asyncio.sleep(0.05)
    assert evicted(h) == ["a", "b"]
    assert not h.cache.get("x").pooled  # type: ignore[union-attr]
    assert h.max_used <= 300 and h.max_pool_used == 0


async def test_a_refused_model_measuring_more_than_the_room_moves_to_the_main_room() -> None:
    h = churn_guarded(300, 100, "abcx", predictions={m: 100 for m in "abc"} | {"x": 50})
    h.sizes["x"] = 150  # predicted 50 (fits the room), measures 150 (does not)
    for m in "abcx":
        await h.get(m)
    await asyncio.sleep(0.05)
    entry = h.cache.get("x")
    assert entry is not None and not entry.pooled and entry.reserved_bytes == 150
    assert h.budget.pool_used_bytes == 0 and not h.budget.pool
    assert h.max_used <= 300 and h.max_pool_used <= 100


async def test_concurrent_refused_loads_wait_for_the_room_and_every_request_is_served() -> None:
    """Two slots, one room: the second refused load waits for the first (and for its waiters to take
    it) instead of evicting an admitted model; every request gets its copy, each model loads once."""
    h = churn_guarded(300, 100, "abcxyz", delay_s=0.05)
    for m in "abc":
        await h.get(m)
    h.delay_s = 0.05
    got = await asyncio.wait_for(asyncio.gather(*(h.get(m) for m in "xyzxyz")), 10)
    assert [e.model_id for e in got] == list("xyzxyz")
    assert sorted(h.calls[3:]) == ["x", "y", "z"]
    await asyncio.sleep(0.05)
    assert {"a", "b", "c"} <= {e.model_id for e in h.cache.entries()}
    assert not {"a", "b", "c"} & set(evicted(h))
    assert h.max_used <= 300 and h.max_pool_used <= 100


async def test_a_displaced_copy_in_use_stays_counted_in_the_room_until_its_requests_finish() -> None:
    h = churn_guarded(200, 100, "abxy")
    for m in "abx":
        await h.get(m)
    x = h.cache.get("x")
    assert x is not None
    h.cache.begin_use(x)
    load_y = asyncio.create_task(h.get("y"))
    await asyncio.sleep(0.1)
    assert not load_y.done()  # y waits: x is leaving but still holds the room
    assert h.budget.pool_used_bytes == 100 and h.cache.get("x") is None
    h.cache.end_use(x)
    assert (await asyncio.wait_for(load_y, 5)).pooled
    assert x.model is None and h.max_pool_used <= 100


async def test_a_load_starting_while_another_loads_is_judged_by_the_admission_filter() -> None:
    """Two newcomers at once on a full cache whose models are in recent use: both are refused. The
    second used to be admitted unjudged: the first one's reservation looked like free room."""
    h = churn_guarded(300, 0, "abcxy", delay_s=0.05)
    for m in "abc":
        await h.get(m)
    await asyncio.wait_for(asyncio.gather(h.get("x"), h.get("y")), 10)
    assert h.cache.stats().refused == 2
    assert h.max_used <= 300


async def test_the_runtime_and_the_simulator_agree_on_the_pass_through_room() -> None:
    """The same requests, one at a time, through the runtime's cache and the cluster simulator (one
    instance, the same room): the same refusals, pass-throughs, evictions and hits."""
    from placement.cluster import simulate_cluster
    from placement.request import Request

    order = "abcxyzabcxxqa"
    h = churn_guarded(300, 100, "abcxyzq")
    for m in order:
        await h.get(m)
    await asyncio.sleep(0.05)
    trace = [Request(float(t), m, 100, 1.0) for t, m in enumerate(order)]
    sim = simulate_cluster(trace, instances=1, capacity_bytes=400, policy="lru+churnguard",
                           policy_params={"capacity": 300, "min_churn_age": 600.0}, passthrough_bytes=100)
    ours = h.cache.stats()
    assert (ours.refused, ours.passed_through, ours.evictions, ours.hits) == \
        (sim.refused, sim.pooled, sim.total.evictions, sim.total.hits)
    assert ours.hits > 0 and ours.passed_through > 0


async def test_loads_asked_for_ahead_of_traffic_skip_admission() -> None:
    h = Harness(200, sizes={m: 100 for m in "abc"}, policy="lru+churnguard",
                policy_params={"capacity": 200, "min_churn_age": 600.0})
    for m in "ab":
        await h.get(m)
    await h.get("c", last_used=h.now + 20)  # a scale-out copy, stamped ahead
    assert h.cache.stats().refused == 0
    assert h.cache.get("c") is not None


def test_the_pass_through_room_comes_out_of_the_ram_capacity_and_leaves_the_main_room_the_most() -> None:
    from mesh.errors import InvalidArgument
    from mesh.runtime.app import ram_budget
    from mesh.settings import RuntimeSettings

    budget = ram_budget(RuntimeSettings(passthrough_bytes=1000), 10_000)
    assert (budget.capacity_bytes, budget.pool_capacity_bytes) == (9000, 1000)
    assert ram_budget(RuntimeSettings(), 10_000).pool_capacity_bytes == 0
    for bad in (5001, -1):
        with pytest.raises(InvalidArgument, match=r"runtime.passthrough_bytes is .*0 to half the RAM capacity"):
            ram_budget(RuntimeSettings(passthrough_bytes=bad), 10_000)


async def test_a_copy_measuring_over_its_prediction_in_the_room_tops_up_there_and_evicts_no_admitted_model() -> None:
    """y, predicted 30, measures 50: the room's top-up drops x (its least recently used copy) and waits
    for x's close. It used to give up as soon as x was dropped (x's bytes are freed only when its close
    ends), so x went for nothing and y took the main room, evicting the admitted a."""
    h = churn_guarded(200, 100, "abxy", predictions={"a": 100, "b": 100, "x": 60, "y": 30})
    h.sizes.update(x=60, y=50)
    for m in "abxy":
        await h.get(m)
    await asyncio.sleep(0.05)
    assert evicted(h) == ["x"]
    y = h.cache.get("y")
    assert y is not None and y.pooled and y.reserved_bytes == 50
    assert (h.budget.used_bytes, h.budget.pool_used_bytes, list(h.budget.pool)) == (200, 50, ["y"])
    assert h.max_used <= 200 and h.max_pool_used <= 100
