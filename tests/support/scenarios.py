"""Running a loadtest scenario as a user does (``python -m loadtest.scenarios.<name> ... --out F``)
and reading its report: for the tests that check a scenario's report, not its timings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def run_scenario(name: str, args: list[str], tmp_path: Path, timeout_s: float = 240) -> tuple[dict[str, Any], str]:
    """The scenario's ``result`` and ``markdown``, after it exited 0 without a traceback (its
    temporary files under ``tmp_path``)."""
    temp = tmp_path / "temp"
    temp.mkdir(exist_ok=True)
    out = tmp_path / f"{name}.json"
    proc = subprocess.run([sys.executable, "-m", f"loadtest.scenarios.{name}", *args, "--out", str(out)],
                          capture_output=True, text=True, timeout=timeout_s, env={**os.environ, "TMPDIR": str(temp)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    data = json.loads(out.read_text())
    print("\n" + data["markdown"])
    return data["result"], data["markdown"]
