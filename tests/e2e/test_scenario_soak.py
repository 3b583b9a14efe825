"""``python -m loadtest.scenarios.soak`` end to end, shortened: 45 s of mixed traffic (40 req/s over
30 models and 5 vModels, management calls at 2/s, two routers behind one round-robin channel) with
a fault every 12 s (a router restart on the same port, a runtime SIGKILLed and one SIGTERMed, each
replaced), run as a user runs it.

Asserted is behaviour: the faults happened, to the processes we started, in the planned order; the
load and the management stream ran; after them the registry holds no dead instance, every vModel is
at its last target, listModels and the answers match what was registered and unregistered; the
report has its verdict and per-window tables; no process the scenario started survives it; no
request fails outside the faults' windows, and none in the window of the router restart (the other
router serves). Failures right after a runtime's SIGKILL are printed, not asserted.

About 2.5 minutes on two shared cores (calibration, start-up, 45 s of load, a SIGTERMed runtime's
re-homing and drain), hence ``slow``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DURATION, RATE, MODELS = 45, 40, 30


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_soak_with_faults_stays_consistent_and_leaves_no_process(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest.scenarios.soak", "--duration", str(DURATION), "--kill-every", "12",
         "--models", str(MODELS), "--rate", str(RATE), "--out", str(out)],
        capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    data = json.loads(out.read_text())
    r = data["result"]
    print(f"\nsoak: {r['requests']} requests, {r['error_total']} errors {r['errors']}, outside the faults' "
          f"windows {r['errors_outside_faults']}; loads {r['loads']}, evictions {r['evictions']}; "
          f"verdicts {r['verdicts']}")

    # The faults: a router restart first, then a runtime SIGKILLed and one SIGTERMed, each replaced.
    faults = r["faults"]
    assert [f["kind"] for f in faults] == ["router-restart", "kill", "term"]
    assert [f["exit_code"] for f in faults] == [0, -9, 0]
    assert [f["replacement"] for f in faults] == ["router-2", "runtime-3", "runtime-4"]
    assert all(f["replacement_ready_after_s"] > 0 for f in faults)
    assert r["pids"]["router-2"] != r["pids"]["router-0"]
    # Two routers behind a round-robin channel, as behind a Service: whatever the faults, no request
    # fails outside the few seconds around them, and none fails for the router restart itself.
    assert r["errors_outside_faults"] == {}, r["errors_outside_faults"]
    restart = [w for w in r["windows"] if "router-restart router-0" in w["faults"]]
    assert restart and restart[0]["errors"] == {}, restart

    # The load and the management stream ran through them.
    assert r["requests"] > 0.7 * RATE * DURATION
    assert r["ok"] + r["error_total"] == r["requests"]
    calls = r["management"]["calls"]
    for op in ("registerModel", "infer-new", "getModelStatus", "setVModel", "unregisterModel"):
        assert calls.get(op, 0) > 0, calls
    assert r["management"]["status_not_found"] == 0

    # Consistency after the faults.
    checks = r["checks"]
    assert checks["registry"]["ok"], checks["registry"]
    assert checks["registry"]["live_instances"] == 3
    assert checks["vmodels"]["ok"], checks["vmodels"]
    assert checks["listed"]["ok"], checks["listed"]
    assert checks["answer"]["ok"] and checks["answer"]["models"] >= MODELS, checks["answer"]
    assert checks["unregistered"]["ok"] and checks["unregistered"]["models"] > 0, checks["unregistered"]
    assert checks["ok"] and r["verdicts"]["consistent"]

    # The report: verdicts, faults and the per-window table, one row per 10 s window.
    markdown = data["markdown"]
    assert "**Verdict:" in markdown
    header = next(line for line in markdown.splitlines() if line.startswith("| window from (s) "))
    assert [c.strip() for c in header.strip("|").split("|")][:4] == ["window from (s)", "sent", "ok", "errors"]
    assert [w["from_s"] for w in r["windows"]] == [0, 10, 20, 30, 40]
    assert all("router-1" in w["procs"] for w in r["windows"])  # the router measured for leaks
    assert all("etcd" in w["procs"] for w in r["windows"])

    # No process survives: routers, runtimes (killed ones included), the private etcd.
    survivors = [f"{name} (pid {pid})" for name, pid in r["pids"].items() if pid and _alive(pid)]
    assert survivors == []


def test_bad_arguments_are_one_line_and_start_nothing() -> None:
    proc = subprocess.run([sys.executable, "-m", "loadtest.scenarios.soak", "--duration", "30",
                           "--kill-every", "25"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "--kill-every" in proc.stderr.strip().splitlines()[-1]
