"""Eviction and admission policies beyond LRU: the contract every registered policy keeps, then each
policy's own behaviour on small worked examples (GDSF, SIEVE, S3-FIFO, TinyLFU, the churn guard)."""

from __future__ import annotations

from collections.abc import Container

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from placement.admission import ChurnGuard, FrequencySketch, TinyLFUAdmission
from placement.gdsf import GDSFPolicy
from placement.lru import LRUPolicy
from placement.policy import EvictionPolicy
from placement.registry import make_policy, policy_names
from placement.s3fifo import S3FIFOPolicy
from placement.sieve import SievePolicy

HOUR = 3600.0
BASES = ("lru", "gdsf", "s3fifo", "sieve")


def build(name: str, capacity: int, **extra: object) -> EvictionPolicy:
    """``make_policy(name)``, with ``capacity`` when the policy takes one (the filters require it)."""
    params: dict[str, object] = dict(extra)
    if name.endswith("+churnguard"):
        params.setdefault("min_churn_age", 3.0)
    try:
        return make_policy(name, capacity=capacity, **params)
    except ValueError as exc:
        if "bad parameters" not in str(exc):
            raise
    return make_policy(name, **params)


def fill(p: EvictionPolicy, keys: str, size: int = 10, start: float = 0.0) -> None:
    for i, key in enumerate(keys):
        p.insert(key, size, start + i)


# -- the registry ---------------------------------------------------------------------------------


def test_registry_names_every_policy_and_filter_combination() -> None:
    names = set(policy_names())
    assert set(BASES) <= names
    for base in BASES:
        assert {f"{base}+tinylfu", f"{base}+churnguard"} <= names


@pytest.mark.parametrize("name", policy_names())
def test_each_registered_policy_builds_and_is_named_as_registered(name: str) -> None:
    p = build(name, 1_000)
    assert isinstance(p, EvictionPolicy)
    assert p.name == name
    assert len(p) == 0 and p.total_size == 0 and p.oldest_last_used() is None


def test_filters_take_the_policy_parameters_and_their_own() -> None:
    p = make_policy("gdsf+tinylfu", capacity=100, size_exponent=0.5, sample_factor=4, seed=3)
    assert isinstance(p, TinyLFUAdmission) and isinstance(p.inner, GDSFPolicy)
    q = make_policy("s3fifo+churnguard", capacity=100, min_churn_age=60.0, small_ratio=0.2)
    assert isinstance(q, ChurnGuard) and isinstance(q.inner, S3FIFOPolicy)
    with pytest.raises(ValueError, match=r"missing a required (keyword-only )?argument: 'capacity'"):  # 3.11, 3.12
        make_policy("lru+churnguard")
    with pytest.raises(ValueError, match="unexpected keyword argument 'size_exponent'"):
        make_policy("lru+tinylfu", capacity=10, size_exponent=1.0)
    with pytest.raises(ValueError, match="bad parameters for eviction policy 'sieve'"):
        make_policy("sieve", capacity=10)


def test_bad_parameter_values() -> None:
    with pytest.raises(ValueError):
        GDSFPolicy(cost_floor=0.0)
    with pytest.raises(ValueError):
        GDSFPolicy(size_exponent=-1.0)
    with pytest.raises(ValueError):
        GDSFPolicy(freq_halflife=0.0)
    with pytest.raises(ValueError):
        S3FIFOPolicy(small_ratio=1.0)
    with pytest.raises(ValueError):
        S3FIFOPolicy(move_to_main_threshold=4)
    with pytest.raises(ValueError):
        ChurnGuard(LRUPolicy(), capacity=-1)
    with pytest.raises(ValueError):
        ChurnGuard(LRUPolicy(), capacity=10, min_churn_age=-1.0)
    with pytest.raises(ValueError):
        FrequencySketch(0)


@pytest.mark.parametrize("name", BASES)
def test_bad_arguments_are_rejected_like_lru(name: str) -> None:
    p = build(name, 100)
    with pytest.raises(ValueError):
        p.insert("a", -1, 1.0)
    with pytest.raises(ValueError):
        p.insert("a", 1, float("nan"))
    with pytest.raises(ValueError):
        p.insert("a", 1, 1.0, last_used=float("inf"))
    assert len(p) == 0 and p.total_size == 0
    p.insert("a", 1, 1.0)
    with pytest.raises(ValueError):
        p.resize("a", -3)
    with pytest.raises(ValueError):
        p.touch("a", float("nan"))


