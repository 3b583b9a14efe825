"""``python -m loadtest.scenarios.graphs --quick`` as a user runs it: real router and runtime
processes, a two-step Sequence against the same two models called directly, and the report's
shape (not its timings, which a busy test machine makes meaningless)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_the_quick_run_reports_graph_and_direct_latencies_and_the_target(tmp_path: Path) -> None:
    out = tmp_path / "graphs.json"
    done = subprocess.run([sys.executable, "-m", "loadtest.scenarios.graphs", "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    report = json.loads(out.read_text())
    assert report["scenario"] == "graphs" and len(report["rounds"]) == 1
    (run,) = report["rounds"]
    for key in ("graph_ms", "direct_sum_ms", "direct_a_ms", "direct_b_ms"):
        assert 0 < run[key]["p50"] <= run[key]["p99"], (key, run[key])
    assert run["graph_minus_direct_p50_ms"] == round(run["graph_ms"]["p50"] - run["direct_sum_ms"]["p50"], 3)
    summary = report["graph_minus_direct_p50_ms"]
    assert summary["target"] == 1.0 and isinstance(summary["met"], bool)
    assert "graph - (a + b) at p50" in done.stdout
