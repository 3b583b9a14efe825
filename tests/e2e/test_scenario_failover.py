"""``python -m loadtest.scenarios.failover`` end to end with small settings (3 runtimes, 10 models,
60 requests/s for 10 s, SIGKILL at 3 s), run as a user runs it.

Asserted is what holds whatever the router's retries achieve: the killed runtime is gone, its
placements leave the registry within the lease TTL plus a margin, every model answers again by the
end, the report has its timeline, and no process the scenario started survives it. The number of
failed requests is reported (printed with ``-s``), not asserted: it is what the scenario measures.

About 17 s on two cores (start-up, 10 s of load, waiting for the lease to expire), so it is not
marked slow; e2e like its neighbours (several real processes, the scenario's command line).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from mesh.settings import RegistrySettings

pytestmark = pytest.mark.e2e

MARGIN_S = 3.0  # registry polling (0.1 s), etcd's lease expiry check, a loaded machine


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_sigkill_under_load_is_measured_and_leaves_no_process(tmp_path: Path) -> None:
    out = tmp_path / "failover.json"
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest.scenarios.failover", "--runtimes", "3", "--models", "10",
         "--rate", "60", "--duration", "10", "--kill-at", "3", "--signal", "kill", "--out", str(out)],
        capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    data = json.loads(out.read_text())
    [run] = data["result"]["runs"]
    print(f"\nfailover (SIGKILL): {run['requests']} requests, {run['error_total']} errors {run['errors']}, "
          f"registry {({k: v for k, v in run['registry'].items() if k != 'samples'})}")

    # The runtime holding the most models was killed by its PID, and died of SIGKILL.
    victim = run["victim"]
    assert victim["exit_code"] == -9
    assert victim["models"] == max(run["placements_before"]["models_per_instance"].values())
    assert not _alive(victim["pid"])

    # Its record and placements left the registry when its lease expired, not later.
    ttl = RegistrySettings().lease_ttl_s
    assert run["settings"]["lease_ttl_s"] == ttl
    for key in ("instance_gone_after_s", "placements_gone_after_s"):
        assert run["registry"][key] is not None, run["registry"]
        assert 0 < run["registry"][key] <= ttl + MARGIN_S, run["registry"]

    # Every model is served again: loaded on a survivor, and answering through the router.
    assert run["registry"]["all_models_on_survivors_after_s"] is not None
    assert run["reloaded"]["lost_now_on_survivors"] == run["reloaded"]["lost_only_copy"] == victim["only_copy"]
    assert run["reloaded"]["models_on_survivors_at_end"] == 10
    assert run["probe"] == {"models": 10, "answered": 10, "failed": {}}

    # The load ran, and the numbers add up.
    assert run["requests"] > 0.7 * 60 * 10
    assert run["ok"] + run["error_total"] == run["requests"]
    assert run["errors_before_kill_client"] == 0

    # The report: the per-second timeline (also in the raw result) and the registry events.
    markdown = data["markdown"]
    header = next(line for line in markdown.splitlines() if line.startswith("| second "))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "second", "since kill (s)", "sent", "ok", "errors", "p50 (ms)", "p99 (ms)", "registry"]
    assert "signal" in markdown
    assert [w["second"] for w in run["timeline"]] == list(range(10))
    assert sum(w["sent"] for w in run["timeline"]) >= run["requests"]

    # No process survives: the servers, the killed one included, and the private etcd.
    survivors = [f"{name} (pid {pid})" for name, pid in run["pids"].items() if pid and _alive(pid)]
    assert survivors == []


def test_bad_arguments_are_one_line_and_start_nothing() -> None:
    proc = subprocess.run([sys.executable, "-m", "loadtest.scenarios.failover", "--duration", "5",
                           "--kill-at", "9"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "--kill-at" in proc.stderr.strip().splitlines()[-1]