# -- the contract, for every registered policy ----------------------------------------------------

ops = st.lists(
    st.tuples(
        st.sampled_from(["load", "load", "hit", "hit", "hit", "unload", "resize", "probe"]),
        st.integers(0, 19),  # model
        st.integers(0, 300),  # size, or the need of a probe
        st.sampled_from([None, None, None, -HOUR, -6 * HOUR, 20.0]),  # recency offset of a load
    ),
    max_size=120,
)


def drive(name: str, script: list[tuple[str, int, int, float | None]], capacity: int,
          protected: set[str]) -> list[object]:
    """Drive a fresh policy the way the runtime does, checking the contract after every step; return
    what it decided, so that two runs can be compared."""
    p = build(name, capacity)
    ref: dict[str, list[float]] = {}  # key -> [size, last used]
    log: list[object] = []
    now = 0.0

    def check_victims(need: int, victims: list[str], extra_protected: set[str]) -> int:
        assert len(victims) == len(set(victims)), victims
        assert set(victims) <= set(ref)
        assert not set(victims) & (protected | extra_protected)
        freed = sum(int(ref[v][0]) for v in victims)
        if need <= 0:
            assert victims == []
        elif freed < need:  # could not free enough: every evictable key is proposed
            assert set(victims) == set(ref) - protected - extra_protected
        return freed

    for op, i, size, offset in script:
        now += 1.0
        key = f"m{i}"
        if op == "load" and key not in p:
            if not p.admit(key, size, now):
                log.append(("refused", key))
                continue
            need = p.total_size + size - capacity
            victims = p.victims(need, now, protected=protected)
            freed = check_victims(need, victims, set())
            log.append(("victims", key, victims))
            if p.total_size - freed + size > capacity:
                continue  # no room: the load is refused (RESOURCE_EXHAUSTED)
            for v in victims:
                p.remove(v)
                del ref[v]
            stamp = now if offset is None else now + offset
            p.insert(key, size, now, last_used=stamp, cost=float(size % 7))
            ref[key] = [size, stamp]
        elif op == "hit":
            p.touch(key, now)
            if key in ref:
                ref[key][1] = max(ref[key][1], now)
        elif op == "unload":
            p.remove(key)
            ref.pop(key, None)
        elif op == "resize" and key in ref:
            grow = size - int(ref[key][0])
            victims = p.victims(p.total_size + grow - capacity, now, protected=protected | {key})
            freed = check_victims(p.total_size + grow - capacity, victims, {key})
            if p.total_size - freed + grow > capacity:
                continue
            for v in victims:
                p.remove(v)
                del ref[v]
            p.resize(key, size)
            ref[key][0] = size
        elif op == "probe" and ref:
            victims = p.victims(size - 150, now, protected=protected)  # proposes, removes nothing
            check_victims(size - 150, victims, set())
            log.append(("probe", victims))
        assert len(p) == len(ref)
        assert p.total_size == sum(int(v[0]) for v in ref.values())
        assert p.total_size <= capacity
        assert all(k in p and p.size_of(k) == int(v[0]) for k, v in ref.items())
        assert p.oldest_last_used() == min((v[1] for v in ref.values()), default=None)
    return log


@pytest.mark.parametrize("name", policy_names())
@settings(deadline=None, max_examples=60)
@given(script=ops, capacity=st.integers(50, 800), pinned=st.sets(st.integers(0, 19), max_size=4))
def test_every_policy_keeps_the_contract_and_is_deterministic(
    name: str, script: list[tuple[str, int, int, float | None]], capacity: int, pinned: set[int]
) -> None:
    protected = {f"m{i}" for i in pinned}
    first = drive(name, script, capacity, protected)
    assert drive(name, script, capacity, protected) == first


@pytest.mark.parametrize("name", BASES)
def test_victims_do_not_remove_and_unknown_keys_are_ignored(name: str) -> None:
    p = build(name, 100)
    p.touch("x", 1.0)
    p.remove("x")
    p.resize("x", 5)
    fill(p, "abc")
    assert p.victims(0, 10.0) == [] and p.victims(-1, 10.0) == []
    v = p.victims(10, 10.0)
    assert len(v) == 1 and v[0] in p and len(p) == 3 and p.total_size == 30
    p.remove(v[0])
    p.remove(v[0])
    assert len(p) == 2 and p.total_size == 20


