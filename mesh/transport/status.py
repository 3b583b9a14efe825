"""The one place where errors become gRPC statuses.

``MeshError`` subclasses map by their ``code``; anything else is a bug: it is logged with its
traceback and the caller gets INTERNAL with a short message (never the traceback).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import structlog

from mesh.errors import Code, MeshError, NotHere, RegistryUnavailable

log = structlog.get_logger(__name__)

# Code names are gRPC's names, every one of them (OK aside): the mapping is by name, and a test
# checks that it is complete both ways.
GRPC_CODES: dict[Code, grpc.StatusCode] = {code: grpc.StatusCode[code.name] for code in Code}
MESH_CODES = {v: k for k, v in GRPC_CODES.items()}

# Trailing metadata that marks an error as the runtime's own answer (as opposed to a broken
# connection), and the specific "model not here" answer that the router retries elsewhere.
ORIGIN_KEY = "mesh-origin"
NOT_HERE_KEY = "mesh-not-here"


def lost_peer(err: grpc.aio.AioRpcError) -> bool:
    """No answer from the runtime at all (connection refused or reset, the process gone): not
    the runtime's own status, which carries ``ORIGIN_KEY``."""
    if any(key == ORIGIN_KEY for key, _ in err.trailing_metadata() or ()):
        return False
    return err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN)


def code_of(exc: BaseException) -> grpc.StatusCode:
    """The status ``exc`` will be answered with, without logging it (for access logs and spans)."""
    return GRPC_CODES[exc.code] if isinstance(exc, MeshError) else grpc.StatusCode.INTERNAL


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, RegistryUnavailable):
        # The reason names etcd's endpoints and the store's errors: for the log, not for a client.
        log.warning("registry unavailable", error=exc.message)
        return GRPC_CODES[exc.code], exc.PUBLIC_MESSAGE
    if isinstance(exc, MeshError):
        return GRPC_CODES[exc.code], exc.message
    log.error("unexpected error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__} (details in the server log)"


async def abort(context: grpc.aio.ServicerContext, exc: BaseException, *, origin: str = "") -> None:
    code, message = status_of(exc)
    trailers: list[tuple[str, str]] = []
    if origin:
        trailers.append((ORIGIN_KEY, origin))
    if isinstance(exc, NotHere):
        trailers.append((NOT_HERE_KEY, "1"))
    if trailers:
        context.set_trailing_metadata(tuple(trailers))
    await context.abort(code, message)


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def handled(origin: str = "") -> Callable[[F], F]:
    """Decorate an async servicer method: MeshErrors and bugs become proper statuses."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        async def inner(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await fn(self, request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # the one catch-all: map, log bugs, never crash the server
                await abort(context, exc, origin=origin)

        return inner  # type: ignore[return-value]

    return wrap
