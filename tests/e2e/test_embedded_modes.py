"""The README's main command, `mesh demo`, run as a user runs it (small and short), and
`mesh up --registry etcd://...` against an etcd the user already runs, whose registrations outlive
the mesh."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mesh.registry import open_store
from mesh.registry.etcd_server import EtcdProcess
from mesh.registry.keys import Keys
from tests.e2e.test_mesh_up import MeshUp, free_port
from tests.support.models import make_model

pytestmark = pytest.mark.e2e


def test_demo_trains_registers_serves_and_reports(tmp_path: Path) -> None:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "XDG_STATE_HOME": str(tmp_path / "state")}
    result = subprocess.run(
        [sys.executable, "-m", "mesh", "demo", "--port", str(free_port()), "--models", "12",
         "--duration", "3"], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "mesh is up" in out and "registered 12 models" in out
    assert "answers:     0 wrong, errors: none" in out
    assert "hits" in out and "loads" in out and "stopping" in out
    assert "Traceback" not in result.stderr
    # No silent phase: each says what it does before it starts, in order (issue 20).
    order = ["logs: ", "training 12 of 12 per-tenant classifiers", "starting a private etcd",
             "mesh is up", "metrics (Prometheus):", "preparing requests", "registered 12 models",
             "\nrequests:", "took:", "stopped; logs kept in"]
    positions = [out.find(marker) for marker in order]
    assert -1 not in positions and positions == sorted(positions), (positions, out)
    # Hits and misses count requests: together never more than the requests sent (retries apart).
    requests = int(re.search(r"requests:\s+(\d+) in", out).group(1))  # type: ignore[union-attr]
    hits, misses = map(int, re.search(r"cache:\s+(\d+) hits, (\d+) misses", out).groups())  # type: ignore[union-attr]
    assert 0 < hits + misses <= requests, out
    assert re.search(r"now \d+ copies loaded, of \d+ distinct models", out), out
    took = re.search(r"traffic ([\d.]+) s", out)
    assert took and float(took.group(1)) >= 3.0, out  # traffic for the promised duration


def test_mesh_up_with_an_existing_etcd_keeps_registrations(tmp_path: Path) -> None:
    etcd = EtcdProcess(tmp_path / "etcd")
    etcd.start()
    try:
        up = MeshUp(tmp_path, "--runtimes", "1", "--registry", etcd.url)
        try:
            assert f"registry {etcd.url}" in up.text()
            model = make_model("sklearn", tmp_path / "models", seed=1)
            base = [sys.executable, "-m", "mesh"]
            r = subprocess.run([*base, "model", "register", "kept", "--type", "sklearn", "--path",
                                str(model.path), "--router", up.address, "--load-now", "--sync"],
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 0 and "LOADED" in r.stdout, r.stdout + r.stderr
        finally:
            assert up.stop() == 0

        async def check() -> None:
            store, prefix = open_store(etcd.url)
            keys = Keys(prefix)
            try:
                assert await store.get(keys.model("kept")) is not None  # registration persists
                placements, _ = await store.get_prefix(keys.placements)
                instances, _ = await store.get_prefix(keys.instances)
                assert placements == [] and instances == []  # runtimes left cleanly
            finally:
                await store.close()

        asyncio.run(check())
    finally:
        etcd.stop()