@pytest.mark.parametrize("name", BASES)
def test_reinsert_replaces_size(name: str) -> None:
    p = build(name, 100)
    fill(p, "ab")
    p.insert("a", 30, 5.0)
    assert len(p) == 2 and p.total_size == 40 and p.size_of("a") == 30


@pytest.mark.parametrize("name", ["gdsf", "s3fifo", "sieve"])
def test_a_model_registered_in_the_past_goes_first_until_used(name: str) -> None:
    # ModelMesh's registration offset: a burst of registrations cannot push out the models in use.
    p = build(name, 1_000)
    now = 10 * HOUR
    for i in range(5):
        p.insert(f"busy-{i}", 100, now - 60 + i)
        p.touch(f"busy-{i}", now - 30 + i)
    p.insert("registered", 100, now, last_used=now - HOUR)
    p.insert("registered-lazily", 100, now, last_used=now - 6 * HOUR)
    assert p.victims(1, now) == ["registered-lazily"]
    assert p.victims(150, now) == ["registered-lazily", "registered"]
    assert p.victims(1, now, protected={"registered-lazily"}) == ["registered"]
    assert p.oldest_last_used() == now - 6 * HOUR
    p.touch("registered-lazily", now + 1)  # used: now an ordinary entry
    assert p.victims(1, now + 1) == ["registered"]
    assert p.oldest_last_used() == now - HOUR


# -- GDSF -----------------------------------------------------------------------------------------


def test_gdsf_keeps_expensive_small_models_over_cheap_large_ones() -> None:
    p = GDSFPolicy()
    p.insert("cheap-large", 1_000, 1.0, cost=100.0)  # 0.1 ms per byte
    p.insert("expensive-small", 100, 2.0, cost=500.0)  # 5 ms per byte
    p.insert("middle", 500, 3.0, cost=500.0)  # 1 ms per byte
    assert p.victims(1, 4.0) == ["cheap-large"]
    assert p.victims(1_200, 4.0) == ["cheap-large", "middle"]
    # Plain LRU would have given up the oldest first.
    lru = LRUPolicy()
    lru.insert("expensive-small", 100, 1.0)
    lru.insert("cheap-large", 1_000, 2.0)
    assert lru.victims(1, 3.0) == ["expensive-small"]


def test_gdsf_priority_formula_and_inflation() -> None:
    p = GDSFPolicy()
    p.insert("a", 10, 0.0, cost=20.0)  # H = 0 + 1 * 20 / 10
    p.insert("b", 10, 0.0, cost=50.0)  # H = 5
    assert p.priority("a") == pytest.approx(2.0) and p.priority("b") == pytest.approx(5.0)
    p.touch("a", 1.0)
    p.touch("a", 2.0)  # freq 3: H = 6
    assert p.priority("a") == pytest.approx(6.0)
    assert p.victims(1, 3.0) == ["b"]
    p.remove("b")
    assert p.inflation == pytest.approx(5.0)  # L := H of the evicted
    p.insert("c", 10, 4.0, cost=20.0)  # enters at L + 2 = 7
    assert p.priority("c") == pytest.approx(7.0)
    assert p.victims(1, 5.0) == ["a"]  # a's 3 hits were before the aging: it is now the least worth
    # An unload that was not a proposed victim does not age the cache.
    p.remove("c")
    assert p.inflation == pytest.approx(5.0)


def test_gdsf_ages_out_a_model_whose_hits_stopped() -> None:
    p = GDSFPolicy()
    p.insert("old-hot", 10, 0.0, cost=10.0)
    for t in range(1, 20):
        p.touch("old-hot", float(t))  # H = 20
    for i in range(60):  # a stream of new models, each hit once: L climbs past 20
        key = f"new-{i}"
        victims = p.victims(10, 100.0 + i) if len(p) >= 3 else []
        for v in victims:
            p.remove(v)
        p.insert(key, 10, 100.0 + i, cost=10.0)
        p.touch(key, 100.5 + i)
        if "old-hot" not in p:
            break
    assert "old-hot" not in p


