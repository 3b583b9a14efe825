"""``python -m loadtest.scenarios.fanout`` end to end, small: one etcd, three routers, the churn
writer's 10 simulated runtimes and 200 copies, 50 churn events a second for 3 s, then the same with
one router left.

The scenario runs as a user runs it (a child process). Every route change must reach every
router's route stream, each stream must end showing exactly the copies etcd holds, etcd must have
delivered each write once to each router (its own event counter), and no process may be left.
Only the report's shape and its correctness are asserted, never a speed. About 25 s on two cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from loadtest.report import REPO

pytestmark = pytest.mark.integration

ROUTERS = (3, 1)
RATE = 50
SECONDS = 3


@pytest.fixture(scope="module")
def fanout_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], dict]:
    out: Path = tmp_path_factory.mktemp("fanout") / "fanout.json"
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest.scenarios.fanout", "--routers", ",".join(map(str, ROUTERS)),
         "--rates", str(RATE), "--seconds", str(SECONDS), "--runtimes", "10", "--preload", "200",
         "--idle", "1", "--settle", "20", "--time-limit", "150", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=240)
    result = json.loads(out.read_text())["result"] if out.exists() else {}
    return proc, result


def test_every_change_reaches_every_router_and_the_report_says_so(
        fanout_run: tuple[subprocess.CompletedProcess[str], dict]) -> None:
    proc, result = fanout_run
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    steps = result["steps"]
    assert [(s["routers"], s["rate"]) for s in steps] == [(n, RATE) for n in ROUTERS]
    for step in steps:
        where = f"{step['routers']} routers"
        assert step["events"] == RATE * SECONDS, where
        # alternating loads and evictions, each a route change once written
        assert step["route_changes"] == step["events"], where
        assert step["missing"] == 0 and step["routes_differ"] == [] and step["stream_errors"] == [], where
        assert step["writes"]["placement_put"] > 0 and step["writes"]["placement_delete"] > 0
        assert step["writes"]["instance_put"] > 0
        # every write went to every router's watch, once
        assert step["delivered"] == step["expected_delivered"] == sum(step["writes"].values()) * step["routers"]
        assert step["delivered_per_s"] > 0
        for key in ("etcd_us_per_event", "router_us_per_event", "etcd_us_per_write"):
            assert step[key] > 0, (where, key)
        for key in ("to_all", "to_one", "write_rtt"):
            q = step[key]
            assert 0 < q["p50_ms"] <= q["p99_ms"] <= q["max_ms"], (where, key, q)
        assert step["to_one"]["p50_ms"] <= step["to_all"]["p50_ms"]
    assert [i["routers"] for i in result["idle"]] == list(ROUTERS)
    assert "to every router p50 / p99 / max" in proc.stdout and "events delivered/s" in proc.stdout
    assert result["survivors"] == []
    pids = [*result["pids"]["routers"], result["pids"]["etcd"], result["pids"]["writer"]]
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


@pytest.mark.parametrize("args, words", [
    (["--routers", "1,8"], "decreasing"),
    (["--rates", "0"], "positive"),
    (["--rates", "500", "--preload", "100"], "--preload"),
])
def test_bad_arguments_are_one_line_usage_errors(args: list[str], words: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "loadtest.scenarios.fanout", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert words in proc.stderr and "Traceback" not in proc.stderr
