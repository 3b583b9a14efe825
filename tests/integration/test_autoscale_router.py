"""The runtime-scaling signal on a real router (mesh.router.autoscale): a router and two runtime
groups in process, models registered and requested, the router's /metrics scraped. The desired
replicas of a group rise with the measured working set of its models, a group with no registered
model asks for 0 replicas, and a registration brings it back to 1."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

import pytest

from mesh.errors import InvalidArgument
from mesh.router.autoscale import config_from, group_of
from mesh.settings import load_settings
from tests.integration.test_metrics import Samples, eventually, free_port, placements, request_for, scrape
from tests.support.inprocess import InProcessMesh, memory_url
from tests.support.models import ModelArtifact, make_model

pytestmark = pytest.mark.integration

CAPACITY = 64 * 1024  # each runtime holds 64 KiB of models: the test models measure 4-6 KB
FILL = 0.0625  # so a replica's share of the working set is 4 KiB, and each model moves the need


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[ModelArtifact]:
    directory = tmp_path_factory.mktemp("models")
    return [make_model("sklearn", directory, seed=s) for s in range(3)]


@pytest.fixture
async def mesh() -> AsyncIterator[tuple[InProcessMesh, int]]:
    """A router (a pass every 0.1 s, a 0.5 s hold) and two runtimes: one of group ``sklearn``, one
    of group ``idle``."""
    port = free_port()
    m = InProcessMesh(memory_url(), router_overrides={
        "metrics_port": port, "autoscale_interval_s": 0.1, "autoscale_hold_s": 0.5,
        "autoscale_target_fill": FILL, "autoscale_groups": ("sklearn=1:5",)},
        runtime_overrides={"capacity_bytes": CAPACITY, "eviction_policy": "lru"})
    await m.add_runtime(labels=("rt:sklearn",))
    await m.add_runtime(labels=("rt:idle",))
    await m.start(runtimes=0)
    try:
        yield m, port
    finally:
        await m.stop()


def desired(samples: Samples, runtime: str) -> float:
    return samples("mesh_runtime_replicas_desired", runtime=runtime)


async def test_desired_replicas_follow_the_working_set_and_zero_without_models(
        mesh: tuple[InProcessMesh, int], models: list[ModelArtifact]) -> None:
    m, port = mesh
    for i, _ in enumerate(models):
        await m.register(f"m{i}", "sklearn", str(models[i].path), labels=["rt:sklearn"])

    # Models registered, none used yet: the minimum, for want of anything in use; the idle group,
    # with no model, goes to 0 after the hold.
    first = await eventually(port, lambda s: s.has("mesh_runtime_replicas_desired", runtime="sklearn")
                             and desired(s, "idle") == 0)
    assert desired(first, "sklearn") == 1
    assert first("mesh_runtime_scaling_reason", runtime="sklearn", reason="idle") == 1
    assert first("mesh_runtime_scaling_reason", runtime="idle", reason="no-models") == 1
    assert first("mesh_runtime_replicas_current", runtime="sklearn") == 1
    assert first("mesh_runtime_replicas_current", runtime="idle") == 1
    assert first("mesh_runtime_replica_capacity_bytes", runtime="sklearn") == CAPACITY
    assert first("mesh_runtime_working_set_bytes", runtime="sklearn") == 0

    # Each model used adds its measured size to the working set; desired follows, memory-bound
    # (models evicted meanwhile would still count: the window has not passed).
    seen = [desired(first, "sklearn")]
    sizes: dict[str, int] = {}
    for i, artifact in enumerate(models):
        await m.infer(f"m{i}", request_for(artifact))
        sizes.update({p.model_id: p.size_bytes for p in await placements(m)})
        working_set = sum(sizes[f"m{j}"] for j in range(i + 1))
        want = min(math.ceil(working_set / (CAPACITY * FILL)), 5)
        now = await eventually(port, lambda s, w=working_set: s("mesh_runtime_working_set_bytes",
                                                                  runtime="sklearn") == w)
        assert now("mesh_runtime_working_set_models", runtime="sklearn") == i + 1
        assert desired(now, "sklearn") == want
        assert now("mesh_runtime_replicas_needed", runtime="sklearn", need="memory") == want
        seen.append(desired(now, "sklearn"))
    assert seen == sorted(seen) and seen[-1] > seen[0] >= 1
    assert now("mesh_runtime_scaling_reason", runtime="sklearn", reason="memory") == 1
    # Requests to a loaded copy are counted by the router: the load shows (far under a replica's worth).
    for _ in range(5):
        await m.infer("m2", request_for(models[2]))
    now = await eventually(port, lambda s: s("mesh_runtime_request_rate", runtime="sklearn") > 0)
    assert now("mesh_runtime_replicas_needed", runtime="sklearn", need="load") == 1
    assert desired(now, "sklearn") == seen[-1]
    assert desired(now, "idle") == 0

    # The first model of the idle group brings it back to one replica at once.
    await m.register("late", "sklearn", str(models[0].path), labels=["rt:idle"])
    back = await eventually(port, lambda s: desired(s, "idle") == 1)
    assert back("mesh_runtime_scaling_reason", runtime="idle", reason="idle") == 1


async def test_no_gauges_when_turned_off(models: list[ModelArtifact]) -> None:
    port = free_port()
    m = await InProcessMesh(memory_url(), router_overrides={"metrics_port": port, "autoscale_interval_s": 0},
                            runtime_overrides={"labels": ("rt:sklearn",)}).start(runtimes=1)
    try:
        await m.register("m0", "sklearn", str(models[0].path), labels=["rt:sklearn"])
        await m.infer("m0", request_for(models[0]))
        samples = await scrape(port)
        assert samples("modelmesh_models_loaded_total") == 1
        assert not any(name.startswith("mesh_runtime_") for name, _ in samples.values)
    finally:
        await m.stop()


def test_groups_and_bounds_from_settings() -> None:
    assert group_of(["gpu", "rt:ns/sklearn", "rt:other"]) == "ns/sklearn"
    assert group_of(["gpu"]) == ""
    rs = load_settings(env={"MESH_ROUTER_AUTOSCALE_GROUPS": "ns/sklearn=0:4,=2:3"}).router
    assert config_from(rs).bounds("ns/sklearn") == (0, 4)
    assert config_from(rs).bounds("") == (2, 3)
    assert config_from(rs).bounds("other") == (1, 10)
    for bad, message in [("sklearn=4", "is not 'name=min:max'"), ("sklearn=a:b", "is not"),
                         ("sklearn=3:1", "max_replicas")]:
        with pytest.raises(InvalidArgument, match=message):
            config_from(load_settings(env={"MESH_ROUTER_AUTOSCALE_GROUPS": bad}).router)
    with pytest.raises(InvalidArgument, match="target_fill"):
        config_from(load_settings(env={"MESH_ROUTER_AUTOSCALE_TARGET_FILL": "0"}).router)
