"""``python -m loadtest.scenarios.peers`` end to end with tiny settings: our mesh, MLServer and Ray Serve
each serve the same requests with no error, and no process of any of them survives.

Slow: starts three systems one after the other (about 45 s on two cores once the peer venvs exist).
"""

from __future__ import annotations

import psutil
import pytest

pytestmark = pytest.mark.slow


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