def test_gdsf_cost_floor_orders_zero_cost_entries_by_frequency_per_byte() -> None:
    p = GDSFPolicy(cost_floor=1.0)
    p.insert("big", 100, 0.0)  # cost 0: counted as 1
    p.insert("small", 10, 0.0)
    p.insert("hot-big", 100, 0.0)
    for t in range(20):
        p.touch("hot-big", 1.0 + t)
    assert p.victims(1, 30.0) == ["big"]
    assert p.victims(101, 30.0) == ["big", "small"]


def test_gdsf_size_exponent_zero_ignores_size() -> None:
    p = GDSFPolicy(size_exponent=0.0)
    p.insert("large", 1_000_000, 0.0, cost=10.0)
    p.insert("small", 1, 1.0, cost=5.0)
    assert p.victims(1, 2.0) == ["small"]
    q = GDSFPolicy(size_exponent=1.0)
    q.insert("large", 1_000_000, 0.0, cost=10.0)
    q.insert("small", 1, 1.0, cost=5.0)
    assert q.victims(1, 2.0) == ["large"]


def test_gdsf_frequency_decays_with_a_halflife() -> None:
    p = GDSFPolicy(freq_halflife=10.0)
    p.insert("a", 1, 0.0, cost=1.0)
    p.touch("a", 0.0)  # freq 2
    p.touch("a", 10.0)  # 2 halves to 1, plus this hit: 2
    assert p.priority("a") == pytest.approx(2.0)
    p.touch("a", 10.0)  # no time passed: 3
    assert p.priority("a") == pytest.approx(3.0)


def test_gdsf_equal_priorities_go_least_recently_touched_first() -> None:
    p = GDSFPolicy()
    fill(p, "abc")
    assert p.victims(25, 5.0) == ["a", "b", "c"]
    p.touch("a", 6.0)
    p.touch("b", 6.0)
    p.touch("c", 6.0)
    p.touch("a", 7.0)
    assert p.victims(1, 8.0) == ["b"]


def test_gdsf_protected_keys_keep_their_place_and_resize_reprices() -> None:
    p = GDSFPolicy()
    p.insert("a", 10, 0.0, cost=10.0)  # H = 1
    p.insert("b", 10, 0.0, cost=20.0)  # H = 2
    p.insert("c", 10, 0.0, cost=30.0)  # H = 3
    assert p.victims(15, 1.0, protected={"a"}) == ["b", "c"]
    assert p.victims(1, 1.0) == ["a"]
    p.resize("c", 100)  # measured larger: 30 / 100 per byte, now the cheapest to lose
    assert p.priority("c") == pytest.approx(0.3)
    assert p.victims(1, 1.0) == ["c"] and p.total_size == 120


def test_gdsf_heap_stays_bounded_under_many_hits() -> None:
    p = GDSFPolicy()
    fill(p, "abcde")
    for t in range(10_000):
        p.touch("abcde"[t % 5], 10.0 + t)
    assert len(p._heap) <= 2 * len(p) + 64 + 1
    assert p.victims(1, 20_000.0) == ["a"]


# -- SIEVE ----------------------------------------------------------------------------------------


def sieve_replay(p: SievePolicy, trace: str, capacity: int) -> str:
    """Replay single-letter keys of size 1; return the hit (H) / miss (m) string."""
    out = []
    for t, key in enumerate(trace):
        if key in p:
            p.touch(key, float(t))
            out.append("H")
            continue
        out.append("m")
        for v in p.victims(len(p) + 1 - capacity, float(t)):
            p.remove(v)
        p.insert(key, 1, float(t))
    return "".join(out)


def test_sieve_worked_example() -> None:
    p = SievePolicy()
    fill(p, "ABC", size=1)  # queue, tail to head: A B C
    p.touch("A", 5.0)
    # The hand starts at the tail: A was visited (cleared, passed over), B was not: B goes.
    assert p.victims(1, 6.0) == ["B"]
    assert p.visited("A") is False
    p.remove("B")
    p.insert("D", 1, 6.0)  # queue: A C D; the hand moved on to C
    assert p.victims(1, 7.0) == ["C"]
    p.remove("C")
    p.insert("E", 1, 7.0)  # queue: A D E; the hand at D
    p.touch("D", 8.0)
    p.touch("E", 8.0)
    # D and E visited: cleared; the hand wraps to the tail and finds A, not visited since its pass.
    assert p.victims(1, 9.0) == ["A"]
    assert (p.visited("D"), p.visited("E")) == (False, False)


