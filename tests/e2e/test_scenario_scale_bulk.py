"""``python -m loadtest.scenarios.scale --bulk N`` end to end with tiny steps: registrations go
through ``registerModels`` and every one lands, and the same run reports etcd's own single-key
create-if-absent rate (``raw_etcd_creates``, under a prefix of its own)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from loadtest.report import REPO

pytestmark = pytest.mark.integration


def test_bulk_mode_registers_everything_and_reports_the_raw_etcd_rate(tmp_path_factory: pytest.TempPathFactory) -> None:
    out = tmp_path_factory.mktemp("scale-bulk") / "scale.json"
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest.scenarios.scale", "--models", "3000", "--bulk", "500", "--raw", "1000",
         "--warm-models", "2", "--warm-requests", "20", "--lookups", "20", "--spec-cache", "100", "--in-flight", "32",
         "--no-list", "--time-limit", "120", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    result, markdown = data["result"], data["markdown"]
    register = result["steps"][1]["register"]
    assert register["registered"] == register["added"] == 3000 and register["errors"] == {}
    assert result["steps"][1]["memory"]["models_in_etcd"] == 3002
    raw = result["raw_etcd"]
    assert raw["created"] == 1000 and raw["errors"] == {} and raw["per_second"] > 0 and raw["in_flight"] == 32
    assert result["settings"]["bulk"] == 500
    assert "registerModels, 500 items a call" in markdown and "raw etcd, same run" in markdown
