"""The runtime-scaling signal (placement.autoscale) on traces: a day, a noisy plateau, the two
kinds of need, the bounds, scale to zero and back, and the inputs it refuses."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from placement.autoscale import (
    AutoscaleConfig,
    AutoscaleError,
    Autoscaler,
    Demand,
    ModelUse,
    ReplicaBounds,
    Signal,
)

GB = 10**9
CAP = 10 * GB  # model capacity of one replica
TICK = 10.0  # seconds between decisions, as the router's default
DAY = 86_400.0


def demand(ws: float = 0.0, rps: float = 0.0, replicas: int = 1, group: str = "", has_models: bool = True) -> Demand:
    return Demand(group, replicas, CAP, working_set_bytes=int(ws), request_rps=rps, has_models=has_models)


def run(scaler: Autoscaler, needs: list[tuple[float, Demand]]) -> list[Signal]:
    """Decide at each (time, demand); the replicas follow the previous decision, as an HPA's do."""
    out: list[Signal] = []
    replicas = needs[0][1].replicas
    for t, d in needs:
        signal = scaler.decide(Demand(d.group, replicas, d.capacity_bytes, d.working_set_bytes, d.request_rps,
                                      d.has_models), t)
        out.append(signal)
        replicas = signal.desired
    return out


def diurnal_working_set(t: float) -> float:
    """Bytes in use at time t of the day: 12 GB at 02:00, 76 GB at 14:00 (a cosine)."""
    return 44 * GB - 32 * GB * math.cos(2 * math.pi * (t - 2 * 3600) / DAY)


def test_a_day_scales_up_in_the_morning_at_once_and_down_at_night_one_step_per_hold() -> None:
    config = AutoscaleConfig(hold_s=600.0, max_replicas=20)
    scaler = Autoscaler(config)
    times = [i * TICK for i in range(int(DAY / TICK))]
    signals = run(scaler, [(t, demand(diurnal_working_set(t))) for t in times])

    needs = [s.need for s in signals]
    desired = [s.desired for s in signals]
    # Enough memory at every moment: never below the need (up at once), and all memory-bound.
    assert all(d >= n for d, n in zip(desired, needs, strict=True))
    assert {s.bound for s in signals} == {"memory"}
    # The peak: 76 GB at 80 % of 10 GB per replica = 10 replicas, reached by 14:00.
    assert max(desired) == max(needs) == 10
    assert desired[times.index(14 * 3600.0)] == 10
    # Mornings rise with the need, each step the tick it is needed.
    for i in range(1, len(times)):
        if needs[i] > desired[i - 1]:
            assert desired[i] == needs[i]
    # Nights come down one replica at a time, at least a hold apart.
    downs = [i for i in range(1, len(times)) if desired[i] < desired[i - 1]]
    assert downs, "never scaled down"
    assert all(desired[i - 1] - desired[i] == 1 for i in downs)
    assert all(times[b] - times[a] >= config.hold_s for a, b in itertools.pairwise(downs))
    # ... and do come down: by the end of the day (02:00 is the trough) it is near the night's need.
    assert desired[-1] <= needs[-1] + 1
    assert min(desired) < 4


def test_a_noisy_plateau_does_not_flap() -> None:
    """A need that wobbles between 5 and 6 every few ticks for four hours: one rise, no fall."""
    rng = random.Random(7)
    scaler = Autoscaler(AutoscaleConfig(hold_s=300.0))
    boundary = 5 * CAP * 0.8  # 5 replicas hold exactly this much
    trace = [(i * TICK, demand(boundary * (1 + rng.uniform(-0.05, 0.05)), replicas=5)) for i in range(1440)]
    signals = run(scaler, trace)
    assert {s.need for s in signals} == {5, 6}
    desired = [s.desired for s in signals]
    changes = sum(1 for a, b in itertools.pairwise(desired) if a != b)
    assert changes == 1 and desired[-1] == 6
    assert any(s.action == "hold" for s in signals)


