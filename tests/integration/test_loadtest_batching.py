"""``python -m loadtest.scenarios.batching --quick`` as a user runs it: batching off then on, real
router and runtime processes, and the report's shape (not its timings, which a busy test machine
makes meaningless)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_the_quick_run_reports_both_configurations_and_the_targets(tmp_path: Path) -> None:
    out = tmp_path / "batching.json"
    done = subprocess.run([sys.executable, "-m", "loadtest.scenarios.batching", "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "batching off" in done.stdout and "batching on" in done.stdout
    report = json.loads(out.read_text())
    assert report["scenario"] == "batching" and report["concurrency"] == 32
    assert [(r["round"], r["batch_max_size"]) for r in report["runs"]] == [(1, 0), (1, report["max_size"])]
    for run in report["runs"]:
        assert run["throughput_rps"] > 0 and 0 < run["p50_ms"] <= run["p99_ms"] and run["errors"] == {}
    assert report["speedup"]["target"] == 2.0 and len(report["speedup"]["per_round"]) == 1
    assert isinstance(report["speedup"]["met"], bool)
    assert report["p99_over_unbatched_ms"]["bound"] == report["max_wait_ms"] + 5
