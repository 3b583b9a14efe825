"""The decision kernel (placement.kernel): each decision on hand-built inputs, and the router, the runtime
and the cluster simulator deciding with it (the same view gives the same copy and the same home)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.registry.keys import Keys
from mesh.registry.records import LOADED, LOADING, DeviceUsage, InstanceRecord, ModelSpec, PlacementRecord
from mesh.router import replicas, routing
from mesh.router.view import ClusterView
from mesh.runtime import cache
from placement import cluster, kernel
from placement.admission import ChurnGuard
from placement.cluster import _Cluster, _Node, instance_names
from placement.hashing import copy_order, rendezvous_order
from placement.kernel import (
    COPY_LEAVING,
    COPY_LOADED,
    COPY_LOADING,
    REFUSED_AGE_S,
    admission,
    choose_copy,
    copy_targets,
    least_busy,
    make_room,
    pool_room,
)
from placement.lru import LRUPolicy

NAMES = [f"n{i}" for i in range(8)]


def _states(states: dict[str, int]) -> tuple[dict[str, int], dict[str, str], object]:
    """Copies whose record is already the kernel's rank, on hosts that all exist."""
    return states, {n: n for n in states}, lambda state, host: state


# -- copy choice ------------------------------------------------------------------------------------


def test_loaded_before_leaving_before_loading() -> None:
    rng = random.Random(0)
    copies, hosts, state_of = _states({"a": COPY_LOADING, "b": COPY_LEAVING, "c": COPY_LOADED})
    assert choose_copy(copies, hosts, state_of, {}, rng) == ("c", COPY_LOADED)
    del copies["c"]
    assert choose_copy(copies, hosts, state_of, {}, rng) == ("b", COPY_LEAVING)
    del copies["b"]
    assert choose_copy(copies, hosts, state_of, {}, rng) == ("a", COPY_LOADING)
    del copies["a"]
    assert choose_copy(copies, hosts, state_of, {}, rng) is None


def test_fewest_in_flight_first_on_a_tie() -> None:
    copies, hosts, state_of = _states(dict.fromkeys("abc", COPY_LOADED))
    rng = random.Random(0)
    assert choose_copy(copies, hosts, state_of, {"a": 3, "b": 1, "c": 1}, rng) == ("b", COPY_LOADED)
    assert choose_copy(copies, hosts, state_of, {}, rng) == ("a", COPY_LOADED)  # all idle: the first


def test_excluded_unreachable_unknown_and_unusable_copies_are_skipped() -> None:
    copies = {"a": COPY_LOADED, "b": COPY_LOADED, "c": COPY_LOADED, "d": COPY_LOADED, "e": COPY_LOADING}
    hosts = {"a": "a", "b": "b", "d": "d", "e": "e"}  # no record of "c"
    unusable = {"d"}

    def state_of(state: int, host: str) -> int | None:
        return None if host in unusable else state

    rng = random.Random(0)
    got = choose_copy(copies, hosts, state_of, {}, rng, exclude={"a"}, unreachable={"b"})
    assert got == ("e", COPY_LOADING)  # a tried, b unreachable, c unknown, d unusable


def test_more_than_four_copies_compare_two_drawn_with_the_rng() -> None:
    ids = NAMES[:6]
    inflight = {n: i for i, n in enumerate(ids)}
    for seed in range(20):
        drawn = random.Random(seed).sample(ids, 2)
        assert least_busy(list(ids), inflight, random.Random(seed)) == min(drawn, key=inflight.__getitem__)
    # Four or fewer: every copy is compared, the rng is not used.
    rng = random.Random(1)
    state = rng.getstate()
    assert least_busy(ids[:4], inflight, rng) == ids[0]
    assert rng.getstate() == state


# -- scale-out target -------------------------------------------------------------------------------


