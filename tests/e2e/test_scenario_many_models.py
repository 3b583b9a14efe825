"""``python -m loadtest.scenarios.many_models`` end to end with tiny settings: 300 registered models of
which about 10 % fit, Zipf traffic, both eviction policies, each on a fresh cluster of real processes
(etcd, two runtimes, a router). The models really are evicted and reloaded, every request is served,
and no process it started survives. About 25 s on two cores.
"""

from __future__ import annotations

import subprocess
import sys

import psutil
import pytest

pytestmark = pytest.mark.integration


def test_small_run_loads_evicts_and_serves_every_request_with_both_policies() -> None:
    from loadtest.scenarios.many_models import BASELINE_POLICY, DEFAULT_POLICY, Settings, bench, render

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    settings = Settings(models=300, distinct=10, fit=0.10, rate=60.0, duration=4.0, warmup=1.0)
    out = bench(settings)

    assert list(out["policies"]) == [DEFAULT_POLICY, BASELINE_POLICY]
    cal = out["calibration"]
    assert cal["size_bytes"] > 0 and cal["load_slots"] >= 1
    # 10 % of 300 models over 2 runtimes: 15 models' worth each, plus what the loads in flight reserve
    assert cal["capacity_bytes"] == 15 * cal["size_bytes"] + cal["load_slots"] * cal["predicted_bytes"]
    requests = {name: r["requests"] for name, r in out["policies"].items()}
    assert len(set(requests.values())) == 1, f"the policies saw different schedules: {requests}"
    for name, r in out["policies"].items():
        assert r["registration"]["models"] == 300, name
        assert r["requests"] > 100, f"{name}: {r['requests']} requests"
        assert r["ok"] == r["requests"] and r["errors"] == {} and r["dropped"] == 0, f"{name}: {r}"
        cache = r["cache"]
        assert 0 < cache["hit_ratio"] < 1, f"{name}: {cache}"
        assert r["loads"] > 0 and r["evictions"] > 0, f"{name}: loads {r['loads']}, evictions {r['evictions']}"
        assert 0 < r["end"]["copies_loaded"] < 300
        assert r["load_sizes"]["loads"] > 0
    text = render(out)
    assert "| figure" in text and DEFAULT_POLICY in text and "cache hit ratio" in text
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before


@pytest.mark.parametrize("argv, message", [
    (["--fit", "0"], "--fit"),
    (["--policy", "nope"], "unknown eviction policy"),
    (["--rate", "x"], "--rate"),
])
def test_bad_argument_is_one_line_and_nonzero(argv: list[str], message: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "loadtest.scenarios.many_models", *argv],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
