"""What `mesh up` tells its operator, checked as a user meets it (issue 20, part 5): a real
`mesh up` subprocess (private etcd, router, runtimes) whose printed log directory holds the
components' logs after exit, whose printed metrics endpoints answer, and whose printed hints
work when run as printed, through a shell, with a `MESH_ROUTER` that points elsewhere."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.test_mesh_up import MeshUp, free_port

pytestmark = [pytest.mark.e2e]


def _block(text: str, first: str, last: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(first))
    end = next(i for i, line in enumerate(lines) if i > start and line.startswith(last))
    return lines[start:end]


def test_mesh_up_keeps_its_logs_prints_its_metrics_and_hints_that_work_as_printed(tmp_path: Path) -> None:
    # ModelMesh's metrics port held by someone else: `mesh up` must say where the router's went.
    import socket

    squatter = socket.socket()
    try:
        squatter.bind(("127.0.0.1", 2112))
        squatter.listen()
        held = True
    except OSError:  # another process holds it already, which is the same situation
        held = False
    # A fresh cache: the example model the hints name is written while the mesh starts.
    try:
        up = MeshUp(tmp_path, "--runtimes", "2", env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    finally:
        squatter.close()
    try:
        deadline_text = "Ctrl-C stops everything."
        import time

        deadline = time.monotonic() + 90
        while deadline_text not in up.text():
            assert time.monotonic() < deadline and up.proc.poll() is None, up.text()
            time.sleep(0.1)
        text = up.text()
        # The log directory: printed first, before anything starts, under XDG_STATE_HOME.
        first = text.splitlines()[0]
        match = re.fullmatch(r"logs: (\S+) \(kept after exit; --logs DIR to choose\)", first)
        assert match, text
        logs = Path(match.group(1))
        assert logs.parent == tmp_path / "state" / "mesh-serving" / "up"

        # Every metrics endpoint: the router's and each runtime's, answering with their metrics.
        endpoints = dict(line.split() for line in _block(text, "  router ", "try:")
                         if not line.startswith("  note:"))
        assert set(endpoints) == {"router", "runtime-0", "runtime-1"}, text
        expected = {"router": "mesh_router_instances", "runtime-0": "modelmesh_instance_capacity_bytes",
                    "runtime-1": "modelmesh_instance_capacity_bytes"}
        for name, url in endpoints.items():
            with urllib.request.urlopen(url, timeout=10) as answer:
                assert expected[name] in answer.read().decode(), name
        assert len(set(endpoints.values())) == 3
        router_port = int(endpoints["router"].rsplit(":", 1)[1].split("/")[0])
        note = f"  note: port 2112 is in use: the router's metrics on port {router_port} instead"
        if held:
            assert router_port != 2112 and note in text.splitlines(), text
        else:  # someone else's port: it may have been freed before `mesh up` looked
            assert router_port == 2112 or note in text.splitlines(), text

        # The hints, run as printed by a shell whose MESH_ROUTER names no router.
        hints = [line.removeprefix("try:").strip() for line in _block(text, "try:", "Ctrl-C")]
        assert len(hints) == 5 and all(h for h in hints), hints
        assert f"--router {up.address}" in hints[0]
        env = {**os.environ, "MESH_ROUTER": "127.0.0.1:1"}
        outputs = []
        for hint in hints:
            r = subprocess.run(hint, shell=True, capture_output=True, text=True, timeout=120, env=env)
            assert r.returncode == 0, f"{hint}\n{r.stdout}{r.stderr}"
            assert "Traceback" not in r.stderr
            outputs.append(r.stdout)
        assert "registered iris" in outputs[0]
        assert "predict" in outputs[1]
        assert "iris" in outputs[2]
        assert json.loads(outputs[3]) == {"predictions": [0]}  # iris' first class, as the row is
        assert "mesh_router_instances" in outputs[4]
    finally:
        code = up.stop()
    assert code == 0
    assert f"stopped; logs kept in {logs}" in up.text()
    # The logs outlive the mesh: each component's, with what it logged.
    for name in ("router.log", "runtime-0.log", "runtime-1.log", "etcd.log"):
        assert (logs / name).stat().st_size > 0, name
    assert "iris" in (logs / "runtime-0.log").read_text() + (logs / "runtime-1.log").read_text()


def test_mesh_up_logs_go_where_logs_says_and_a_start_failure_names_them(tmp_path: Path) -> None:
    """``--logs DIR``: the run's logs in DIR; a mesh that cannot start says so in one line with the
    directory to read (here the router's port is held by another process)."""
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        logs = tmp_path / "my-logs"
        r = subprocess.run(
            [sys.executable, "-m", "mesh", "up", "--runtimes", "1", "--port", str(port), "--logs", str(logs)],
            capture_output=True, text=True, timeout=120,
            env={**os.environ, "MESH_ROUTER_REST_PORT": str(free_port())})
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stdout.splitlines()[0] == f"logs: {logs} (kept after exit; --logs DIR to choose)"
    errors = r.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("mesh up: router exited during start-up"), r.stderr
    assert f"(logs: {logs})" in errors[0]
    assert "Traceback" not in r.stderr
    assert (logs / "router.log").read_text().strip()  # why it failed is in the kept log
    assert (logs / "runtime-0.log").exists() and (logs / "etcd.log").exists()


def test_mesh_up_refuses_bad_log_options_in_one_line(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "mesh", "up", "--log-max-size", "12 parsecs"],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "XDG_STATE_HOME": str(tmp_path)})
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("mesh up:"), r.stderr
    blocked = tmp_path / "file"
    blocked.write_text("")
    r = subprocess.run([sys.executable, "-m", "mesh", "up", "--logs", str(blocked / "sub")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "cannot create the log directory" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