def test_copy_targets_follow_the_rendezvous_order_without_busy_instances() -> None:
    order = rendezvous_order("m", NAMES)
    assert copy_targets("m", NAMES, 2) == order[:2]
    assert copy_targets("m", NAMES, 2, busy={order[0]}) == order[1:3]
    assert copy_targets("m", NAMES, 100, busy=set(order[:6])) == order[6:]
    assert copy_targets("m", NAMES, 0) == [] and copy_targets("m", NAMES, -1) == []
    assert copy_targets("m", NAMES, 3) == copy_order("m", NAMES)[:3]


# -- admission and eviction -------------------------------------------------------------------------


def test_admission_refused_model_enters_first_to_go() -> None:
    policy = ChurnGuard(LRUPolicy(), capacity=20, min_churn_age=300.0)
    policy.insert("old", 20, 0.0)
    assert admission(policy, "new", 10, 10.0) == (False, 10.0 - REFUSED_AGE_S)  # full, oldest too young
    assert admission(policy, "new", 10, 10.0, last_used=5.0) == (True, 5.0)  # asked ahead: not filtered
    assert admission(policy, "new", 10, 1000.0) == (True, None)
    assert admission(LRUPolicy(), "x", 1, 0.0) == (True, None)


def test_admission_counts_the_room_other_loads_hold() -> None:
    """A load that starts while another one is loading: the other's reservation is not in the policy,
    and the filter must not take it for free room (it did: half the newcomers went unjudged)."""
    policy = ChurnGuard(LRUPolicy(), capacity=30, min_churn_age=300.0)
    policy.insert("old", 10, 0.0)  # 10 of 30 in the policy; another load holds 10 more
    assert admission(policy, "new", 10, 10.0) == (True, None)  # as the policy alone sees it, it fits
    assert admission(policy, "new", 10, 10.0, held=10) == (True, None)  # 30 of 30: still fits
    assert admission(policy, "new", 15, 10.0, held=10) == (False, 10.0 - REFUSED_AGE_S)  # needs "old" out


def test_make_room_names_the_policys_victims_and_says_whether_they_suffice() -> None:
    policy = LRUPolicy()
    for i, key in enumerate("abc"):
        policy.insert(key, 10, float(i))
    assert make_room(policy, 10, used=30, capacity=40, now=9.0) == ([], True)  # fits
    assert make_room(policy, 15, used=30, capacity=40, now=9.0) == (["a"], True)
    assert make_room(policy, 25, used=30, capacity=40, now=9.0, protected={"a"}) == (["b", "c"], True)
    room = make_room(policy, 35, used=30, capacity=40, now=9.0, protected={"a"})
    assert room.victims == ["b", "c"] and not room.enough  # "a" holds the rest
    # Bytes already draining count as on their way out: no second eviction for the same room.
    assert make_room(policy, 15, used=40, capacity=40, now=9.0, freeing=10) == (["a"], True)
    assert make_room(policy, 10, used=40, capacity=40, now=9.0, freeing=10) == ([], True)
    assert len(policy) == 3  # proposes only: the caller removes


def test_pool_room_drops_the_least_recently_used_unprotected_copies_or_nothing() -> None:
    sizes = {"a": 40, "b": 30, "c": 30}
    assert pool_room(sizes, sizes, 20, used=60, capacity=100) == ([], True)  # fits as it is
    assert pool_room(sizes, sizes, 50, used=100, capacity=100) == (["a", "b"], True)
    assert pool_room(sizes, sizes, 50, used=100, capacity=100, protected={"a"}) == (["b", "c"], True)
    # Not enough even with every unprotected copy gone: nothing is dropped for nothing.
    assert pool_room(sizes, sizes, 90, used=100, capacity=100, protected={"a"}) == ([], False)
    assert pool_room({}, {}, 101, used=0, capacity=100) == ([], False)  # larger than the room


# -- the router, the runtime and the simulator decide with the kernel -------------------------------