def test_sieve_keeps_a_hot_key_through_a_scan_that_lru_loses() -> None:
    trace = "A" + "".join(f"{c}A" for c in "BCD") + "EFGHIJ" + "A"
    lru = LRUPolicy()
    out_lru = []
    for t, key in enumerate(trace):
        if key in lru:
            lru.touch(key, float(t))
            out_lru.append("H")
            continue
        out_lru.append("m")
        for v in lru.victims(len(lru) + 1 - 3, float(t)):
            lru.remove(v)
        lru.insert(key, 1, float(t))
    assert sieve_replay(SievePolicy(), trace, 3)[-1] == "H"
    assert out_lru[-1] == "m"


def test_sieve_protected_keys_are_passed_over_with_their_bit() -> None:
    p = SievePolicy()
    fill(p, "abc", size=1)
    p.touch("a", 5.0)
    assert p.victims(1, 6.0, protected={"a", "b"}) == ["c"]
    assert p.visited("a") is True  # untouched
    assert p.victims(3, 6.0, protected={"c"}) == ["b", "a"]  # a's bit cleared on the first sweep


def test_sieve_future_stamped_copy_survives_one_sweep() -> None:
    p = SievePolicy()
    p.insert("copy", 1, 0.0, last_used=20.0)
    p.insert("b", 1, 1.0)
    assert p.victims(1, 2.0) == ["b"]


def test_sieve_compaction_keeps_the_order_and_the_hand() -> None:
    p = SievePolicy()
    keys = [f"k{i}" for i in range(300)]
    for t, key in enumerate(keys):
        p.insert(key, 1, float(t))
    for key in keys[:250]:
        p.touch(key, 400.0)
    for key in keys[:220]:  # tombstones outnumber live entries: compacted
        p.remove(key)
    assert len(p._queue) < 300
    # The hand followed the removals to k220; k220 ... k249 were hit: the first unvisited is k250.
    assert p.victims(2, 500.0) == ["k250", "k251"]
    assert all(p.visited(k) is False for k in keys[220:250])


# -- S3-FIFO --------------------------------------------------------------------------------------


def s3_load(p: S3FIFOPolicy, key: str, t: float, capacity: int = 20) -> list[str]:
    assert p.admit(key, 1, t)
    victims = p.victims(p.total_size + 1 - capacity, t)
    for v in victims:
        p.remove(v)
    p.insert(key, 1, t)
    return victims


MAIN = [f"m{i}" for i in range(18)]


def s3_full() -> S3FIFOPolicy:
    """Capacity 20 (S's share 2, M's 18, G's 18), filled with a, b, m0 ... m17 at t = 0 ... 19."""
    p = S3FIFOPolicy(capacity=20)
    for t, key in enumerate(["a", "b", *MAIN]):
        assert s3_load(p, key, float(t)) == []
    return p


def test_s3fifo_worked_example() -> None:
    p = s3_full()
    # Before the first eviction, S fills to its share and the rest enters M.
    assert p.queue_of("a") == "small" and p.queue_of("b") == "small" and p.queue_of("m0") == "main"
    # M is not over its share: evict from S. a was never hit: out, and into the ghost queue.
    assert s3_load(p, "x", 20.0) == ["a"]
    assert p.queue_of("a") == "ghost" and p.queue_of("x") == "small"
    # a comes back soon: straight into M; b (S's oldest, not hit) makes room and is remembered.
    assert s3_load(p, "a", 21.0) == ["b"]
    assert p.queue_of("a") == "main" and p.queue_of("b") == "ghost"
    # M now holds 19 > 18: evict from M's tail. m0, hit once, goes back with its counter spent; m1 goes.
    p.touch("m0", 22.0)
    assert s3_load(p, "y", 23.0) == ["m1"]
    assert p.queue_of("m1") is None  # evicted from M: not remembered
    assert p.queue_of("m0") == "main"
    # M is back at its share: S again. x is S's oldest, never hit.
    assert s3_load(p, "z", 24.0) == ["x"]


