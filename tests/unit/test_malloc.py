"""mesh.malloc: server processes bound glibc's arenas unless the operator's MALLOC_ARENA_MAX decides.
Run in fresh interpreters, since the setting is process-wide."""

from __future__ import annotations

import os
import subprocess
import sys

CODE = "from mesh.malloc import limit_arenas; print(limit_arenas())"


def _run(env: dict[str, str]) -> str:
    return subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True,
                          timeout=60, check=True).stdout.strip()


def test_arenas_are_limited_by_default_on_glibc() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    assert _run(env) == "True"


def test_the_operators_malloc_arena_max_wins() -> None:
    assert _run({**os.environ, "MALLOC_ARENA_MAX": "8"}) == "False"