def test_a_short_dip_is_held_and_a_long_one_steps_down() -> None:
    scaler = Autoscaler(AutoscaleConfig(hold_s=300.0))
    high, low = demand(40 * GB, replicas=1), demand(20 * GB, replicas=1)
    assert scaler.decide(high, 0).desired == 5
    assert scaler.decide(low, 10).action == "hold"
    assert scaler.decide(low, 200).desired == 5
    assert scaler.decide(high, 250).desired == 5  # back up before the hold ran out: the hold restarts
    assert scaler.decide(low, 260).desired == 5
    assert scaler.decide(low, 559).desired == 5
    stepped = scaler.decide(low, 560)
    assert (stepped.desired, stepped.action) == (4, "down")
    assert scaler.decide(low, 800).desired == 4  # the next step waits a full hold after the last
    assert scaler.decide(low, 860).desired == 3


def test_memory_bound_and_load_bound() -> None:
    scaler = Autoscaler(AutoscaleConfig(target_rps=100.0, target_fill=0.5))
    memory = scaler.decide(demand(ws=30 * GB, rps=150.0, group="big-models"), 0)
    assert (memory.memory_replicas, memory.load_replicas, memory.desired, memory.bound) == (6, 2, 6, "memory")
    assert memory.reason == "memory-bound"
    load = scaler.decide(demand(ws=2 * GB, rps=950.0, group="hot-models"), 0)
    assert (load.memory_replicas, load.load_replicas, load.desired, load.bound) == (1, 10, 10, "load")
    exact = scaler.decide(demand(rps=300.0, group="exact"), 0)
    assert exact.load_replicas == 3  # exactly three replicas' worth needs three


def test_bounds_per_group_and_the_floor_of_one_with_models() -> None:
    config = AutoscaleConfig(min_replicas=0, max_replicas=8,
                             groups={"sklearn": ReplicaBounds(2, 4)})
    scaler = Autoscaler(config)
    idle = scaler.decide(demand(group="other"), 0)
    assert (idle.desired, idle.bound, idle.clamped) == (1, "idle", "min")  # a model: at least 1
    capped = scaler.decide(demand(ws=100 * GB, group="sklearn"), 0)
    assert (capped.desired, capped.memory_replicas, capped.clamped) == (4, 13, "max")
    assert "maximum" in capped.reason
    floor = Autoscaler(config).decide(demand(group="sklearn", replicas=0), 0)
    assert (floor.desired, floor.clamped, floor.action) == (2, "min", "up")
    assert Autoscaler(config).decide(demand(ws=100 * GB, group="x", replicas=3), 0).desired == 8


def test_a_lowered_maximum_applies_at_once() -> None:
    scaler = Autoscaler(AutoscaleConfig(max_replicas=10))
    assert scaler.decide(demand(ws=60 * GB), 0).desired == 8
    scaler.config = AutoscaleConfig(max_replicas=5)
    signal = scaler.decide(demand(ws=60 * GB, replicas=8), 10)
    assert (signal.desired, signal.action) == (5, "down")


def test_scale_to_zero_without_models_and_back_at_the_first_registration() -> None:
    scaler = Autoscaler(AutoscaleConfig(hold_s=120.0, min_replicas=2))
    assert scaler.decide(demand(ws=GB, replicas=3), 0).desired == 3
    empty = scaler.decide(demand(replicas=3, has_models=False), 10)
    assert (empty.desired, empty.need, empty.bound, empty.action) == (3, 0, "no-models", "hold")
    gone = scaler.decide(demand(replicas=3, has_models=False), 130)
    assert (gone.desired, gone.action) == (0, "down")  # straight to 0: no cache to keep
    assert scaler.decide(demand(replicas=0, has_models=False), 1000).desired == 0
    back = scaler.decide(demand(replicas=0), 1010)
    assert (back.desired, back.action, back.clamped) == (2, "up", "min")


def test_scale_to_zero_can_be_turned_off() -> None:
    scaler = Autoscaler(AutoscaleConfig(hold_s=0.0, min_replicas=1, scale_to_zero=False))
    assert scaler.decide(demand(replicas=3, has_models=False), 0).desired == 2
    assert scaler.decide(demand(replicas=2, has_models=False), 10).desired == 1
    assert scaler.decide(demand(replicas=1, has_models=False), 20).desired == 1