def test_s3fifo_promotes_an_entry_hit_twice_in_small() -> None:
    p = s3_full()
    p.touch("a", 20.0)
    p.touch("a", 21.0)
    # a, hit twice, moves to M on the way (counter reset); b, never hit, is evicted from S.
    assert s3_load(p, "x", 22.0) == ["b"]
    assert p.queue_of("a") == "main"
    # M holds 19 now: the next eviction takes its oldest, m0.
    assert s3_load(p, "y", 23.0) == ["m0"]
    # One hit in S is not enough (the threshold is 2, as in the paper's pseudocode).
    q = s3_full()
    q.touch("a", 20.0)
    assert s3_load(q, "x", 21.0) == ["a"]


def test_s3fifo_one_hit_wonders_do_not_disturb_main() -> None:
    p = s3_full()
    for i in range(100):  # a sweep of cold models passes through S only
        s3_load(p, f"cold-{i}", 20.0 + i)
    assert all(p.queue_of(k) == "main" for k in MAIN)


def test_s3fifo_protected_keys_keep_their_counter_and_place() -> None:
    p = s3_full()
    p.touch("a", 20.0)
    p.touch("a", 21.0)  # a in S, hit twice
    assert p.victims(1, 22.0, protected={"a", "b"}) == ["m0"]  # nothing evictable in S: M gives m0
    assert p.queue_of("a") == "small"
    assert p.victims(1, 22.0) == ["b"]  # unprotected, a earns M on the way and b goes
    assert p.queue_of("a") == "main"


def test_s3fifo_without_capacity_uses_the_largest_total_seen() -> None:
    p = S3FIFOPolicy()
    for t in range(20):
        p.insert(f"k{t}", 1, float(t))
    assert len(p.victims(3, 30.0)) == 3


# -- TinyLFU --------------------------------------------------------------------------------------


def test_tinylfu_refuses_a_one_hit_wonder_over_a_hot_entry() -> None:
    p = TinyLFUAdmission(LRUPolicy(), capacity=20, expected_entries=16)
    assert p.admit("hot", 10, 0.0)
    p.insert("hot", 10, 0.0)
    assert p.admit("warm", 10, 1.0)
    p.insert("warm", 10, 1.0)
    for t in range(5):
        p.touch("hot", 2.0 + t)
        p.touch("warm", 2.5 + t)
    p.touch("warm", 10.0)  # hot is now the LRU victim, requested 6 times
    assert p.victims(10, 11.0) == ["hot"]
    assert not p.admit("one-hit-wonder", 10, 11.0)
    assert p.refused == 1 and "hot" in p
    # Requested again and again, the newcomer out-counts the victim and gets in.
    admitted = [p.admit("rising", 10, 12.0 + t) for t in range(10)]
    assert admitted.index(True) > 0
    assert p.frequency("rising") > p.frequency("hot")


def test_tinylfu_admits_whatever_fits_and_compares_with_every_victim() -> None:
    p = TinyLFUAdmission(LRUPolicy(), capacity=30, expected_entries=16)
    for t, key in enumerate("ab"):
        assert p.admit(key, 10, float(t))
        p.insert(key, 10, float(t))
    assert p.admit("new", 10, 2.0)  # fits in the free bytes: no contest
    p.insert("new", 10, 2.0)
    for t in range(3):
        p.touch("b", 3.0 + t)
    p.touch("new", 6.0)
    assert p.victims(20, 7.0) == ["a", "b"]  # big would displace a (1 request) and b (4)
    assert [p.admit("big", 20, 10.0 + t) for t in range(5)] == [False, False, False, False, True]
    assert p.refused == 4  # 1 to 3 requests beat a's 1 but not b's 4; 4 ties; 5 beats both


def test_frequency_sketch_counts_halves_and_uses_a_doorkeeper() -> None:
    s = FrequencySketch(64, sample_factor=10, seed=7)
    assert s.width == 256 and s.sample_size == 640
    s.record("a")
    assert s.estimate("a") == 1  # the doorkeeper only
    assert s._table.count(0) == len(s._table)  # no counter moved for the first request
    for _ in range(9):
        s.record("a")
    assert s.estimate("a") == 10
    for _ in range(20):
        s.record("a")
    assert s.estimate("a") == 16  # 15 (saturated) + the doorkeeper
    for i in range(640 - 30):
        s.record(f"other-{i}")
    assert s.resets == 1
    assert s.estimate("a") == 7  # halved, doorkeeper cleared
    assert s.estimate("never") <= 1


