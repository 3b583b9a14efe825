"""LRU by explicit timestamps: order, past insertion, protection, byte accounting, and the registry."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from placement.lru import LRUPolicy
from placement.policy import EvictionPolicy
from placement.registry import make_policy, policy_names

HOUR = 3600.0


def all_in_order(p: LRUPolicy) -> list[str]:
    return p.victims(p.total_size + 1, 0.0)


# -- examples -------------------------------------------------------------------------------------


def test_victims_follow_last_use() -> None:
    p = LRUPolicy()
    for i, key in enumerate("abcd"):
        p.insert(key, 10, now=100.0 + i)
    p.touch("a", 200.0)
    assert all_in_order(p) == ["b", "c", "d", "a"]
    assert p.victims(15, 201.0) == ["b", "c"]
    assert p.victims(10, 201.0) == ["b"]
    assert p.oldest_last_used() == 101.0


def test_need_of_zero_or_less_evicts_nothing() -> None:
    p = LRUPolicy()
    p.insert("a", 10, 1.0)
    assert p.victims(0, 2.0) == []
    assert p.victims(-5, 2.0) == []


def test_entry_inserted_in_the_past_goes_first() -> None:
    # ModelMesh's registration offset: a model registered with loadNow enters "1 h ago", so a burst
    # of registrations cannot push out the models in use.
    p = LRUPolicy()
    now = 10 * HOUR
    for i in range(5):
        p.insert(f"busy-{i}", 100, now=now - 60 + i)
    p.insert("registered", 100, now=now, last_used=now - HOUR)
    p.insert("registered-lazily", 100, now=now, last_used=now - 6 * HOUR)
    assert p.victims(1, now) == ["registered-lazily"]
    assert p.victims(150, now) == ["registered-lazily", "registered"]
    assert p.oldest_last_used() == now - 6 * HOUR
    # Once used, it is the newest.
    p.touch("registered-lazily", now + 1)
    assert all_in_order(p)[-1] == "registered-lazily"
    assert all_in_order(p)[0] == "registered"


def test_future_stamped_copy_outlives_current_hits_and_recency_never_goes_back() -> None:
    # A scale-out copy is stamped 20 s ahead so that it survives until traffic reaches it.
    p = LRUPolicy()
    p.insert("a", 1, now=100.0)
    p.insert("copy", 1, now=100.0, last_used=120.0)
    p.insert("b", 1, now=101.0)
    assert all_in_order(p) == ["a", "b", "copy"]
    p.touch("a", 110.0)
    assert all_in_order(p) == ["b", "a", "copy"]
    p.touch("copy", 105.0)  # a hit earlier than its stamp keeps the stamp
    assert p.last_used("copy") == 120.0
    p.touch("b", 130.0)
    assert all_in_order(p) == ["a", "copy", "b"]


def test_equal_timestamps_order_by_operation() -> None:
    p = LRUPolicy()
    p.insert("a", 1, now=5.0)
    p.insert("b", 1, now=5.0)
    p.insert("c", 1, now=1.0, last_used=5.0)
    assert all_in_order(p) == ["a", "b", "c"]
    p.touch("a", 5.0)
    assert all_in_order(p) == ["b", "c", "a"]


def test_protected_keys_are_skipped_and_keep_their_place() -> None:
    p = LRUPolicy()
    for i, key in enumerate("abcd"):
        p.insert(key, 10, now=float(i))
    assert p.victims(20, 10.0, protected={"a", "c"}) == ["b", "d"]
    assert p.victims(1, 10.0, protected={"a"}) == ["b"]
    assert p.victims(10, 10.0) == ["a"]


def test_not_enough_evictable_bytes_returns_everything_evictable() -> None:
    p = LRUPolicy()
    for i, key in enumerate("abc"):
        p.insert(key, 10, now=float(i))
    assert p.victims(1000, 10.0, protected={"b"}) == ["a", "c"]
    assert p.victims(1000, 10.0, protected={"a", "b", "c"}) == []


def test_victims_do_not_remove() -> None:
    p = LRUPolicy()
    p.insert("a", 10, 1.0)
    assert p.victims(10, 2.0) == ["a"]
    assert "a" in p and len(p) == 1 and p.total_size == 10


def test_resize_accounting() -> None:
    p = LRUPolicy()
    p.insert("a", 1_000, 1.0)  # predicted
    p.insert("b", 1_000, 2.0)
    assert p.total_size == 2_000
    p.resize("a", 5_000)  # measured after the load
    assert p.total_size == 6_000
    assert p.victims(4_000, 3.0) == ["a"]  # the new size counts towards need
    p.resize("a", 10)
    assert p.victims(500, 3.0) == ["a", "b"]
    p.remove("a")
    assert p.total_size == 1_000
    p.resize("gone", 7)  # unknown: ignored
    assert p.total_size == 1_000 and "gone" not in p


def test_reinsert_replaces_size_and_recency() -> None:
    p = LRUPolicy()
    p.insert("a", 10, 1.0)
    p.insert("b", 10, 2.0)
    p.insert("a", 30, 3.0)
    assert len(p) == 2 and p.total_size == 40
    assert all_in_order(p) == ["b", "a"]
    p.insert("a", 30, 4.0, last_used=0.0)
    assert all_in_order(p) == ["a", "b"]


def test_unknown_keys_are_ignored_and_remove_is_idempotent() -> None:
    p = LRUPolicy()
    p.touch("x", 1.0)
    p.remove("x")
    p.insert("a", 5, 1.0)
    p.remove("a")
    p.remove("a")
    assert len(p) == 0 and p.total_size == 0 and p.oldest_last_used() is None


def test_bad_arguments() -> None:
    p = LRUPolicy()
    with pytest.raises(ValueError):
        p.insert("a", -1, 1.0)
    with pytest.raises(ValueError):
        p.insert("a", 1, float("nan"))
    with pytest.raises(ValueError):
        p.insert("a", 1, 1.0, last_used=float("inf"))
    p.insert("a", 1, 1.0)
    with pytest.raises(ValueError):
        p.resize("a", -3)
    with pytest.raises(ValueError):
        p.touch("a", float("nan"))


def test_lru_admits_everything() -> None:
    assert LRUPolicy().admit("a", 10**15, 0.0)


# -- the registry ---------------------------------------------------------------------------------


def test_make_policy_by_name() -> None:
    p = make_policy("lru")
    assert isinstance(p, LRUPolicy)
    assert isinstance(p, EvictionPolicy)
    assert p.name == "lru"
    assert "lru" in policy_names()


def test_unknown_policy_lists_known_names() -> None:
    with pytest.raises(ValueError, match=r"unknown eviction policy 'lfu'.*lru"):
        make_policy("lfu")


def test_unexpected_parameters_are_a_value_error() -> None:
    with pytest.raises(ValueError, match="bad parameters for eviction policy 'lru'"):
        make_policy("lru", capacity=10)


# -- properties -----------------------------------------------------------------------------------

KEYS = st.sampled_from([f"m{i}" for i in range(12)])
SIZES = st.integers(0, 40)
TIMES = st.floats(0.0, 1_000.0, allow_nan=False)


class LRUMatchesReference(RuleBasedStateMachine):
    """Any sequence of operations, at any timestamps, gives the order of a plain sorted reference."""

    def __init__(self) -> None:
        super().__init__()
        self.p = LRUPolicy()
        self.seq = 0
        self.ref: dict[str, tuple[float, int, int]] = {}  # key -> (last_used, seq, size)

    def order(self) -> list[str]:
        return sorted(self.ref, key=lambda k: self.ref[k][:2])

    @rule(key=KEYS, size=SIZES, now=TIMES, past=st.none() | TIMES)
    def insert(self, key: str, size: int, now: float, past: float | None) -> None:
        self.p.insert(key, size, now, last_used=past)
        self.seq += 1
        self.ref[key] = (now if past is None else past, self.seq, size)

    @rule(key=KEYS, now=TIMES)
    def touch(self, key: str, now: float) -> None:
        self.p.touch(key, now)
        if key in self.ref:
            last, _, size = self.ref[key]
            self.seq += 1
            self.ref[key] = (max(last, now), self.seq, size)

    @rule(key=KEYS, size=SIZES)
    def resize(self, key: str, size: int) -> None:
        self.p.resize(key, size)
        if key in self.ref:
            self.ref[key] = (*self.ref[key][:2], size)

    @rule(key=KEYS)
    def remove(self, key: str) -> None:
        self.p.remove(key)
        self.ref.pop(key, None)

    @precondition(lambda self: bool(self.ref))
    @rule(need=st.integers(-5, 300), protected=st.sets(KEYS, max_size=4))
    def victims(self, need: int, protected: set[str]) -> None:
        got = self.p.victims(need, 0.0, protected=protected)
        expected: list[str] = []
        freed = 0
        for key in self.order():
            if need <= 0 or freed >= need:
                break
            if key not in protected:
                expected.append(key)
                freed += self.ref[key][2]
        assert got == expected
        assert not set(got) & protected

    @invariant()
    def same_state(self) -> None:
        assert len(self.p) == len(self.ref)
        assert self.p.total_size == sum(v[2] for v in self.ref.values())
        assert all_in_order(self.p) == self.order()
        oldest = min((v[0] for v in self.ref.values()), default=None)
        assert self.p.oldest_last_used() == oldest


TestLRUMatchesReference = LRUMatchesReference.TestCase
TestLRUMatchesReference.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


ops = st.lists(
    st.tuples(
        st.sampled_from(["load", "hit", "unload", "resize"]),
        st.integers(0, 29),  # model
        st.integers(1, 400),  # size
        st.sampled_from([None, -HOUR, -6 * HOUR, 20.0]),  # recency offset of a load
    ),
    max_size=200,
)


@settings(deadline=None)
@given(ops=ops, capacity=st.integers(100, 1_000), pinned=st.sets(st.integers(0, 29), max_size=5))
def test_a_cache_that_evicts_victims_first_never_exceeds_capacity(
    ops: list[tuple[str, int, int, float | None]], capacity: int, pinned: set[int]
) -> None:
    """Drive a cache the way the runtime will: make room with ``victims`` before each load."""
    p = LRUPolicy()
    protected = {f"m{i}" for i in pinned}
    now = 0.0
    for op, i, size, offset in ops:
        now += 1.0
        key = f"m{i}"
        if op == "load" and key not in p:
            victims = p.victims(p.total_size + size - capacity, now, protected=protected)
            assert not set(victims) & protected
            if p.total_size - sum(_size_of(p, v) for v in victims) + size > capacity:
                continue  # not enough evictable bytes: the load is refused (RESOURCE_EXHAUSTED)
            for v in victims:
                p.remove(v)
            p.insert(key, size, now, last_used=None if offset is None else now + offset)
        elif op == "hit":
            p.touch(key, now)
        elif op == "unload":
            p.remove(key)
        elif op == "resize" and key in p:
            # A measured size may only grow into free room: the runtime evicts first, like a load.
            grow = size - _size_of(p, key)
            victims = p.victims(p.total_size + grow - capacity, now, protected=protected | {key})
            if p.total_size - sum(_size_of(p, v) for v in victims) + grow > capacity:
                continue
            for v in victims:
                p.remove(v)
            p.resize(key, size)
        assert p.total_size <= capacity


def _size_of(p: LRUPolicy, key: str) -> int:
    size = p.size_of(key)
    assert size is not None
    return size
