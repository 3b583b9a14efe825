"""The simulator: exact figures on hand-computed traces, load queueing and single flight, routing as the
router does it, copy scaling and pinning in a cluster, and properties (capacity, determinism)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Container

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from placement.cluster import home_partition, instance_names, simulate_cluster
from placement.hashing import Candidate, choose_home, rendezvous_order
from placement.lru import LRUPolicy
from placement.offline import offline_reference
from placement.policy import EvictionPolicy
from placement.registry import build_policy, policy_names
from placement.replay import replay
from placement.request import Request
from placement.scaling import ModelRule, ScalingConfig
from placement.stats import Stats, gap_closed, sum_stats

R = Request
POLICIES = policy_names()


class Checked:
    """Delegates to a real policy and fails the test if the cache ever holds more than its capacity."""

    def __init__(self, inner: EvictionPolicy, capacity: int) -> None:
        self.inner = inner
        self.capacity = capacity
        self.name = inner.name

    @property
    def total_size(self) -> int:
        return self.inner.total_size

    def size_of(self, key: str) -> int | None:
        return self.inner.size_of(key)

    def admit(self, key: str, size: int, now: float) -> bool:
        return self.inner.admit(key, size, now)

    def insert(self, key: str, size: int, now: float, *, last_used: float | None = None,
               cost: float = 0.0) -> None:
        assert key not in self.inner, f"{key} inserted twice"
        self.inner.insert(key, size, now, last_used=last_used, cost=cost)
        assert self.inner.total_size <= self.capacity, (self.inner.total_size, self.capacity)

    def touch(self, key: str, now: float) -> None:
        self.inner.touch(key, now)

    def resize(self, key: str, size: int) -> None:
        self.inner.resize(key, size)

    def remove(self, key: str) -> None:
        self.inner.remove(key)

    def victims(self, need: int, now: float, *, protected: Container[str] = ()) -> list[str]:
        return self.inner.victims(need, now, protected=protected)

    def __contains__(self, key: object) -> bool:
        return key in self.inner

    def __len__(self) -> int:
        return len(self.inner)

    def oldest_last_used(self) -> float | None:
        return self.inner.oldest_last_used()


# -- one cache: exact figures ---------------------------------------------------------------------



def same(a: object, b: object) -> bool:
    """Equal, NaN fields included: Python 3.13's dataclass ``==`` compares field by field, where
    NaN != NaN (3.11's compared tuples, which take one NaN object as equal to itself)."""
    def plain(x: object) -> object:
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            return plain(dataclasses.asdict(x))
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [plain(v) for v in x]
        return "nan" if isinstance(x, float) and math.isnan(x) else x
    return plain(a) == plain(b)

def test_replay_hand_computed_lru_trace() -> None:
    trace = [R(0.0, "a", 40, 10.0), R(1.0, "b", 40, 20.0), R(2.0, "a", 40, 10.0),
             R(3.0, "c", 40, 30.0),  # evicts b: a was used at 2
             R(4.0, "a", 40, 10.0), R(5.0, "b", 40, 20.0)]  # b evicts c
    s = replay(trace, LRUPolicy(), 100)
    assert (s.requests, s.hits, s.misses, s.joined, s.loads, s.evictions, s.bypassed) == (6, 2, 4, 0, 4, 2, 0)
    assert (s.bytes_requested, s.bytes_missed) == (240, 160)
    assert (s.cost_requested_ms, s.cost_missed_ms) == (100.0, 80.0)
    assert s.miss_ratio == pytest.approx(4 / 6)
    assert s.byte_miss_ratio == pytest.approx(160 / 240)
    assert s.cost_miss_ratio == pytest.approx(0.8)
    assert s.duration_s == 5.0 and s.loads_per_s == pytest.approx(0.8)
    # Added latency over all 6 requests: [0, 0, 10, 20, 20, 30] ms.
    assert s.wait_p50_ms == 10.0 and s.wait_p99_ms == 30.0 and s.wait_max_ms == 30.0
    assert s.wait_mean_ms == pytest.approx(80 / 6)


def test_model_larger_than_capacity_is_a_miss_that_does_not_stay() -> None:
    trace = [R(0.0, "small", 10, 1.0), R(1.0, "huge", 200, 5.0), R(2.0, "huge", 200, 5.0),
             R(3.0, "small", 10, 1.0)]
    policy = LRUPolicy()
    s = replay(trace, policy, 100)
    assert (s.hits, s.misses, s.bypassed, s.evictions) == (1, 3, 2, 0)
    assert s.bytes_missed == 410 and "huge" not in policy and "small" in policy


class Refusing(LRUPolicy):
    def admit(self, key: str, size: int, now: float) -> bool:
        return not key.startswith("x")


def test_refused_admission_passes_through_without_evicting() -> None:
    trace = [R(0.0, "a", 50, 1.0), R(1.0, "b", 50, 1.0), R(2.0, "x1", 50, 7.0), R(3.0, "x1", 50, 7.0),
             R(4.0, "a", 50, 1.0), R(5.0, "b", 50, 1.0)]
    s = replay(trace, Refusing(), 100)
    assert (s.hits, s.misses, s.bypassed, s.evictions) == (2, 4, 2, 0)
    assert s.cost_missed_ms == 16.0


def test_empty_trace_and_bad_input() -> None:
    s = replay([], LRUPolicy(), 100)
    assert same(s, Stats()) and math.isnan(s.miss_ratio) and math.isnan(s.loads_per_s)
    with pytest.raises(ValueError, match="time order"):
        replay([R(2.0, "a", 1, 1.0), R(1.0, "b", 1, 1.0)], LRUPolicy(), 100)
    with pytest.raises(ValueError, match="capacity"):
        replay([], LRUPolicy(), -1)
    with pytest.raises(ValueError, match="time order"):
        simulate_cluster([R(2.0, "a", 1, 1.0), R(1.0, "b", 1, 1.0)], instances=1, capacity_bytes=10,
                         policy="lru")
    with pytest.raises(ValueError, match="unknown eviction policy"):
        simulate_cluster([], instances=1, capacity_bytes=10, policy="nope")


def test_a_pass_through_room_keeps_refused_models_from_evicting_admitted_ones() -> None:
    """Churn guard on one instance whose models are all in recent use: every newcomer is refused.
    Without a room each refused newcomer goes first from the main room (the first one evicting an
    admitted model); with one, they take turns in the room and the admitted models all stay."""
    guard = {"capacity": 300, "min_churn_age": 600.0}
    trace = [R(float(t), m, 100, 1.0) for t, m in enumerate("abcxyzabc")]
    plain = simulate_cluster(trace, instances=1, capacity_bytes=300, policy="lru+churnguard",
                             policy_params=guard)
    room = simulate_cluster(trace, instances=1, capacity_bytes=400, policy="lru+churnguard",
                            policy_params=guard, passthrough_bytes=100)
    # a was evicted for x, and its return set off a cascade: no request of the last three hit.
    assert (plain.refused, plain.pooled, plain.total.hits, plain.total.evictions) == (3, 0, 0, 6)
    assert (room.refused, room.pooled, room.total.hits) == (3, 3, 3)
    assert room.total.evictions == 2  # x and y, from the room
    with pytest.raises(ValueError, match="passthrough_bytes"):
        simulate_cluster([], instances=1, capacity_bytes=100, policy="lru", passthrough_bytes=51)


def test_replay_accepts_a_one_shot_iterator() -> None:
    trace = [R(1.0, "a", 1, 1.0), R(3.0, "a", 1, 1.0)]
    assert same(replay(iter(trace), LRUPolicy(), 10), replay(trace, LRUPolicy(), 10))


def test_gap_closed() -> None:
    assert gap_closed(100, 60, 20) == pytest.approx(0.5)
    assert gap_closed(100, 100, 20) == 0.0
    assert gap_closed(100, 20, 20) == 1.0
    assert gap_closed(100, 120, 20) == pytest.approx(-0.25)
    assert gap_closed(0.3, 0.25, 0.3) is None  # no gap to close


def test_offline_reference_exact_for_uniform_sizes_and_bracketed_otherwise() -> None:
    trace = [R(float(i), m, 10, 5.0) for i, m in enumerate("abcab")]
    opt = offline_reference([trace], 20)  # two models: Belady keeps a for its reuse, LRU does not
    assert opt.exact_misses and opt.exact_cost and opt.label == "Belady (exact)"
    assert (opt.misses, opt.misses_lower, opt.cost_missed_ms, opt.requests) == (4, 4, 20.0, 5)
    lru = replay(trace, LRUPolicy(), 20)
    assert lru.misses == 5
    assert opt.gap(lru, lru) == (0.0, 0.0)
    # Summed over instances.
    assert offline_reference([trace, trace], 20).misses == 8

    mixed = [R(float(i), m, {"a": 10, "b": 25, "c": 5}[m], 1.0 + i) for i, m in enumerate("abcabcacba")]
    ref = offline_reference([mixed], 30)
    assert not ref.exact_misses and "bracketed" in ref.label
    assert ref.misses_lower <= ref.misses and ref.cost_missed_lower_ms <= ref.cost_missed_ms
    assert ref.bytes_missed_lower <= ref.bytes_missed
    lo, hi = ref.gap(replay(mixed, LRUPolicy(), 30), replay(mixed, LRUPolicy(), 30), "cost")
    assert lo in (0.0, None) and hi in (0.0, None)


def test_sum_stats_adds_counts() -> None:
    a = replay([R(0.0, "a", 10, 1.0), R(1.0, "a", 10, 1.0)], LRUPolicy(), 100)
    b = replay([R(5.0, "b", 30, 2.0)], LRUPolicy(), 100)
    total = sum_stats([a, b])
    assert (total.requests, total.hits, total.misses, total.bytes_missed) == (3, 1, 2, 40)
    assert (total.start_s, total.end_s, total.cost_missed_ms) == (0.0, 5.0, 3.0)
    assert math.isnan(total.wait_p99_ms) and total.wait_mean_ms == pytest.approx(1.0)


# -- a cluster: load slots, single flight ---------------------------------------------------------


def test_load_slots_queue_the_misses() -> None:
    trace = [R(0.0, m, 10, 100.0) for m in "abc"]
    # One slot: the loads run one after the other, so the waits are 100, 200 and 300 ms.
    s = simulate_cluster(trace, instances=1, capacity_bytes=1000, policy="lru", load_slots=1).total
    assert (s.misses, s.loads, s.hits, s.joined) == (3, 3, 0, 0)
    assert s.wait_mean_ms == pytest.approx(200.0) and s.wait_max_ms == pytest.approx(300.0)
    assert s.wait_p50_ms == pytest.approx(200.0)
    # Two slots: 100, 100, 200.
    s = simulate_cluster(trace, instances=1, capacity_bytes=1000, policy="lru", load_slots=2).total
    assert s.wait_mean_ms == pytest.approx(400 / 3) and s.wait_max_ms == pytest.approx(200.0)


def test_requests_for_a_loading_model_join_its_load() -> None:
    trace = [R(0.0, "a", 10, 100.0), R(0.02, "a", 10, 100.0), R(0.05, "a", 10, 100.0),
             R(0.1, "a", 10, 100.0),  # the load completes at 0.1: a hit
             R(0.2, "a", 10, 100.0)]
    s = simulate_cluster(trace, instances=1, capacity_bytes=1000, policy="lru").total
    assert (s.loads, s.misses, s.hits, s.joined) == (1, 1, 2, 2)
    assert s.miss_ratio == 0.2  # the runtime's counters: a request that joins a load is not a miss
    assert s.bytes_missed == 10 and s.cost_missed_ms == 100.0  # one load's worth
    assert s.wait_max_ms == pytest.approx(100.0)
    assert s.wait_mean_ms == pytest.approx((100 + 80 + 50) / 5)


def test_inference_time_keeps_requests_in_flight_and_diverts_homes() -> None:
    # Bounded load: with requests in flight on the HRW-first instance, a cold model goes elsewhere.
    names = instance_names(2)
    models = [f"m{i}" for i in range(200)]
    first = [m for m in models if rendezvous_order(m, names)[0] == names[0]]
    busy, cold = first[0], first[1]
    trace = [R(0.0, busy, 10, 1.0)]
    trace += [R(1.0 + i * 1e-4, busy, 10, 1.0, infer_ms=1000.0) for i in range(5)]  # 5 in flight
    trace.append(R(1.01, cold, 10, 1.0))
    c = simulate_cluster(trace, instances=2, capacity_bytes=1000, policy="lru")
    assert c.instances[names[1]].loads == 1  # cold went to its second choice
    assert c.instances[names[0]].loads == 1 and c.instances[names[0]].hits == 5


def test_cluster_routing_agrees_with_choose_home() -> None:
    # Models requested one at a time, far apart: every instance is idle, so each cold model loads on
    # choose_home's answer; repeat requests then hit that copy.
    names = instance_names(4)
    models = [f"model-{i}" for i in range(60)]
    trace = [R(float(i), m, 10, 5.0) for i, m in enumerate(models)]
    trace += [R(100.0 + i, m, 10, 5.0) for i, m in enumerate(models)]
    c = simulate_cluster(trace, instances=4, capacity_bytes=10_000, policy="lru")
    idle = [Candidate(n, 10_000, 0.0) for n in names]
    expected = dict.fromkeys(names, 0)
    for m in models:
        home = choose_home(m, idle, 10)
        assert home == rendezvous_order(m, names)[0]
        expected[home] += 1
    assert {n: s.loads for n, s in c.instances.items()} == expected
    assert {n: s.hits for n, s in c.instances.items()} == expected
    assert c.total.hits == 60 and c.total.loads == 60


@pytest.mark.parametrize("name", POLICIES)
def test_cluster_with_instant_loads_is_the_replay_of_each_home_share(name: str) -> None:
    # With loads that take no time and no load bound, the cluster is N independent caches, each fed its
    # home share: the two simulators must agree exactly, policy by policy (with replay's rule for a
    # model the admission filter refuses: it passes through).
    import random

    rnd = random.Random(5)
    models = [f"m{i}" for i in range(120)]
    sizes = {m: rnd.choice([10, 20, 40]) for m in models}
    weights = [1 / (i + 1) for i in range(len(models))]
    trace = [R(i * 0.01, m, sizes[m], 0.0) for i, m in enumerate(rnd.choices(models, weights, k=3000))]
    parts = home_partition(trace, 3)
    per_share = [replay(part, build_policy(name, 200), 200) for part in parts]
    c = simulate_cluster(trace, instances=3, capacity_bytes=200, policy=name, load_factor=1e9,
                         refused="pass-through")
    for share, stats in zip(per_share, c.instances.values(), strict=True):
        assert (stats.hits, stats.misses, stats.evictions, stats.bypassed, stats.bytes_missed) == (
            share.hits, share.misses, share.evictions, share.bypassed, share.bytes_missed)
    assert c.total.joined == 0


def test_home_partition_splits_by_plain_home() -> None:
    trace = [R(float(i), f"m{i % 7}", 1, 1.0) for i in range(50)]
    parts = home_partition(trace, 3)
    names = instance_names(3)
    assert sum(len(p) for p in parts) == 50
    for i, part in enumerate(parts):
        assert all(rendezvous_order(r.model_id, names)[0] == names[i] for r in part)


# -- a cluster: copy scaling and pinning ----------------------------------------------------------


def hot_then_cold(hot_rps: float = 40.0, infer_ms: float = 0.0) -> list[Request]:
    """A hot model for 60 s, then background traffic only, for 400 s."""
    trace: list[Request] = []
    for i in range(int(60 * hot_rps)):
        trace.append(R(i / hot_rps, "hot", 10, 50.0, infer_ms))
    for i in range(400):
        trace.append(R(60.0 + i, f"bg{i % 5}", 10, 50.0))
    trace.sort(key=lambda r: r.time_s)
    return trace


def test_hot_model_gets_a_copy_on_its_next_instance_and_gives_it_back() -> None:
    cfg = ScalingConfig(half_life_s=5.0, rps_threshold=25.0, hold_s=60.0, cooldown_s=5.0)
    # Requests in flight (30 ms each at 40 rps) are what spreads them over copies: the router's rule
    # sends a request to the copy with the fewest in flight, the first on a tie.
    c = simulate_cluster(hot_then_cold(infer_ms=30.0), instances=3, capacity_bytes=1000, policy="lru",
                         scaling=cfg)
    names = instance_names(3)
    order = rendezvous_order("hot", names)
    assert c.copies_added == 1 and c.copies_removed == 1
    assert c.instances[order[1]].copy_loads == 1  # the next instance in the model's copy order
    assert c.instances[order[1]].hits > 100  # and it took a share of the traffic
    assert c.instances[order[2]].copy_loads == 0
    # Without scaling, one copy only.
    c0 = simulate_cluster(hot_then_cold(), instances=3, capacity_bytes=1000, policy="lru")
    assert c0.copies_added == 0 and c0.total.copy_loads == 0


def test_added_copy_enters_the_eviction_order_hold_s_ahead() -> None:
    # As the router asks the runtime (mesh.router.replicas): a scale-out copy is stamped hold_s ahead,
    # so on a two-model instance the cold misses homed there evict each other, not the copy.
    names = instance_names(2)
    order = rendezvous_order("hot", names)
    cold = [m for m in (f"c{i}" for i in range(100)) if rendezvous_order(m, names)[0] == order[1]][:2]
    cfg = ScalingConfig(half_life_s=2.0, rps_threshold=10.0, hold_s=20.0, cooldown_s=1.0)
    trace = [R(i / 50, "hot", 10, 10.0) for i in range(500)]  # 50 rps for 10 s: a copy on order[1]
    trace += [R(0.0, cold[0], 10, 10.0), R(5.3, cold[1], 10, 10.0), R(5.6, cold[0], 10, 10.0),
              R(5.9, cold[1], 10, 10.0)]
    trace.sort(key=lambda r: r.time_s)
    c = simulate_cluster(trace, instances=2, capacity_bytes=20, policy="lru", scaling=cfg)
    second = c.instances[order[1]]
    assert c.copies_added == 1 and second.copy_loads == 1 and c.no_room == 0
    # Each cold request missed: the one before it was evicted for it, the copy never was.
    assert (second.misses, second.hits, second.evictions) == (4, 0, 3)
    # Stamped at its load instead, the copy would have been the victim at 5.6 and c1 a hit at 5.9.


def test_pinned_model_is_never_evicted() -> None:
    trace = [R(0.0, "pin", 10, 5.0)]
    trace += [R(1.0 + i, f"m{i}", 10, 5.0) for i in range(30)]
    trace.append(R(100.0, "pin", 10, 5.0))
    pinned = ScalingConfig(models={"pin": ModelRule(pinned=True)})
    c = simulate_cluster(trace, instances=1, capacity_bytes=20, policy="lru", scaling=pinned)
    assert c.total.hits == 1 and c.total.evictions == 29
    c = simulate_cluster(trace, instances=1, capacity_bytes=20, policy="lru", scaling=ScalingConfig())
    assert c.total.hits == 0  # unpinned, LRU evicts it


# -- properties -----------------------------------------------------------------------------------


@st.composite
def traces(draw: st.DrawFn) -> list[Request]:
    n_models = draw(st.integers(1, 12))
    sizes = draw(st.lists(st.integers(0, 60), min_size=n_models, max_size=n_models))
    costs = draw(st.lists(st.floats(0.0, 300.0), min_size=n_models, max_size=n_models))
    steps = draw(st.lists(st.tuples(st.floats(0.0, 0.2), st.integers(0, n_models - 1),
                                    st.sampled_from([0.0, 0.0, 5.0, 40.0])), max_size=120))
    t, out = 0.0, []
    for gap, m, infer in steps:
        t += gap
        out.append(R(t, f"m{m}", sizes[m], costs[m], infer))
    return out




@settings(max_examples=150, deadline=None)
@given(name=st.sampled_from(POLICIES), trace=traces(), capacity=st.integers(0, 150))
def test_replay_never_exceeds_capacity_and_is_repeatable(name: str, trace: list[Request], capacity: int) -> None:
    first = replay(trace, Checked(build_policy(name, capacity), capacity), capacity)
    again = replay(trace, Checked(build_policy(name, capacity), capacity), capacity)
    assert same(first, again)
    assert first.hits + first.misses == len(trace)
    assert first.bytes_missed <= first.bytes_requested


@settings(max_examples=100, deadline=None)
@given(name=st.sampled_from(POLICIES), trace=traces(), capacity=st.integers(0, 150),
       instances=st.integers(1, 3), slots=st.integers(1, 2), scaled=st.booleans())
def test_cluster_never_exceeds_capacity_and_is_repeatable(
    name: str, trace: list[Request], capacity: int, instances: int, slots: int, scaled: bool
) -> None:
    factory: Callable[[], EvictionPolicy] = lambda: Checked(build_policy(name, capacity), capacity)  # noqa: E731
    cfg = ScalingConfig(half_life_s=1.0, rps_threshold=5.0, hold_s=0.5, cooldown_s=0.1,
                        models={"m0": ModelRule(pinned=True)}) if scaled else None
    runs = [simulate_cluster(trace, instances=instances, capacity_bytes=capacity, policy=factory,
                             scaling=cfg, load_slots=slots) for _ in range(2)]
    assert same(runs[0], runs[1])
    total = runs[0].total
    assert total.requests == len(trace) == total.hits + total.misses + total.joined
    assert total.loads == total.misses + total.copy_loads
    assert all(w >= 0 for w in (total.wait_p50_ms, total.wait_p99_ms) if not math.isnan(w))


def test_a_load_reserves_its_prediction_then_its_measured_size() -> None:
    # As the runtime: room for the prediction when the load gets its slot, the measured size after.
    trace = [R(0.0, "a", 10, 1.0), R(1.0, "b", 10, 1.0), R(2.0, "c", 10, 1.0), R(3.0, "a", 10, 1.0)]
    exact = simulate_cluster(trace, instances=1, capacity_bytes=30, policy="lru")
    assert (exact.total.evictions, exact.total.hits) == (0, 1)  # c fits beside a and b
    over = simulate_cluster(trace, instances=1, capacity_bytes=30, policy="lru", predicted={"c": 20})
    assert (over.total.evictions, over.total.hits) == (1, 0)  # c's prediction made a give way
    # Predicted below its measured size: c starts without evicting (20 + 5 fit in 25), and the rest
    # is made room for when it completes (a goes then); the cache never holds more than 25.
    under = simulate_cluster(trace[:3], instances=1, capacity_bytes=25, predicted={"c": 5},
                             policy=lambda: Checked(LRUPolicy(), 25))
    assert (under.total.evictions, under.no_room, under.total.bypassed) == (1, 0, 0)


def test_a_load_waiting_for_the_room_goes_on_when_the_load_holding_it_moves_to_the_main_room() -> None:
    """x reserves 50 of the room and measures 150, more than the room: it moves to the main room.
    y, which waited for the room x held, used to be woken only by a copy staying in the room, so it
    waited for ever, holding its slot, and every later request for y joined it unanswered."""
    guard = {"capacity": 300, "min_churn_age": 600.0}
    trace = [R(0.0, "a", 100, 1.0), R(1.0, "b", 100, 1.0), R(2.0, "c", 100, 1.0), R(3.0, "x", 150, 10_000.0),
             R(3.5, "y", 100, 1.0), R(30.0, "y", 100, 1.0), R(31.0, "y", 100, 1.0)]
    s = simulate_cluster(trace, instances=1, capacity_bytes=400, policy="lru+churnguard", policy_params=guard,
                         passthrough_bytes=100, predicted={"x": 50})
    assert (s.refused, s.pooled) == (2, 1)  # y, in the room once x left it
    assert (s.total.misses, s.total.hits) == (5, 2)
