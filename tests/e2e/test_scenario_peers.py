"""``python -m loadtest.scenarios.peers`` end to end with tiny settings: our mesh, MLServer and Ray Serve
each serve the same requests with no error, and no process of any of them survives; in the fit mode
(room for a quarter of the models) our mesh and Ray load while measured, and MLServer is left out.

Slow: starts three systems one after the other (about 45 s on two cores once the peer venvs exist);
the fit-mode test calibrates a runtime first and then starts two systems (120 to 180 s on two shared
cores).
"""

from __future__ import annotations

import psutil
import pytest


@pytest.mark.slow
def test_three_systems_serve_the_same_trace_and_leave_no_process() -> None:
    from loadtest.scenarios.peers import SYSTEMS, bench, render

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    out = bench(models=5, rate=50.0, concurrency=4, duration=2.0, warmup=0.5)

    assert set(out["systems"]) == set(SYSTEMS)
    for name, r in out["systems"].items():
        for phase in ("open", "closed"):
            assert r[phase]["requests"] > 0, f"{name} {phase} served nothing: {r[phase]}"
            assert r[phase]["errors"] == {}, f"{name} {phase} errors: {r[phase]['errors']}"
        assert r["survivors"] == [], f"{name} left processes behind: {r['survivors']}"
        assert r["peak_rss_mb"] > 0
    # Every system saw the same open-loop schedule.
    assert len({r["open"]["offered"] for r in out["systems"].values()}) == 1
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before
    assert "| mesh" in render(out)


@pytest.mark.slow
def test_fit_mode_loads_while_measured_and_leaves_no_process() -> None:
    from loadtest.scenarios.peers import bench, render

    models, fit = 20, 0.25
    k = round(fit * models)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    out = bench(models=models, rate=50.0, concurrency=4, duration=2.0, warmup=0.5, fit=fit)

    s = out["settings"]
    assert (s["fit"], s["k"], s["ray_max_num_models_per_replica"]) == (fit, k, k)
    assert set(out["systems"]) == {"mesh", "ray"}, "MLServer (no eviction) is not a default here"
    ray, mesh = out["systems"]["ray"], out["systems"]["mesh"]
    assert ray["max_num_models_per_replica"] == k
    # Our mesh ran with the capacity the calibration measured, recorded with how it was found.
    room = s["mesh_room"]
    assert int(s["mesh_capacity_per_runtime"]) == room["capacity_bytes_per_runtime"]
    assert room["capacity_bytes_per_runtime"] > room["predicted_bytes"] > 0 and room["size_bytes"] > 0
    # No pass-through room unless asked for (--passthrough), as the runtime's default (issue 18).
    assert room["passthrough_bytes"] == 0
    for name, r in out["systems"].items():
        for phase in ("open", "closed"):
            assert r[phase]["requests"] > 0, f"{name} {phase} served nothing: {r[phase]}"
        # The working set does not fit: more loads while measured than there is room for.
        assert r["cache"]["loads"] > k, f"{name}: {r['cache']}"
        assert r["survivors"] == [], f"{name} left processes behind: {r['survivors']}"
    assert 0 < mesh["cache"]["hit_ratio"] < 1, mesh["cache"]
    for phase in ("open", "closed"):  # evicting and reloading, our mesh still answers everything
        assert mesh[phase]["errors"] == {}, f"mesh {phase} errors: {mesh[phase]['errors']}"
    assert ray["cache"]["hit_ratio"] is None  # not counted: shown as n/a, never estimated
    # The cluster simulator replayed our mesh's recorded requests with its capacity and policy, from
    # the sizes and load times its runtimes logged (issue 18: the two hit ratios compared).
    sim = mesh["simulated"]
    assert sim["capacity_bytes_per_runtime"] == room["capacity_bytes_per_runtime"] and sim["instances"] == 2
    assert sim["passthrough_bytes"] == room["passthrough_bytes"]
    assert sim["pooled"] == 0 and sim["mesh"]["passed_through"] == 0
    assert sim["requests_recorded"] >= sim["requests_measured"] > 0 and sim["models_loaded"] > 0
    assert sim["hits"] + sim["misses"] + sim["joined"] == sim["requests_measured"]
    assert 0 < sim["hit_ratio"] < 1 and sim["loads"] > k
    assert sim["mesh"]["hit_ratio"] == mesh["cache"]["hit_ratio"]
    assert sim["difference_points"] == round(100 * (sim["mesh"]["hit_ratio_per_request"] - sim["hit_ratio"]), 2)
    assert "simulated" not in ray
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before
    text = render(out)
    assert f"fit {fit:g}: room for K = {k} models" in text
    assert "MLServer is not in this run" in text
    assert f"The cluster simulator on the same {sim['requests_measured']:,} measured requests" in text


@pytest.mark.parametrize("argv, message", [
    (["--mesh-runtimes", "0"], "--mesh-runtimes must be 1 to 16"),
    (["--fit", "0.2", "--mesh-runtimes", "1"], "the fit mode sizes 2 runtimes"),
])
def test_mesh_runtimes_out_of_range_is_a_usage_error(argv: list[str], message: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from loadtest.scenarios.peers import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_passthrough_must_be_auto_or_bytes(capsys: pytest.CaptureFixture[str]) -> None:
    from loadtest.scenarios.peers import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--fit", "0.2", "--passthrough", "lots"])
    assert exit_info.value.code == 2
    assert "--passthrough must be auto or a number of bytes, got 'lots'" in capsys.readouterr().err


@pytest.mark.parametrize("fit", ["0", "-0.5", "1.5", "nan"])
def test_fit_out_of_range_is_a_usage_error(fit: str, capsys: pytest.CaptureFixture[str]) -> None:
    from loadtest.scenarios.peers import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--fit", fit])
    assert exit_info.value.code == 2
    assert "--fit must be in (0, 1]" in capsys.readouterr().err
