"""The pure parts of traffic splits (mesh.router.split): validation, the stable hash, the pick,
and what the router's view keeps for them (bounded, pruned when a split goes)."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from mesh.cli.client import CliError
from mesh.cli.commands import split_targets
from mesh.errors import BadRecord, InvalidArgument
from mesh.registry.base import KeyValue
from mesh.registry.keys import Keys
from mesh.registry.records import FailureRecord, InstanceRecord, SplitTarget, VModelRecord
from mesh.router.split import bucket, check_split, check_sticky_header, choose, pick, receiving, usable
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
    view.count_splits = True
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
    view.count_split_request("v", "a")
    view.count_split_request("v", "b")
    put(view, record(("a", 50), ("c", 50), sticky="x-other"))  # b left the split: its count goes
    assert view.split_requests == {"v": {"a": 1}}
    put(view, VModelRecord("v", "a", "a"))  # no split: nothing kept
    assert view.split_requests == {}
    put(view, rec)
    view.count_split_request("v", "a")
    view.delete_vmodel(view.keys.vmodel("v"))
    assert view.split_requests == {}
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


# --- the review's findings (canary-fix) ---------------------------------------------------------------
@pytest.mark.parametrize("name", ["Cookie", "authorization", "Proxy-Authorization", "user-agent", "host",
                                  "x-api-key", "x-auth-token", "content-type", "content-length", "te",
                                  "connection", "referer", "mesh-load"])
def test_credentials_and_standard_headers_are_no_sticky_header(name: str) -> None:
    with pytest.raises(InvalidArgument, match="credential"):
        check_sticky_header("v", name)


def test_every_header_the_data_plane_strips_is_refused_as_a_sticky_header() -> None:
    from mesh.router.dataplane import STRIP
    for name in STRIP:
        with pytest.raises(InvalidArgument):
            check_sticky_header("v", name)


def test_an_unusable_sticky_value_is_a_random_draw_not_an_error() -> None:
    view = ClusterView(Keys("/m/"))
    rec = record(("a", 50), ("b", 50), sticky="x-user")
    rng = random.Random(3)
    for value in ("x" * 1025, "b\u00fcro", "tab\there", b"\xff\xfe"):
        drawn = {choose(rec, view, (("x-user", value),), rng) for _ in range(200)}
        assert drawn == {"a", "b"}  # not sticky (random), and no exception
    assert usable("alice") == "alice" and usable(b"alice") == "alice" and usable(None) is None


def test_choose_counts_only_inference_and_only_when_asked() -> None:
    view = ClusterView(Keys("/m/"))
    rec = record(("a", 50), ("b", 50))
    choose(rec, view, (), random.Random(1))
    assert view.split_requests == {}  # per-model metrics off (the default): nothing kept
    view.count_splits = True
    choose(rec, view, (), random.Random(1), count=False)  # readiness, metadata
    assert view.split_requests == {}
    choose(rec, view, (), random.Random(1))
    assert sum(view.split_requests["v"].values()) == 1


def test_split_requests_metric_is_per_model_opt_in() -> None:
    from mesh.observability.metrics import RouterMetrics

    def families(per_model: bool) -> set[str]:
        view = ClusterView(Keys("/m/"))
        view.count_splits = per_model
        put(view, record(("a", 50), ("b", 50)))
        choose(view.vmodels["v"], view, (), random.Random(1))
        return {f.name for f in RouterMetrics(per_model=per_model)._cluster(view, {})}
    assert "mesh_vmodel_requests" not in families(False)
    assert "mesh_vmodel_requests" in families(True)


@pytest.mark.parametrize("extra", [
    {"split": [{"model_id": "a", "weight": -50}, {"model_id": "b", "weight": 150}]},
    {"split": [{"model_id": "a", "weight": 0}]},
    {"split": [{"model_id": "", "weight": 100}]},
    {"split": [{"model_id": "a", "weight": 50}, {"model_id": "a", "weight": 50}]},
    {"split": [{"model_id": "a", "weight": 10**40}]},
    {"split": [{"model_id": f"m{i}", "weight": 0} for i in range(99)] + [{"model_id": "z", "weight": 100}]},
    {"split": [{"model_id": "a", "weight": 100}], "sticky_header": "X User"},
])
def test_a_stored_split_that_no_write_could_make_is_a_bad_record(extra: dict[str, object]) -> None:
    raw = json.dumps({"vmodel_id": "v", "active_model_id": "a", "target_model_id": "a", **extra}).encode()
    with pytest.raises(BadRecord):
        VModelRecord.from_json(raw)
    view = ClusterView(Keys("/m/"))
    with pytest.raises(BadRecord):  # the watch skips it, as any undecodable record
        view.put_vmodel(KeyValue(view.keys.vmodel("v"), raw, 1, 1))
    assert "v" not in view.vmodels


@pytest.mark.parametrize("text", ["a=\u00b2", "a=\u0663", "a=\uff11\uff10", "a=1.5", "a=-1", "a=", "=10", "a=1000"])
def test_cli_split_targets_refuse_what_is_not_ascii_digits(text: str) -> None:
    with pytest.raises(CliError) as err:
        split_targets([text])
    assert err.value.exit_code == 2
