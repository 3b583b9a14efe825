"""Model servers that tests run as processes of their own: both ends of one small contract.

The contract: ``python -m <module> --port 0 ...`` binds 127.0.0.1 (port 0: a free one), prints
exactly one line ``ready <port>`` on stdout once it serves, and stops cleanly on SIGTERM or SIGINT,
giving calls in flight 2 s. The servers are :mod:`tests.support.spi_server` (ModelMesh's runtime
SPI) and :mod:`tests.support.triton_standin` (Triton's repository API).

Test side: :func:`start_server` and :func:`stop_server`. Server side: :func:`serve` (bind, announce,
wait for a signal, stop) and one error type, :class:`ServerError`, turned into a gRPC status in
exactly one place, :func:`rpc`; anything else a handler raises is logged with its traceback and
answered INTERNAL, so a bad request never ends the process.

The stand-ins are transport-thin on purpose: each keeps its state in a grpc-free class and its
servicers only translate messages, so the rules they implement read apart from the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import select
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc

from mesh.procs import die_with_parent

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
GRACE_S = 2.0  # how long SIGTERM leaves calls in flight before they are cancelled


# ---------------------------------------------------------------------------------------------
# test side


def start_server(module: str, *args: str, timeout_s: float = 30.0) -> tuple[subprocess.Popen[str], int]:
    """Start ``python -m module *args`` from the repository root; return it once it printed
    ``ready <port>``, with that port. Raises RuntimeError if it exits or says anything else first,
    TimeoutError (after stopping it) if it stays silent ``timeout_s``. Its stderr is this
    process's, so pytest shows a failing server's log with the test."""
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
        # If pytest itself is killed, the server goes too instead of holding its port.
        preexec_fn=die_with_parent(),
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{module} {' '.join(args)}: no 'ready <port>' line within {timeout_s} s")
            readable, _, _ = select.select([proc.stdout], [], [], min(remaining, 0.5))
            if readable:
                break
            if proc.poll() is not None:
                break
        line = proc.stdout.readline()
        if not line:
            code = proc.wait(timeout=5)
            raise RuntimeError(f"{module} {' '.join(args)} exited with {code} before it was ready")
        word, _, port = line.strip().partition(" ")
        if word != "ready" or not port.isdigit():
            raise RuntimeError(f"{module}: expected 'ready <port>' on stdout, got {line!r}")
        return proc, int(port)
    except BaseException:
        stop_server(proc)
        raise


@contextlib.contextmanager
def running(module: str, *args: str) -> Iterator[tuple[int, subprocess.Popen[str]]]:
    """``python -m module --port 0 *args`` for the ``with`` block: its port and process."""
    proc, port = start_server(module, "--port", "0", *args)
    try:
        yield port, proc
    finally:
        stop_server(proc)


def stop_server(proc: subprocess.Popen[str], timeout_s: float = 10.0) -> int:
    """SIGTERM this one process (by its PID), wait for it, SIGKILL it if it outlives
    ``timeout_s``; return its exit status (0 after a clean stop)."""
    try:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.error("pid %d ignored SIGTERM for %.0f s; killing it", proc.pid, timeout_s)
                proc.kill()
                proc.wait()
    finally:
        if proc.stdout is not None:
            proc.stdout.close()
    return proc.returncode


# ---------------------------------------------------------------------------------------------
# server side


class ServerError(Exception):
    """A request the server answers with a gRPC status: ``code`` is a ``grpc.StatusCode`` name."""

    code = "INTERNAL"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class InvalidArgument(ServerError):
    code = "INVALID_ARGUMENT"


class NotFound(ServerError):
    code = "NOT_FOUND"


class Unavailable(ServerError):
    code = "UNAVAILABLE"


class Internal(ServerError):
    code = "INTERNAL"


class Unimplemented(ServerError):
    code = "UNIMPLEMENTED"


_Handler = TypeVar("_Handler", bound=Callable[..., Awaitable[Any]])


def rpc(handler: _Handler) -> _Handler:
    """Wrap a unary servicer method ``(self, request, context)``: the one place where errors
    become statuses."""

    @functools.wraps(handler)
    async def wrapped(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await handler(self, request, context)
        except ServerError as err:
            failure: tuple[grpc.StatusCode, str] = (grpc.StatusCode[err.code], err.message)
        except Exception as err:  # a bug in the stand-in: say so, keep serving
            log.exception("%s failed", handler.__name__)
            failure = (grpc.StatusCode.INTERNAL, f"{type(err).__name__}: {err}")
        await context.abort(*failure)

    return wrapped  # type: ignore[return-value]


async def serve(server: grpc.aio.Server, host: str, port: int) -> None:
    """Bind ``host:port``, start, print ``ready <port>``, and stop on SIGTERM or SIGINT."""
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:  # older grpcio answers 0 rather than raising
        raise SystemExit(f"cannot bind {host}:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"ready {bound}", flush=True)
    await stop.wait()
    log.info("stopping: %.0f s for calls in flight", GRACE_S)
    await server.stop(GRACE_S)


def configure_logging() -> None:
    """Log lines to stderr: stdout carries only the ready line."""
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
