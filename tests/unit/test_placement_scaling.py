"""Copy scaling rules: the rate EWMA, adding copies, giving them back, pinning and per-model limits."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from placement.scaling import Decision, ModelRule, ScalingConfig, ScalingPolicy

# Small, round thresholds so that the arithmetic of each test can be followed by hand.
CFG = ScalingConfig(half_life_s=10.0, rps_threshold=10.0, queue_threshold=4.0, hold_s=30.0,
                    cooldown_s=5.0, max_copies=4, max_step=2)


def feed(p: ScalingPolicy, model: str, rps: float, start: float, end: float, inflight: int = 1) -> float:
    """Requests at a steady ``rps`` from ``start`` to ``end``; returns the time of the last one."""
    n = round((end - start) * rps)
    t = start
    for i in range(n):
        t = start + i / rps
        p.observe(model, t, inflight)
    return t


# -- rate -----------------------------------------------------------------------------------------


def test_rate_of_a_steady_stream_reads_its_rate() -> None:
    p = ScalingPolicy(CFG)
    t = feed(p, "m", 20.0, 0.0, 200.0)
    assert p.rate("m", t) == pytest.approx(20.0, rel=0.03)


def test_rate_halves_every_half_life_without_requests() -> None:
    p = ScalingPolicy(CFG)
    t = feed(p, "m", 20.0, 0.0, 200.0)
    r = p.rate("m", t)
    assert p.rate("m", t + 10.0) == pytest.approx(r / 2)
    assert p.rate("m", t + 30.0) == pytest.approx(r / 8)
    assert p.rate("never-seen", t) == 0.0


def test_many_requests_at_one_instant_count_fully() -> None:
    # Traces floor times to seconds: a burst at one timestamp must still register.
    p = ScalingPolicy(CFG)
    for _ in range(100):
        p.observe("m", 5.0, 1)
    assert p.rate("m", 5.0) == pytest.approx(100 * math.log(2) / 10.0)


# -- adding ---------------------------------------------------------------------------------------


def test_cold_model_keeps_one_copy() -> None:
    p = ScalingPolicy(CFG)
    t = feed(p, "m", 5.0, 0.0, 100.0)
    assert p.decide("m", t, copies=1) == Decision(0, 0)
    assert "m" not in p.protected()


def test_hot_model_gets_copies_by_rate_capped_per_step_and_max() -> None:
    p = ScalingPolicy(CFG)
    t = feed(p, "m", 25.0, 0.0, 100.0)  # 25 rps: ceil(25/10) = 3 copies wanted
    assert p.decide("m", t, copies=1) == Decision(add=2)
    assert "m" in p.protected() and p.kept("m") == 3
    assert p.held_extra() == 2
    # Cooldown: the copies are loading, ask again only after cooldown_s.
    assert p.decide("m", t + 1.0, copies=1).add == 0
    t = feed(p, "m", 100.0, t, t + 60.0)  # 100 rps wants 10, max_step 2 then max_copies 4
    assert p.decide("m", t, copies=3) == Decision(add=1)
    assert p.kept("m") == 4
    assert p.decide("m", t + 10.0, copies=4).add == 0


def test_limit_caps_adds_and_unplaced_copies_are_not_held() -> None:
    p = ScalingPolicy(CFG)
    t = feed(p, "m", 40.0, 0.0, 100.0)
    assert p.decide("m", t, copies=1, limit=2) == Decision(add=1)  # only two instances
    assert p.decide("m", t + 10.0, copies=2, limit=2) == Decision(0, 0)
    assert p.kept("m") == 2
    # The caller could place none of the copies asked for: after the cooldown, only what exists is
    # held (and the add is asked for again while the model is hot).
    q = ScalingPolicy(CFG)
    t = feed(q, "m", 40.0, 0.0, 100.0)
    assert q.decide("m", t, copies=1).add == 2
    assert q.decide("m", t + 1.0, copies=1) == Decision(0, 0) and q.kept("m") == 3  # in cooldown
    assert q.decide("m", t + 5.0, copies=1, limit=1) == Decision(0, 0)
    assert q.kept("m") == 0 and "m" not in q.protected() and q.held_extra() == 0


def test_queueing_adds_a_copy_even_at_low_rate() -> None:
    p = ScalingPolicy(CFG)
    p.observe("slow", 0.0, inflight=9)  # 9 in flight on 2 copies: 4.5 per copy > 4
    assert p.decide("slow", 0.0, copies=2) == Decision(add=1)
    p.observe("fast", 0.0, inflight=8)  # 8 on 2 copies: 4 per copy, not above
    assert p.decide("fast", 0.0, copies=2) == Decision(0, 0)


def test_global_cap_limits_extra_copies_over_all_models() -> None:
    p = ScalingPolicy(ScalingConfig(half_life_s=10.0, rps_threshold=10.0, max_extra_copies=3, max_step=4))
    t = feed(p, "a", 50.0, 0.0, 60.0)
    feed(p, "b", 50.0, 0.0, 60.0)
    assert p.decide("a", t, copies=1) == Decision(add=3)
    assert p.decide("b", t, copies=1) == Decision(0, 0)  # the cap is used up by a
    assert p.held_extra() == 3


def test_per_model_max_copies_and_minimum() -> None:
    rules = {"capped": ModelRule(max_copies=2), "floor": ModelRule(min_copies=2)}
    p = ScalingPolicy(ScalingConfig(half_life_s=10.0, rps_threshold=10.0, models=rules))
    t = feed(p, "capped", 80.0, 0.0, 60.0)
    assert p.decide("capped", t, copies=1) == Decision(add=1)
    assert p.decide("capped", t + 60.0, copies=2).add == 0
    # A minimum is wanted without any traffic, and its copies are protected from the start.
    assert "floor" in p.protected() and p.kept("floor") == 2
    assert p.decide("floor", 0.0, copies=0) == Decision(add=2)
    assert p.decide("floor", 1000.0, copies=2) == Decision(0, 0)  # never released below the minimum


def test_pinned_models_are_always_protected() -> None:
    p = ScalingPolicy(ScalingConfig(models={"pin": ModelRule(pinned=True)}))
    assert "pin" in p.protected()
    assert p.kept("pin") is None  # every copy
    assert p.decide("pin", 0.0, copies=1) == Decision(0, 0)
    p.forget("pin")
    assert "pin" in p.protected()  # the pin comes from the config


# -- giving way -----------------------------------------------------------------------------------


def test_extra_copy_gives_way_after_the_hold_and_one_at_a_time() -> None:
    p = ScalingPolicy(CFG)
    t = feed(p, "m", 25.0, 0.0, 100.0)
    assert p.decide("m", t, copies=1).add == 2
    # Traffic stops: after ~3 half-lives the rate is ~3 rps, under 2/3 x 10 / 2 copies.
    quiet = t + 30.0
    assert p.decide("m", quiet, copies=3) == Decision(0, 0)  # low since now; hold starts
    assert p.decide("m", quiet + 29.0, copies=3) == Decision(0, 0)
    assert p.decide("m", quiet + 30.0, copies=3) == Decision(release=1)
    assert p.kept("m") == 2 and p.held_models() == ["m"]
    assert p.decide("m", quiet + 31.0, copies=3) == Decision(0, 0)  # the next one waits a full hold
    assert p.decide("m", quiet + 60.0, copies=3) == Decision(release=1)
    assert "m" not in p.protected() and p.kept("m") == 0
    assert p.held_models() == [] and p.held_extra() == 0


def test_a_burst_during_the_hold_resets_it() -> None:
    p = ScalingPolicy(CFG)
    t = feed(p, "m", 25.0, 0.0, 100.0)
    p.decide("m", t, copies=1)
    assert p.decide("m", t + 30.0, copies=3) == Decision(0, 0)
    t2 = feed(p, "m", 25.0, t + 40.0, t + 70.0)  # hot again
    p.decide("m", t2, copies=3)
    assert p.decide("m", t2 + 31.0, copies=3) == Decision(0, 0)  # hold restarted after the burst


def test_no_add_right_after_a_release() -> None:
    # Hysteresis: after a release the rate per copy is at most 2/3 of the add threshold.
    p = ScalingPolicy(ScalingConfig(half_life_s=10.0, rps_threshold=10.0, hold_s=0.0, cooldown_s=0.0))
    t = feed(p, "m", 25.0, 0.0, 100.0)
    assert p.decide("m", t, copies=1).add == 2
    t = feed(p, "m", 12.0, t, t + 100.0)  # 12 rps: 6 per copy on 2 would be under 6.67
    assert p.decide("m", t, copies=3) == Decision(release=1)
    assert p.decide("m", t, copies=2) == Decision(0, 0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0.0, 5.0), st.integers(0, 20), st.integers(0, 6)), max_size=60))
def test_decisions_stay_within_bounds(steps: list[tuple[float, int, int]]) -> None:
    p = ScalingPolicy(ScalingConfig(half_life_s=5.0, rps_threshold=3.0, hold_s=2.0, cooldown_s=1.0,
                                    max_copies=5, max_extra_copies=6))
    now, copies = 0.0, 1
    for gap, burst, inflight in steps:
        now += gap
        for _ in range(burst):
            p.observe("m", now, inflight)
        d = p.decide("m", now, copies)
        assert d.add >= 0 and d.release in (0, 1) and not (d.add and d.release)
        copies = copies + d.add
        assert 1 <= copies <= 5
        assert 0 <= p.held_extra() <= 6


def test_prune_drops_faded_models_but_keeps_held_ones() -> None:
    p = ScalingPolicy(CFG)
    t = feed(p, "hot", 25.0, 0.0, 100.0)
    feed(p, "cold", 1.0, t - 10.0, t)
    assert p.decide("hot", t, copies=1).add == 2
    assert p.prune(t) == 0  # cold's rate has not faded yet
    later = t + 200.0  # 20 half-lives: cold reads ~1e-6 req/s; hot still holds its copies
    assert p.prune(later) == 1 and p.tracked() == 1
    assert p.rate("cold", later) == 0.0 and p.kept("hot") == 3


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="rps_threshold"):
        ScalingConfig(rps_threshold=0.0)
    with pytest.raises(ValueError, match="release_fraction"):
        ScalingConfig(release_fraction=1.5)
    with pytest.raises(ValueError, match="max_copies"):
        ModelRule(min_copies=3, max_copies=2)