def test_a_restarted_router_starts_from_the_running_replicas() -> None:
    """No history: the current count is the starting point, so a restart does not drop replicas."""
    scaler = Autoscaler(AutoscaleConfig(hold_s=300.0))
    first = scaler.decide(demand(ws=GB, replicas=6), 0)
    assert (first.desired, first.need, first.action) == (6, 1, "hold")
    assert scaler.desired("") == 6 and scaler.groups() == [""]
    scaler.forget("")
    assert scaler.desired("") is None


def test_working_set_counts_models_used_within_the_window() -> None:
    models = [
        ModelUse("a", 3 * GB, last_used_s=1000.0, rate_rps=2.0),
        ModelUse("b", 2 * GB, last_used_s=100.0, rate_rps=0.0),  # 900 s ago: outside a 600 s window
        ModelUse("a", 4 * GB, last_used_s=900.0, rate_rps=1.0),  # a second copy of a: counted once
        ModelUse("c", GB, last_used_s=400.0, rate_rps=0.5),  # exactly at the window's edge
    ]
    d = Demand.from_models("rt", replicas=2, capacity_bytes=CAP, models=models, now=1000.0, window_s=600.0)
    assert (d.working_set_bytes, d.models, d.request_rps) == (5 * GB, 2, 3.5)
    measured = Demand.from_models("rt", replicas=2, capacity_bytes=CAP, models=models, now=1000.0,
                                  window_s=600.0, request_rps=40.0)
    assert measured.request_rps == 40.0
    assert Demand.from_models("rt", replicas=0, capacity_bytes=0, models=[], now=0.0, window_s=1.0).models == 0


@pytest.mark.parametrize(("build", "message"), [
    (lambda: Demand("g", 1, -1), "capacity_bytes must be an integer >= 0"),
    (lambda: Demand("g", -2, CAP), "replicas must be an integer >= 0"),
    (lambda: Demand("g", 1, CAP, request_rps=math.nan), "request_rps must be a finite number"),
    (lambda: ModelUse("m", -5, 0.0), "model 'm' size_bytes"),
    (lambda: ModelUse("m", 5, math.inf), "last_used_s must be finite"),
    (lambda: AutoscaleConfig(min_replicas=5, max_replicas=3), r"max_replicas \(3\) must be >= max\(1, min"),
    (lambda: AutoscaleConfig(groups={"g": ReplicaBounds(0, 0)}), "group 'g' max_replicas"),
    (lambda: AutoscaleConfig(target_fill=1.5), "target_fill"),
    (lambda: AutoscaleConfig(target_rps=0), "target_rps must be a finite number > 0"),
])
def test_bad_input_is_refused_with_a_clear_error(build, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(AutoscaleError, match=message):
        build()


def test_a_working_set_without_capacity_is_an_error_not_a_division_by_zero() -> None:
    scaler = Autoscaler()
    with pytest.raises(AutoscaleError, match="no capacity per replica"):
        scaler.decide(Demand("empty", 0, 0, working_set_bytes=GB), 0.0)
    # An empty group with nothing in use needs no capacity figure.
    assert scaler.decide(Demand("empty", 0, 0), 0.0).desired == 1
    with pytest.raises(AutoscaleError, match="now must be finite"):
        scaler.decide(Demand("empty", 0, 0), math.nan)


def test_a_sudden_night_comes_down_as_a_staircase() -> None:
    """The need falls from 10 replicas to 2 at once: eight steps of one, each a hold after the last."""
    scaler = Autoscaler(AutoscaleConfig(hold_s=300.0))
    trace = [(i * TICK, demand(80 * GB if i < 10 else 16 * GB)) for i in range(600)]
    signals = run(scaler, trace)
    steps = [(i * TICK, s.desired) for i, s in enumerate(signals) if s.action == "down"]
    assert [d for _, d in steps] == [9, 8, 7, 6, 5, 4, 3, 2]
    assert [t for t, _ in steps] == [400.0 + 300.0 * k for k in range(8)]  # lower from 100 s
    assert signals[-1].desired == 2 and signals[-1].action == "steady"
