"""Server processes' collector settings (mesh.gctune), checked in a fresh interpreter so that the
test process's own collector is left alone: nothing changes before ``tune``; ``tune`` freezes
what is alive and raises the young threshold; ``refreeze`` (after a model library's import)
freezes what came since, and is a no-op in a process that was never tuned."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = """
import gc, json
from mesh import gctune
out = {"default": gc.get_threshold()}
gctune.refreeze()
out["frozen_untuned"] = gc.get_freeze_count()
gctune.tune()
out["tuned"] = gc.get_threshold()
out["frozen"] = gc.get_freeze_count()
import fractions, decimal, email.message  # a library imported while serving
gctune.refreeze()
out["refrozen"] = gc.get_freeze_count()
print(json.dumps(out))
"""


def test_tune_freezes_start_up_and_raises_the_young_threshold() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=True)
    out = json.loads(done.stdout)
    assert out["frozen_untuned"] == 0
    assert out["tuned"] == [10_000, out["default"][1], out["default"][2]]
    assert out["frozen"] > 1000
    assert out["refrozen"] > out["frozen"]
