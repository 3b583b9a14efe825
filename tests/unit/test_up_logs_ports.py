"""`mesh up`'s log directory (kept, pruned with a word, rotated) and its port probe (a port in
TIME_WAIT is free, a listened-on port is not; a taken port is replaced and said so)."""

from __future__ import annotations

import errno
import os
import socket
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from mesh.embedded.logdir import LogDir, default_base, open_log_dir
from mesh.embedded.up import _port_free, pick_port


def test_default_log_directory_is_per_run_under_xdg_state_and_old_runs_are_pruned_aloud(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    base = default_base()
    assert base == tmp_path / "mesh-serving" / "up"
    base.mkdir(parents=True)
    old = [base / f"2026010{d}-120000-{100 + d}" for d in range(1, 5)]
    for path in old:
        path.mkdir()
        (path / "router.log").write_text("old\n")
    (base / "notes").mkdir()  # not a run directory: never touched
    logs, notes = open_log_dir(None, keep_runs=3)
    assert logs.path.parent == base and logs.kept
    assert logs.path.name.endswith(f"-{os.getpid()}")
    # Ours and the two newest old runs are kept; the two oldest go, each with a line saying so.
    assert [p.exists() for p in old] == [False, False, True, True]
    assert len(notes) == 2 and all("removed the logs of an older run" in n for n in notes)
    assert str(old[0]) in notes[0]
    assert (base / "notes").exists()


def test_an_explicit_log_directory_is_appended_to_and_never_pruned(tmp_path: Path) -> None:
    target = tmp_path / "logs"
    target.mkdir()
    (target / "router.log").write_text("the run before\n")
    logs, notes = open_log_dir(target, keep_runs=1)
    assert logs.path == target and notes == []
    text = (target / "router.log").read_text()
    assert text.startswith("the run before\n") and "==== mesh up (pid" in text


def test_rotation_copies_and_truncates_a_log_its_writer_keeps_appending_to(tmp_path: Path) -> None:
    logs = LogDir(tmp_path, max_bytes=4096)
    writer = open(tmp_path / "runtime-0.log", "ab")  # as `mesh up` opens a child's log
    writer.write(b"x" * 5000 + b"\n")
    writer.flush()
    (tmp_path / "router.log").write_bytes(b"small\n")
    events = logs.rotate()
    assert events == ["logs: runtime-0.log passed 4 KiB, rotated to runtime-0.log.1"]
    assert (tmp_path / "runtime-0.log.1").stat().st_size == 5001
    assert (tmp_path / "runtime-0.log").stat().st_size == 0
    assert not (tmp_path / "router.log.1").exists()
    writer.write(b"after\n")  # O_APPEND: the next line lands at the new start, no hole of zeros
    writer.flush()
    assert (tmp_path / "runtime-0.log").read_bytes() == b"after\n"
    writer.close()


def _time_wait_port() -> int:
    """A port whose only trace is a connection in TIME_WAIT (the server closed first)."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    server_side, _ = listener.accept()
    listener.close()
    server_side.close()  # the active close: TIME_WAIT stays on the server's port
    time.sleep(0.05)
    client.close()
    return int(port)


def test_a_port_in_time_wait_is_free_and_a_listened_on_port_is_not() -> None:
    port = _time_wait_port()
    states = {c.status for c in psutil.net_connections("tcp4") if c.laddr and c.laddr.port == port}
    assert states == {psutil.CONN_TIME_WAIT}, states
    # What the probe used to do (no SO_REUSEADDR) says "taken" here; the servers would bind it.
    with socket.socket() as naive, pytest.raises(OSError) as refused:
        naive.bind(("127.0.0.1", port))
    assert refused.value.errno == errno.EADDRINUSE
    assert _port_free(port)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        assert not _port_free(taken)
        notes: list[str] = []
        chosen = pick_port(taken, "the router's metrics", notes)
        assert chosen != taken and _port_free(chosen)
        assert notes == [f"port {taken} is in use: the router's metrics on port {chosen} instead"]
    notes = []
    assert pick_port(port, "the router's metrics", notes) == port and notes == []


def test_a_runtime_metrics_port_set_in_the_environment_is_spread_over_the_runtimes() -> None:
    from mesh.embedded.up import _nth_port

    assert [_nth_port("9100", i) for i in range(3)] == ["9100", "9101", "9102"]
    assert _nth_port("0", 2) == "0" and _nth_port("-1", 1) == "-1"  # picked by each, or off
    assert _nth_port(None, 0) is None and _nth_port("", 0) is None  # not set: mesh up chooses


def test_mesh_up_gives_runtimes_direct_ports_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Smart clients need runtimes' direct ports: off unless asked (--direct-ports: a free one each;
    a port set in the environment: spread over the runtimes, as the metrics ports)."""
    import shutil

    from mesh.embedded.up import Mesh

    def direct_ports(**kw: Any) -> list[str | None]:
        mesh = Mesh(runtimes=2, port=0, registry=None, capacity=1 << 20, data_dir=None, config=None, **kw)
        try:
            return [c.env.get("MESH_RUNTIME_DIRECT_PORT") for c in mesh.children if c.component == "runtime"]
        finally:
            shutil.rmtree(mesh.workdir, ignore_errors=True)

    monkeypatch.delenv("MESH_RUNTIME_DIRECT_PORT", raising=False)
    assert direct_ports() == [None, None]  # the setting's default: off
    assert direct_ports(direct_ports=True) == ["0", "0"]
    monkeypatch.setenv("MESH_RUNTIME_DIRECT_PORT", "9300")
    assert direct_ports() == ["9300", "9301"]