@settings(deadline=None, max_examples=30)
@given(keys=st.lists(st.integers(0, 50), max_size=300), seed=st.integers(0, 3))
def test_frequency_sketch_never_undercounts_within_a_sample(keys: list[int], seed: int) -> None:
    s = FrequencySketch(256, seed=seed)  # a sample of 2,560 requests: no reset here
    counts: dict[int, int] = {}
    for k in keys:
        s.record(f"k{k}")
        counts[k] = counts.get(k, 0) + 1
    for k, c in counts.items():
        assert s.estimate(f"k{k}") >= min(c, 16)


def test_frequency_sketch_is_deterministic_across_instances() -> None:
    a, b = FrequencySketch(16, seed=1), FrequencySketch(16, seed=1)
    for i in range(500):
        a.record(f"m{i % 37}")
        b.record(f"m{i % 37}")
    assert [a.estimate(f"m{i}") for i in range(60)] == [b.estimate(f"m{i}") for i in range(60)]


def test_tinylfu_sizes_its_sketch_from_the_cache_when_not_told() -> None:
    p = TinyLFUAdmission(LRUPolicy(), capacity=100)
    for t in range(100):
        key = f"k{t}"
        if p.admit(key, 1, float(t)):
            p.insert(key, 1, float(t))
    assert p.admit("one-more", 1, 200.0) in (True, False)
    assert p.sketch.width >= 4 * 100


# -- churn guard ----------------------------------------------------------------------------------


def test_churn_guard_refuses_while_the_oldest_model_is_young() -> None:
    p = ChurnGuard(LRUPolicy(), capacity=30, min_churn_age=300.0)
    for t, key in enumerate("abc"):
        assert p.admit(key, 10, float(t))  # fits: always admitted
        p.insert(key, 10, float(t))
    assert not p.admit("d", 10, 100.0)  # full, and a was used 100 s ago
    assert p.refused == 1
    assert p.admit("d", 10, 300.0)  # a is 300 s old: churn is acceptable now
    for key in "abc":
        p.touch(key, 400.0)
    assert not p.admit("d", 10, 500.0)  # every model used 100 s ago
    assert p.refused == 2


def test_churn_guard_age_is_the_oldest_last_use() -> None:
    p = ChurnGuard(LRUPolicy(), capacity=20, min_churn_age=60.0)
    p.insert("a", 10, 100.0)
    p.insert("b", 10, 100.0)
    assert not p.admit("c", 10, 159.0)
    assert p.admit("c", 10, 160.0)
    assert p.admit("small", 0, 120.0)  # fits in the free bytes
    # A model registered "an hour ago" is old at once: loads may displace it.
    p.remove("b")
    p.insert("registered", 10, 150.0, last_used=150.0 - HOUR)
    assert p.admit("c", 10, 150.0)


def test_churn_guard_and_tinylfu_wrap_any_policy() -> None:
    for base in BASES:
        p = build(f"{base}+churnguard", 20, min_churn_age=60.0)
        p.insert("a", 10, 0.0)
        p.insert("b", 10, 0.0)
        assert not p.admit("c", 10, 30.0)
        assert p.admit("c", 10, 90.0)


def test_tinylfu_hands_its_proposal_to_the_callers_next_victims_call() -> None:
    """admit() asks the wrapped policy for victims; the caller's victims() with the same arguments right
    after gets that list without a second walk, and anything else in between makes it walk again."""
    calls: list[int] = []

    class Counting(LRUPolicy):
        def victims(self, need: int, now: float, *, protected: Container[str] = ()) -> list[str]:
            calls.append(need)
            return super().victims(need, now, protected=protected)

    p = TinyLFUAdmission(Counting(), capacity=30)
    for i, key in enumerate("abc"):
        p.insert(key, 10, float(i))
    assert p.admit("d", 10, 5.0)  # "a" was never counted, so "d" (counted once) beats it
    assert calls == [10]
    assert p.victims(10, 5.0) == ["a"] and calls == [10]  # handed over, no second walk
    assert p.victims(10, 5.0) == ["a"] and calls == [10, 10]  # used once only
    assert p.admit("e", 10, 6.0)
    p.touch("b", 6.0)
    assert p.victims(10, 6.0) == ["a"] and calls == [10, 10, 10, 10]  # a touch in between: walk again
    assert p.admit("f", 10, 7.0)
    assert p.victims(10, 7.0, protected={"a"}) == ["c"] and len(calls) == 6  # other arguments: walk again
