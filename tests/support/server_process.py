"""Third-party servers run as processes of their own for the tests: start, wait until they answer, stop.

The repository's own test servers print ``ready <port>`` (:mod:`tests.support.model_servers`);
third-party ones (moto, rclone, Azurite, the GCS emulators) do not, so here readiness is a probe
that the caller gives: a port read from the server's log, or an HTTP answer with a marker only that
server gives. Stopping is :func:`tests.support.model_servers.stop_server`: SIGTERM to the one PID
that was started, a bounded wait, then SIGKILL. Every process also gets the parent-death signal
(:func:`mesh.procs.die_with_parent`), so a killed pytest leaves no server holding a port.

Each process writes stdout and stderr to one log file, never to a pipe: a pipe that nobody reads
fills up and stalls the server mid-test. A server that exits, or stays silent past the deadline,
raises :class:`ServerFailed` with the log's tail, so the failing test shows why.

Ports: a server that can bind port 0 and log the port it got is asked to (no race at all). The
others get a port that was free a moment before; another process can take it in between, so
:func:`start_on_free_port` tries a new port when the log says the address was in use.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from mesh.procs import die_with_parent
from tests.support.model_servers import stop_server

START_TIMEOUT_S = 30.0  # the slowest server here (Azurite) answers within about 1 s
STOP_GRACE_S = 5.0  # SIGTERM to SIGKILL
POLL_S = 0.05
PORT_TRIES = 3
_IN_USE = ("address already in use", "eaddrinuse")


class ServerFailed(RuntimeError):
    """A server exited before it answered, or did not answer in time."""


class _PortTaken(ServerFailed):
    pass


def log_tail(log: Path, limit: int = 4000) -> str:
    try:
        text = log.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return text[-limit:]


def free_port() -> int:
    """A port of 127.0.0.1 that was free when this returned (see the module docstring)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def answers(url: str, marker: bytes = b"", *, context: ssl.SSLContext | None = None) -> bool:
    """True once ``url`` answers with ``marker`` in its body (any status: an error page counts)."""
    try:
        with urllib.request.urlopen(url, timeout=1.0, context=context) as response:
            body: bytes = response.read()
    except urllib.error.HTTPError as error:
        body = error.read()
    except (OSError, ValueError):
        return False
    return marker in body


def start(what: str, argv: Sequence[str], log: Path, ready: Callable[[], int | None], *,
          env: Mapping[str, str] | None = None, cwd: Path | None = None,
          timeout_s: float = START_TIMEOUT_S) -> tuple[subprocess.Popen[str], int]:
    """Start ``argv`` (output appended to ``log``) and poll ``ready`` until it gives the port the
    server answers on. Raises ServerFailed (after stopping the process) if it exits first or
    ``timeout_s`` passes."""
    with log.open("a") as out:
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=env, cwd=cwd, text=True, preexec_fn=die_with_parent())
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            exited = proc.poll() is not None
            port = None if exited else ready()
            if port is not None:
                return proc, port
            tail = log_tail(log)
            if any(sign in tail.lower() for sign in _IN_USE):
                # Some servers log a failed bind from a thread and live on; none of them recovers.
                raise _PortTaken(f"{what}: its port was taken; log:\n{tail}")
            if exited:
                raise ServerFailed(f"{what} exited with {proc.returncode} before it answered; log:\n{tail}")
            if time.monotonic() > deadline:
                raise ServerFailed(f"{what} did not answer within {timeout_s:.0f} s; log:\n{tail}")
            time.sleep(POLL_S)
    except BaseException:
        stop(proc)
        raise


def start_on_free_port(what: str, argv_for: Callable[[int], Sequence[str]], log: Path,
                       answers_on: Callable[[int], bool], *, env: Mapping[str, str] | None = None,
                       cwd: Path | None = None,
                       timeout_s: float = START_TIMEOUT_S) -> tuple[subprocess.Popen[str], int]:
    """:func:`start` for servers that cannot bind port 0: ``argv_for(port)`` on a free port, a new
    port when that one was taken meanwhile."""
    for attempt in range(PORT_TRIES):
        port = free_port()
        log.write_text("")  # a fresh log: the last try's "address already in use" must not count again
        try:
            return start(what, argv_for(port), log, _port_when_answering(answers_on, port), env=env, cwd=cwd,
                         timeout_s=timeout_s)
        except _PortTaken:
            if attempt == PORT_TRIES - 1:
                raise
    raise AssertionError("unreachable")


def _port_when_answering(answers_on: Callable[[int], bool], port: int) -> Callable[[], int | None]:
    return lambda: port if answers_on(port) else None


def stop(proc: subprocess.Popen[str]) -> None:
    stop_server(proc, timeout_s=STOP_GRACE_S)
