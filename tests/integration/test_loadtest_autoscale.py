"""``python -m loadtest.scenarios.autoscale --quick`` as a user runs it: a simulated day per trace,
autoscaled against fixed fleets, and the report's invariants (a few seconds)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:  # type: ignore[type-arg]
    out = tmp_path_factory.mktemp("autoscale") / "autoscale.json"
    done = subprocess.run([sys.executable, "-m", "loadtest.scenarios.autoscale", "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| fleet " in done.stdout and "runtime-hours" in done.stdout
    data: dict = json.loads(out.read_text())  # type: ignore[type-arg]
    assert data["markdown"] in done.stdout
    return data["result"]  # type: ignore[no-any-return]


def test_the_autoscaled_fleet_costs_less_than_the_peak_fleet_and_pays_in_loads(report: dict) -> None:  # type: ignore[type-arg]
    assert [t["name"] for t in report["traces"]] == ["azure", "zipf"]
    for trace in report["traces"]:
        auto, slow, peak, budget = trace["fleets"]
        assert (auto["fleet"], slow["fleet"]) == ("autoscaled", "autoscaled, hold 900 s")
        assert peak["replicas_fixed"] == auto["peak_replicas"] and peak["fleet"].startswith("fixed at peak")
        assert budget["replicas_fixed"] == max(1, int(auto["mean_replicas"]))
        # Same trace for every fleet.
        assert {f["requests"] for f in trace["fleets"]} == {trace["requests"]} and trace["requests"] > 10_000
        # Runtime-hours: a fixed fleet is its size all day; the autoscaled one is below the peak's and
        # at or above the same-budget fleet's (which was sized to cost no more).
        for fixed in (peak, budget):
            assert fixed["runtime_hours"] == pytest.approx(24 * fixed["replicas_fixed"])
            assert fixed["peak_replicas"] == fixed["replicas_fixed"]
        assert auto["runtime_hours"] < peak["runtime_hours"]
        assert budget["runtime_hours"] <= auto["runtime_hours"]
        assert auto["mean_replicas"] == pytest.approx(auto["runtime_hours"] / 24)
        # Loads and waits are reported; only scaling causes scaling loads.
        for fleet in trace["fleets"]:
            assert fleet["loads"] > 0 and fleet["waited"] > 0 and fleet["wait_s"] > 0
            assert fleet["hits"] + fleet["misses"] + fleet["joined"] == fleet["requests"]
            assert fleet["waited"] == fleet["misses"] + fleet["joined"]
            assert 0 < fleet["hit_ratio"] < 1
            assert fleet["scaling_loads"] == fleet["rehome_loads"] + fleet["lost_reloads"]
        for fixed in (peak, budget):
            assert fixed["scaling_loads"] == fixed["scale_ups"] == fixed["scale_downs"] == 0
            assert fixed["loads"] == fixed["misses"]
        assert auto["scale_ups"] > 0 and auto["scale_downs"] > 0 and auto["rehome_loads"] > 0
        assert auto["loads"] == auto["misses"] + auto["rehome_loads"]
        # The peak fleet never has less memory than the autoscaled one: it never loads more.
        assert peak["loads"] <= auto["loads"]
        # Every signal tick is accounted for by what bound it.
        assert sum(auto["bound_ticks"].values()) == pytest.approx(24 * 360, abs=2)
        # A longer hold means fewer scaling steps.
        assert slow["scale_downs"] <= auto["scale_downs"]


def test_bad_options_are_refused() -> None:
    done = subprocess.run([sys.executable, "-m", "loadtest.scenarios.autoscale", "--quick", "--hold", "soon"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--hold: not a list of seconds" in done.stderr
    done = subprocess.run([sys.executable, "-m", "loadtest.scenarios.autoscale", "--quick", "--target-rps", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "target_rps must be a finite number > 0" in done.stderr
