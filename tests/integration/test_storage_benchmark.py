"""``python -m loadtest.scenarios.storage`` end to end with tiny settings (one 1 MB object, one round),
run as a user runs it: an rclone S3 server, a router and a runtime in the scenario's process.

Asserted: it completes and reports every target's fields; the targets defined by counts (the reload
read the disk cache, 100 concurrent first requests made one download and one load) hold; and it
leaves no temp directory and no server process behind. Timings are reported, never asserted: they
are what the scenario measures, and this machine is shared. About 10 s on two cores: not slow.

It runs in a child process (with ``TMPDIR`` pointing into the test's folder), not by calling ``main``
here: the scenario turns SIGTERM into ``SystemExit`` and reconfigures logging for its process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from loadtest.scenarios.storage_clients import RcloneServer

pytestmark = pytest.mark.integration


def test_the_storage_benchmark_reports_every_target(tmp_path: Path) -> None:
    pytest.importorskip("obstore")
    if RcloneServer.missing():
        pytest.skip(str(RcloneServer.missing()))
    temp = tmp_path / "temp"
    temp.mkdir()
    out = tmp_path / "storage.json"
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest.scenarios.storage", "--sizes", "1MB", "--repeat", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=240, env={**os.environ, "TMPDIR": str(temp)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    data = json.loads(out.read_text())
    result, markdown = data["result"], data["markdown"]
    print("\n" + markdown)

    # 1. Pull throughput: the three clients' MB/s and the ratios, for the one size.
    row = result["throughput"]["1 MB"]
    assert row["rounds"] == 1
    assert set(row["median_mbps"]) == {"pull", "pull+md5", "obstore", "raw-http"}
    assert all(v > 0 for v in row["median_mbps"].values())
    assert row["pull_vs_obstore"] > 0 and row["pull_vs_raw_http"] > 0
    assert isinstance(row["pass"], bool) and isinstance(row["pass_vs_raw_http"], bool)

    # 2. Time to first prediction, per model, and the reload from the disk cache.
    ttfp = result["first_prediction"]
    assert set(ttfp["models"]) == {"logistic", "forest"}
    for model in ttfp["models"].values():
        assert model["rounds"] == 1
        assert set(model["median_ms"]) == {"local", "s3", "raw", "pull"}
        assert all(v > 0 for v in model["median_ms"].values())
        assert isinstance(model["s3_minus_local_ms"], float) and model["bound_ms"] > 10
        assert isinstance(model["pass"], bool)
    reload = ttfp["reload"]
    assert reload["reload_ms"] > 0
    assert reload["counters"]["disk"] == 1 and reload["counters"]["downloaded"] == 0
    assert reload["counters"]["bytes"] == 0 and reload["pass"] is True

    # 3. 100 concurrent first requests: all answered, one download, one load.
    burst = result["concurrent"]
    assert burst["requests"] == burst["ok"] == 100 and burst["errors"] == []
    assert burst["counters"]["downloaded"] == 1 and burst["counters"]["loads"] == 1
    assert burst["pass"] is True

    for heading in ("### 1. Pull throughput", "### 2. Time to first prediction", "### 3. 100 concurrent"):
        assert heading in markdown
    assert markdown.count("PASS") + markdown.count("MISS") >= 6  # 2 per size, 2 models, reload, burst

    # Nothing left behind: the temp directory is empty (but for the ``.ses`` file onnxruntime writes
    # there when the runtime imports it), and no process serves from it.
    assert [p.name for p in temp.iterdir() if p.name != ".ses"] == []
    leftovers = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if any(str(temp) in arg for arg in p.info["cmdline"] or ()):
            leftovers.append(p.info)
    assert leftovers == []
