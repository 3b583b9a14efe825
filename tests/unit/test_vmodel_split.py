"""The pure parts of traffic splits (mesh.router.split): validation, the stable hash, the pick,
and what the router's view keeps for them (bounded, pruned when a split goes)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from mesh.errors import InvalidArgument
from mesh.registry.base import KeyValue
from mesh.registry.keys import Keys
from mesh.registry.records import FailureRecord, InstanceRecord, SplitTarget, VModelRecord
from mesh.router.split import bucket, check_split, check_sticky_header, choose, pick, receiving
from mesh.router.view import ClusterView


def record(*targets: tuple[str, int], sticky: str = "", active: str = "a") -> VModelRecord:
    return VModelRecord("v", active, active, split=tuple(SplitTarget(m, w) for m, w in targets), sticky_header=sticky)


def put(view: ClusterView, rec: VModelRecord) -> None:
    view.put_vmodel(KeyValue(view.keys.vmodel(rec.vmodel_id), rec.to_json(), 1, 1))


def test_the_hash_is_stable_across_processes() -> None:
    # Fixed values: BLAKE2b, not Python's salted hash(); a change here moves every sticky user.
    # (Pinned values: every router, before and after a restart, must put these users here.)
    assert [bucket(v) for v in ("alice", "bob", "")] == [29, 42, 76]
    points = Counter(bucket(f"user-{i}") for i in range(20_000))
    assert len(points) == 100 and max(points.values()) < 2 * min(points.values())  # spread evenly


def test_pick_walks_the_cumulative_weights() -> None:
    rec = record(("a", 90), ("b", 10))
    assert {pick(rec, p) for p in range(90)} == {"a"}
    assert {pick(rec, p) for p in range(90, 100)} == {"b"}
    zero = record(("a", 100), ("b", 0))
    assert {pick(zero, p) for p in range(100)} == {"a"}  # weight 0: never picked


def test_choose_is_sticky_by_header_and_random_without() -> None:
    view = ClusterView(Keys("/m/"))
    rec = record(("a", 50), ("b", 50), sticky="x-user")
    put(view, rec)
    rng = random.Random(1)
    for user in ("u1", "u2", "u3"):
        assert len({choose(rec, view, (("x-user", user),), rng) for _ in range(20)}) == 1
    drawn = Counter(choose(rec, view, (), rng) for _ in range(2000))
    assert 800 < drawn["a"] < 1200
    assert view.split_requests["v"]["a"] + view.split_requests["v"]["b"] == 60 + 2000


def test_a_failed_target_sends_its_share_to_the_active_model() -> None:
    view = ClusterView(Keys("/m/"))
    view.instances["i1"] = InstanceRecord("i1", "127.0.0.1:1")
    rec = record(("a", 10), ("b", 90))
    view.add_failure(FailureRecord("b", "i1", "broken"))
    assert {choose(rec, view, (), random.Random(2)) for _ in range(200)} == {"a"}
    assert receiving(rec, view) == {"a": True, "b": False}


def test_the_views_split_state_is_pruned_with_the_split() -> None:
    view = ClusterView(Keys("/m/"))
    rec = record(("a", 50), ("b", 50), sticky="x-user")
    put(view, rec)
    assert view.sticky_headers == {"x-user": 1}
    view.count_split_request("v", "a")
    view.count_split_request("v", "b")
    put(view, record(("a", 50), ("c", 50), sticky="x-other"))  # b left the split: its count goes
    assert view.split_requests == {"v": {"a": 1}} and view.sticky_headers == {"x-other": 1}
    put(view, VModelRecord("v", "a", "a"))  # no split: nothing kept
    assert view.split_requests == {} and view.sticky_headers == {}
    put(view, rec)
    view.count_split_request("v", "a")
    view.delete_vmodel(view.keys.vmodel("v"))
    assert view.split_requests == {} and view.sticky_headers == {}
    assert rec.models() == {"a", "b"} and "v" not in view.referrers("a")


@pytest.mark.parametrize(("targets", "message"), [
    ([], "at least one"),
    ([("a", 50), ("a", 50)], "targets[1] 'a' is named twice"),
    ([("a", 60), ("b", 30)], "sum to 90"),
    ([("a", 101)], "has weight 101"),
    ([(f"m{i}", 10) for i in range(9)], "at most 8"),
])
def test_bad_splits_are_refused_by_name(targets: list[tuple[str, int]], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_split("v", targets)


@pytest.mark.parametrize("name", ["bad header", "x" * 65, "data-bin", "grpc-timeout", "mm-model-id", "é"])
def test_bad_sticky_headers_are_refused(name: str) -> None:
    with pytest.raises(InvalidArgument, match="stickyHeader"):
        check_sticky_header("v", name)


def test_sticky_headers_are_stored_lower_case() -> None:
    assert check_sticky_header("v", "X-User-Id") == "x-user-id"
    assert check_sticky_header("v", "") == ""


def test_old_records_decode_without_a_split() -> None:
    old = b'{"vmodel_id":"v","active_model_id":"a","target_model_id":"b"}'
    rec = VModelRecord.from_json(old)
    assert rec.split == () and rec.sticky_header == "" and rec.models() == {"a", "b"}