def test_every_caller_uses_the_kernels_functions() -> None:
    assert routing.choose_copy is kernel.choose_copy is cluster.choose_copy
    assert routing.choose_home is kernel.choose_home is cluster.choose_home
    assert replicas.copy_targets is kernel.copy_targets is cluster.copy_targets
    assert cache.make_room is kernel.make_room is cluster.make_room
    assert cache.admission is kernel.admission is cluster.admission
    assert cache.pool_room is kernel.pool_room is cluster.pool_room


def _view(names: list[str], capacity: int) -> ClusterView:
    view = ClusterView(Keys())
    for i, name in enumerate(names):
        view.instances[name] = InstanceRecord(instance_id=name, endpoint=f"127.0.0.1:{1000 + i}",
                                              devices=(DeviceUsage("ram", capacity, 0),))
    return view


def _sim(names: list[str], capacity: int, seed: int) -> _Cluster:
    nodes = [_Node(i, name, LRUPolicy(), capacity) for i, name in enumerate(names)]
    return _Cluster(nodes, load_slots=2, load_factor=1.25, scaling=None, refused="first-to-go", seed=seed)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 8), data=st.data(), seed=st.integers(0, 1000))
def test_same_view_same_copy_in_the_router_and_the_simulator(n: int, data: st.DataObject, seed: int) -> None:
    names = instance_names(n)
    view, sim = _view(names, 1000), _sim(names, 1000, seed)
    holders = data.draw(st.lists(st.sampled_from(names), unique=True))
    for name in holders:
        state = data.draw(st.sampled_from([LOADED, LOADING]))
        view.placements.setdefault("m", {})[name] = PlacementRecord("m", name, state)
        sim.copies.setdefault("m", {})[name] = COPY_LOADED if state == LOADED else COPY_LOADING
    for name in names:
        view.inflight[name] = sim.inflight[name] = data.draw(st.integers(0, 3))
    target = routing.pick_copy(view, "m", (), random.Random(seed))
    chosen = sim.route("m")
    if target is None:
        assert chosen is None
    else:
        assert chosen is not None
        assert (target.instance_id, target.allow_load) == (chosen[0], chosen[1] == COPY_LOADING)


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 8), loads=st.lists(st.integers(0, 4), min_size=8, max_size=8),
       key=st.text(min_size=1, max_size=8), size=st.integers(0, 1500))
def test_same_view_same_home_in_the_router_and_the_simulator(n: int, loads: list[int], key: str, size: int) -> None:
    names = instance_names(n)
    view, sim = _view(names, 1000), _sim(names, 1000, 0)
    for name, load in zip(names, loads, strict=False):
        view.inflight[name] = sim.inflight[name] = load
    spec = ModelSpec(model_id=key, type="sklearn", size_hint_bytes=size)
    if size > 1000:  # fits nowhere: the router says so, the simulator passes it through its plain home
        with pytest.raises(Exception, match="fits on no instance"):
            routing.pick_home(view, spec, (), load_factor=1.25)
        assert sim.home(key, size).name == rendezvous_order(key, names)[0]
        return
    assert routing.pick_home(view, spec, (), load_factor=1.25).instance_id == sim.home(key, size).name


def test_home_choice_counts_loads_as_busyness_in_both() -> None:
    # A load running on the HRW-first instance (the router sees it as loading_count, the simulator as
    # a running load) plus requests in flight divert a cold model to its second choice in both.
    names = instance_names(2)
    key = next(k for k in (f"k{i}" for i in range(100)) if rendezvous_order(k, names)[0] == names[0])
    view, sim = _view(names, 1000), _sim(names, 1000, 0)
    first = view.instances[names[0]]
    view.instances[names[0]] = InstanceRecord(instance_id=first.instance_id, endpoint=first.endpoint,
                                              devices=first.devices, loading_count=2)
    sim.by_name[names[0]].running = 2
    view.inflight[names[0]] = sim.inflight[names[0]] = 1
    spec = ModelSpec(model_id=key, type="sklearn")
    assert routing.pick_home(view, spec, (), load_factor=1.25).instance_id == names[1]
    assert sim.home(key, 0).name == names[1]
