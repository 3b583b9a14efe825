"""The router's side of the runtime-scaling signal (mesh.router.autoscale) on a view fed by hand,
with an injected clock: where the inputs come from, the registration check that allows scale to
zero, and bad records that are logged while the last values stay."""

from __future__ import annotations

import structlog

from mesh.registry.base import KeyValue
from mesh.registry.keys import Keys
from mesh.registry.records import DeviceUsage, InstanceRecord, ModelSpec, PlacementRecord
from mesh.router.autoscale import FORGET_S, RuntimeAutoscaler, config_from
from mesh.router.view import ClusterView
from mesh.settings import load_settings
from placement.autoscale import AutoscaleConfig
from placement.scaling import ScalingConfig, ScalingPolicy

MB = 1_000_000
KEYS = Keys()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def instance(iid: str, group: str, capacity: int = 100 * MB, rate: float = 0.0) -> KeyValue:
    record = InstanceRecord(instance_id=iid, endpoint=f"{iid}:1", labels=(f"rt:{group}",) if group else (),
                            devices=(DeviceUsage("ram", capacity, 0),), rate_rps=rate)
    return KeyValue(KEYS.instance(iid), record.to_json(), 1)


def placement(model_id: str, iid: str, size: int, loaded_s: float) -> KeyValue:
    record = PlacementRecord(model_id=model_id, instance_id=iid, state="loaded", size_bytes=size,
                             loaded_ms=int(loaded_s * 1000))
    return KeyValue(KEYS.placement(model_id, iid), record.to_json(), 1)


def setup(registered: list[ModelSpec] | None = None) -> tuple[RuntimeAutoscaler, ClusterView, ScalingPolicy, Clock]:
    clock = Clock()
    view = ClusterView(KEYS)
    policy = ScalingPolicy(ScalingConfig())
    calls: list[str] = []

    async def list_models(*, limit: int, start_after: str = "") -> list[ModelSpec]:
        calls.append(start_after)
        specs = sorted(registered or [], key=lambda s: s.model_id)
        return [s for s in specs if s.model_id > start_after][:limit]

    scaler = RuntimeAutoscaler(view=view, rates=policy, half_life_s=30.0, list_models=list_models,
                               config=AutoscaleConfig(hold_s=0.0, target_fill=1.0, target_rps=10.0),
                               interval_s=10.0, clock=clock, wall=clock)  # one clock for both: loaded_ms maps 1:1
    return scaler, view, policy, clock


def test_working_set_of_a_group_counts_evicted_models_until_the_window_passes() -> None:
    scaler, view, _, clock = setup()
    view.put_instance(instance("a", "sk"))
    view.put_instance(instance("b", "sk"))
    view.put_instance(instance("c", "big", capacity=500 * MB))
    view.put_placement(placement("m1", "a", 80 * MB, loaded_s=clock.now - 5))
    view.put_placement(placement("m2", "b", 90 * MB, loaded_s=clock.now - 5))
    view.put_placement(placement("m3", "c", 50 * MB, loaded_s=clock.now - 5))
    signals = scaler.tick()
    sk = signals["sk"]
    assert (sk.current, sk.capacity_bytes, sk.working_set_bytes, sk.models, sk.desired) == (2, 100 * MB, 170 * MB, 2, 2)
    assert (signals["big"].working_set_bytes, signals["big"].desired) == (50 * MB, 1)
    # m2 is evicted: still in the working set while its last use is within the window.
    view.delete_placement(KEYS.placement("m2", "b"))
    clock.now += 100
    assert scaler.tick()["sk"].working_set_bytes == 170 * MB
    # Past the window: m2 is gone, and so is m1, loaded but not used since: only loads and requests
    # are uses, not a copy sitting there.
    clock.now += 600
    later = scaler.tick()["sk"]
    assert (later.working_set_bytes, later.models) == (0, 0)


def test_requests_this_router_forwarded_count_as_uses_and_as_load() -> None:
    scaler, view, policy, clock = setup()
    view.put_instance(instance("a", "sk", rate=4.0))
    view.put_placement(placement("m1", "a", 10 * MB, loaded_s=clock.now - 5000))  # loaded long ago
    assert scaler.tick()["sk"].working_set_bytes == 0
    for _ in range(30):  # 30 req/s for 5 minutes, as the data plane observes them, a pass every 10 s
        clock.now += 10
        for i in range(300):
            policy.observe("m1", clock.now - 10 + i / 30, 1)
        signal = scaler.tick()["sk"]
        assert signal.working_set_bytes == 10 * MB
    # The average has risen to nearly 30 req/s; the router's figure beats the runtime's 4 req/s.
    assert 29 < signal.request_rps <= 30.5
    assert signal.load_replicas == 3 and signal.bound == "load" and signal.desired == 3
    # No request since: the rate only decays, which is not a use.
    clock.now += 700
    assert scaler.tick()["sk"].working_set_bytes == 0


