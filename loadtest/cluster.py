"""The processes a benchmark runs against: a private etcd, runtimes, a router, an echo server.

Every component is started the way ``mesh up`` starts it (``python -m mesh serve <component>
--ready-file F`` with ``MESH_*`` environment variables, port 0, bound to 127.0.0.1), each in its
own process and session, with its output in a log file under a temporary work directory. The
benchmark (the load generator) is the parent process and never runs inside a server.

Hosts: given a ``loadtest.netns.Host`` (``Cluster(etcd_host=...)``, ``start_router(host=...)``,
``start_runtime(host=...)``, ``start_echo(host=...)``), a process runs inside that host's network
namespace (``ip netns exec``, which execs: the PID is still the server's) and binds the host's
address, gRPC and metrics ports alike, so that routers, runtimes and etcd talk over the hosts'
delayed links and this process reaches them over the bridge.

Stopping: :meth:`Cluster.close` stops what it started, by PID, in the order ``mesh up`` uses
(router, then runtimes and other servers, then etcd): SIGTERM, then SIGKILL after a grace period,
always reaped. Use the cluster as a context manager so that this happens on any exit; if the
benchmark itself is SIGKILLed, the mesh components and the echo server notice that their parent
is gone (``MESH_PARENT_PID``) and exit within a second or so, and only the etcd is left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil

from loadtest.netns import Host
from mesh.embedded.up import terminate
from mesh.registry.etcd_server import EtcdProcess

READY_TIMEOUT_S = 60.0
STOP_GRACE_S = 10.0


@dataclass
class Server:
    """One server process we started; ``endpoint`` is what it wrote to its ready file."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    endpoint: str = ""
    _ps: psutil.Process | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def ps(self) -> psutil.Process:
        if self._ps is None:
            self._ps = psutil.Process(self.proc.pid)
        return self._ps

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process (all its threads) so far."""
        t = self.ps.cpu_times()
        return t.user + t.system

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def events(self, name: str) -> list[dict[str, Any]]:
        """The server's JSON log events called ``name`` (servers started here log JSON lines)."""
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("event") == name:
                found.append(event)
        return found

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        terminate(self.proc, grace_s)


def etcd_metrics(port: int, names: Iterable[str]) -> dict[str, float]:
    """The named samples of an etcd's ``/metrics`` (0.0 for any it does not export)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = dict.fromkeys(names, 0.0)
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in out:
            out[name] = float(value)
    return out


class Cluster:
    """A work directory, a private etcd, and the servers started in it."""

    def __init__(self, *, log_level: str = "info", etcd_host: Host | None = None,
                 etcd_quota_bytes: int = 0) -> None:
        """``etcd_quota_bytes``: the etcd's ``--quota-backend-bytes`` (0: etcd's default, 2 GiB)."""
        self.workdir = Path(tempfile.mkdtemp(prefix="mesh-bench-"))
        self.etcd = (EtcdProcess(self.workdir / "etcd", quota_bytes=etcd_quota_bytes) if etcd_host is None else
                     EtcdProcess(self.workdir / "etcd", host=etcd_host.address, netns=etcd_host.netns,
                                 quota_bytes=etcd_quota_bytes))
        self.servers: list[Server] = []
        self._env = dict(os.environ)
        self._env.update({"MESH_PARENT_PID": str(os.getpid()), "MESH_LOG_FORMAT": "json",
                          "MESH_LOG_LEVEL": log_level})

    @property
    def registry_url(self) -> str:
        return self.etcd.url

    def __enter__(self) -> Cluster:
        self.etcd.start()
        self._env["MESH_REGISTRY_URL"] = self.etcd.url
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # --- starting -----------------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str], env: dict[str, str], host: Host | None = None) -> Server:
        ready = self.workdir / f"{name}.ready"
        log_path = self.workdir / f"{name}.log"
        if host is not None:
            argv = host.argv(argv)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen([*argv, "--ready-file", str(ready)], env=env, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)  # Ctrl-C reaches us; we stop them in order
        server = Server(name, proc, log_path)
        self.servers.append(server)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not ready.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited during start-up (code {proc.returncode}):\n"
                                   + server.log_tail())
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not ready after {READY_TIMEOUT_S:.0f} s:\n" + server.log_tail())
            time.sleep(0.02)  # polling a child's ready file: there is no event to wait on
        server.endpoint = ready.read_text().strip()
        return server

    def start_runtime(self, name: str = "runtime-0", *, capacity_bytes: int = 512 * 2**20,
                      extra_env: dict[str, str] | None = None, host: Host | None = None) -> Server:
        env = {**self._env, "MESH_RUNTIME_PORT": "0", "MESH_RUNTIME_METRICS_PORT": "0",
               "MESH_RUNTIME_CAPACITY_BYTES": str(capacity_bytes),
               "MESH_RUNTIME_INSTANCE_ID": f"{name}-{os.getpid()}",
               "MESH_RUNTIME_STATE_DIR": str(self.workdir / f"{name}.state"),
               **_bind(host, "RUNTIME"), **(extra_env or {})}
        return self._spawn(name, [sys.executable, "-m", "mesh", "serve", "runtime"], env, host)

    def start_router(self, name: str = "router", *, extra_env: dict[str, str] | None = None,
                     host: Host | None = None) -> Server:
        env = {**self._env, "MESH_ROUTER_PORT": "0", "MESH_ROUTER_METRICS_PORT": "0",
               "MESH_ROUTER_REST_PORT": "-1", **_bind(host, "ROUTER"), **(extra_env or {})}
        return self._spawn(name, [sys.executable, "-m", "mesh", "serve", "router"], env, host)

    def start_echo(self, name: str = "echo", *, host: Host | None = None) -> Server:
        where = ["--host", host.address] if host is not None else []
        return self._spawn(name, [sys.executable, "-m", "loadtest.echo_server", *where], dict(self._env), host)

    def start_naive_proxy(self, backend: str, name: str = "naive-proxy") -> Server:
        return self._spawn(name, [sys.executable, "-m", "loadtest.naive_proxy", "--backend", backend],
                           dict(self._env))

    # --- stopping -----------------------------------------------------------------------------
    def close(self) -> None:
        # mesh up's order: routers stop accepting first; runtimes (and the echo server) drain and
        # revoke their leases; etcd goes last. SIGTERM all of a kind at once so drains overlap.
        routers = [s for s in self.servers if s.name.startswith("router")]
        others = [s for s in self.servers if s not in routers]
        for group in (routers, others):
            for s in group:
                if s.proc.poll() is None:
                    s.proc.send_signal(signal.SIGTERM)
            for s in group:
                s.stop()
        self.etcd.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _bind(host: Host | None, group: str) -> dict[str, str]:
    """A component's bind addresses on ``host`` (gRPC, REST and metrics alike), none without one."""
    if host is None:
        return {}
    return {f"MESH_{group}_HOST": host.address, f"MESH_{group}_METRICS_HOST": host.address}


def prepare_benchmark_process() -> None:
    """In the benchmark process: SIGTERM becomes SystemExit, so that ``finally`` blocks stop the
    servers; the mesh library code we call (etcd start-up, registry reads) logs warnings only; and
    the collector is set up as our servers' (``mesh.gctune``), so that a full collection of the
    load generator's imports (95-190 ms measured in the peers driver) does not land in the
    latencies it measures."""
    from mesh import gctune
    from mesh.logging import configure
    from mesh.settings import LogSettings

    gctune.tune()
    configure(LogSettings(level="warning", format="console"), component="loadtest")

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
