"""Routing around unreachable and leaving instances (issue 7, items 1 and 2), on a hand-built view."""

from __future__ import annotations

import dataclasses
import random

import pytest

from mesh.errors import FailedPrecondition, Unavailable
from mesh.registry.keys import Keys
from mesh.registry.records import LOADED, LOADING, DeviceUsage, InstanceRecord, ModelSpec, PlacementRecord
from mesh.router.routing import eligible, pick_copy, pick_home
from mesh.router.view import ClusterView

RAM = (DeviceUsage("ram", 1 << 30, 0),)


def _view(*ids: str, leaving: tuple[str, ...] = ()) -> ClusterView:
    view = ClusterView(Keys())
    for i in ids:
        view.instances[i] = InstanceRecord(instance_id=i, endpoint=f"127.0.0.1:{1000 + len(view.instances)}",
                                           devices=RAM, shutting_down=i in leaving)
    return view


def _place(view: ClusterView, model: str, instance: str, state: str = LOADED) -> None:
    view.placements.setdefault(model, {})[instance] = PlacementRecord(model_id=model, instance_id=instance,
                                                                      state=state)


def test_unreachable_copy_is_skipped_and_the_home_avoids_it() -> None:
    view = _view("a", "b", "c")
    _place(view, "m", "a")
    view.unreachable.add("a")
    assert pick_copy(view, "m", (), random.Random(0)) is None
    spec = ModelSpec(model_id="m", type="sklearn")
    for _ in range(20):
        assert pick_home(view, spec, (), load_factor=1.25).instance_id != "a"


def test_unreachable_everywhere_falls_back_to_every_instance() -> None:
    view = _view("a", "b")
    view.unreachable.update({"a", "b"})
    assert {r.instance_id for r in eligible(view, ModelSpec(model_id="m", type="sklearn"))} == {"a", "b"}


def test_leaving_copy_serves_until_a_live_copy_is_loaded() -> None:
    view = _view("a", "b", leaving=("a",))
    _place(view, "m", "a")
    _place(view, "m", "b", LOADING)
    target = pick_copy(view, "m", (), random.Random(0))
    assert target is not None and (target.instance_id, target.allow_load) == ("a", False)
    _place(view, "m", "b", LOADED)
    target = pick_copy(view, "m", (), random.Random(0))
    assert target is not None and target.instance_id == "b"


def test_deleted_instance_is_no_longer_unreachable() -> None:
    view = _view("a")
    view.unreachable.add("a")
    view.delete_instance(view.keys.instances + "a")
    assert view.unreachable == set()


class _Runtimes:
    """Stands in for the RuntimeClient's ServerLive probe: ``alive`` says who answers."""

    def __init__(self, alive: set[str]) -> None:
        self.alive = alive
        self.probed: list[str] = []

    async def live(self, endpoint: str, timeout_s: float) -> bool:
        self.probed.append(endpoint)
        return endpoint in self.alive


async def test_a_missed_deadline_probes_and_marks_a_runtime_that_does_not_answer() -> None:
    """A runtime whose event loop is stuck answers HTTP/2 pings but not ServerLive: the first missed
    deadline probes it, marks it unreachable and drops its streams (their requests retry)."""
    import asyncio

    from mesh.router.reachability import Reachability

    view = _view("stuck", "slow")
    endpoints = {i: r.endpoint for i, r in view.instances.items()}
    runtimes = _Runtimes(alive={endpoints["slow"]})
    dropped: list[str] = []
    reach = Reachability(view, runtimes, probe_s=0.2, on_unreachable=dropped.append)  # type: ignore[arg-type]
    for _ in range(5):  # many requests miss their deadline at once: one probe each
        reach.suspect("stuck")
        reach.suspect("slow")
    await asyncio.sleep(0.05)
    assert sorted(runtimes.probed) == sorted(endpoints.values())
    assert view.unreachable == {"stuck"}  # a slow model's runtime still answers: not marked
    assert dropped == [endpoints["stuck"]]
    reach.suspect("stuck")  # already marked: the periodic probe takes it back when it answers
    await asyncio.sleep(0.05)
    assert len(runtimes.probed) == 2


def test_no_home_while_every_able_instance_refuses_loads_is_unavailable_not_unsupported() -> None:
    """Instances that could serve the type but take no loads now (stuck loads, shutting down) are
    a retryable capacity problem, not an unsupported type."""
    view = _view("a", "b", leaving=("b",))
    view.instances["a"] = dataclasses.replace(view.instances["a"], accepts_loads=False)
    spec = ModelSpec(model_id="m", type="sklearn")
    with pytest.raises(Unavailable, match="the 2 that could serve type 'sklearn' take no loads now"):
        pick_home(view, spec, (), load_factor=1.25)
    view.instances["a"] = dataclasses.replace(view.instances["a"], shutting_down=True)
    with pytest.raises(Unavailable, match="are shutting down"):
        pick_home(view, spec, (), load_factor=1.25)
    for i in ("a", "b"):
        view.instances[i] = dataclasses.replace(view.instances[i], supported_types=("sklearn",))
    with pytest.raises(FailedPrecondition, match="none supports type 'onnx'"):
        pick_home(view, ModelSpec(model_id="m", type="onnx"), (), load_factor=1.25)