async def test_a_group_without_registered_models_goes_to_zero_and_returns_on_registration() -> None:
    specs = [ModelSpec(model_id=f"m{i}", type="sklearn", labels=("rt:sk",)) for i in range(2500)]
    scaler, view, _, clock = setup(registered=specs)
    view.put_instance(instance("a", "sk"))
    view.put_instance(instance("e", "empty"))
    first = scaler.tick()
    assert first["empty"].desired == 1  # not checked yet: assumed to have models
    await scaler.check_registered()  # pages through all 2,500: "empty" is never found
    clock.now += 10
    signals = scaler.tick()
    assert (signals["empty"].desired, signals["empty"].bound) == (0, "no-models")
    assert signals["sk"].desired == 1
    scaler.on_registration("x", ModelSpec(model_id="x", type="sklearn", labels=("rt:empty",)))
    clock.now += 10
    assert scaler.tick()["empty"].desired == 1
    # A deletion makes the check due again (it runs at most every check_every_s).
    scaler.on_registration("x", None)
    clock.now += 100
    await scaler.check_registered()
    clock.now += 10
    assert scaler.tick()["empty"].desired == 0


def test_bad_records_are_logged_and_the_last_values_stay() -> None:
    scaler, view, _, clock = setup()
    view.put_instance(instance("a", "sk"))
    view.put_placement(placement("m1", "a", 10 * MB, loaded_s=clock.now))
    good = scaler.tick()["sk"]
    assert good.working_set_bytes == 10 * MB
    with structlog.testing.capture_logs() as logs:
        # A runtime that publishes a negative capacity, and a placement of negative size.
        view.put_instance(instance("a", "sk", capacity=-5))
        view.put_placement(placement("m2", "a", -1, loaded_s=clock.now))
        clock.now += 10
        signals = scaler.tick()
    assert signals["sk"] is good
    events = {e["event"]: e for e in logs}
    assert "capacity_bytes must be an integer >= 0" in events[
        "runtime scaling signal not computed; keeping the last one"]["error"]
    assert "size_bytes" in events["placements left out of the runtime scaling signal"]["first"]


def test_the_router_settings_default_to_the_kernels_defaults() -> None:
    assert config_from(load_settings(env={}).router) == AutoscaleConfig()


async def test_deletions_page_through_registrations_only_while_a_group_may_have_lost_its_last_model() -> None:
    specs = [ModelSpec(model_id=f"m{i}", type="sklearn", labels=("rt:sk",)) for i in range(1500)]
    pages: list[str] = []

    async def list_models(*, limit: int, start_after: str = "") -> list[ModelSpec]:
        pages.append(start_after)
        return [s for s in specs if s.model_id > start_after][:limit]

    clock = Clock()
    view = ClusterView(KEYS)
    scaler = RuntimeAutoscaler(view=view, rates=ScalingPolicy(), half_life_s=30.0, list_models=list_models,
                               config=AutoscaleConfig(hold_s=0.0), interval_s=10.0, check_every_s=60.0,
                               clock=clock, wall=clock)
    view.put_instance(instance("a", "sk"))
    view.put_instance(instance("e", "empty"))
    scaler.tick()
    await scaler.check_registered()
    assert len(pages) == 2  # every registration read once: "empty" (and "") have none
    assert scaler.tick()["empty"].desired == 0
    # Deletions elsewhere, the groups without copies all known to be empty or found at once.
    for step in range(3):
        scaler.on_registration(f"m{step}", None)
        clock.now += 61
        scaler.tick()
        await scaler.check_registered()
    assert len(pages) == 5  # "sk" has no copy: looked for, found on the first page each time
    # A watch reset: every group is looked for again, the empty ones with a whole pass.
    scaler.on_reset()
    clock.now += 61
    await scaler.check_registered()
    assert len(pages) == 7
    clock.now += 61
    await scaler.check_registered()
    assert len(pages) == 7  # nothing due


async def test_a_group_with_no_model_and_no_runtime_is_forgotten_after_a_while() -> None:
    """Groups come from labels clients write: one that has nothing for FORGET_S leaves the
    signals (and the metrics); the "" group never does."""
    scaler, _, _, clock = setup(registered=[])
    scaler.on_registration("x", ModelSpec(model_id="x", type="sklearn", labels=("rt:passing",)))
    scaler.on_registration("x", None)
    assert "passing" in scaler.tick()
    await scaler.check_registered()
    clock.now += 10
    assert scaler.tick()["passing"].desired == 0
    clock.now += FORGET_S + 1
    signals = scaler.tick()
    assert "passing" not in signals and "" in signals
    clock.now += 10
    assert "passing" not in scaler.tick()  # not brought back by itself
    scaler.on_registration("y", ModelSpec(model_id="y", type="sklearn", labels=("rt:passing",)))
    assert scaler.tick()["passing"].desired == 1  # a registration brings it back
