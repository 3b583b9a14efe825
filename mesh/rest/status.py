"""The one place where errors become HTTP statuses, and the one shape of an error body.

``MeshError`` codes map as gRPC-to-HTTP gateways map them (grpc-gateway, Google's API design
guide), so a REST client sees what a gRPC client of the same call would see: INVALID_ARGUMENT and
FAILED_PRECONDITION (a model that cannot load) 400, NOT_FOUND 404, UNAUTHENTICATED 401,
PERMISSION_DENIED 403, RESOURCE_EXHAUSTED 429, UNAVAILABLE 503, DEADLINE_EXCEEDED 504. Anything that
is not a ``MeshError`` is a bug: logged with its traceback, answered 500 with a short message.
Every error body is ``{"error": "<message>"}``, as KServe and MLServer answer.
"""

from __future__ import annotations

import orjson
import structlog

from mesh.errors import Code, MeshError, RegistryUnavailable
from mesh.logging import LogLimit

log = structlog.get_logger(__name__)

HTTP_STATUS: dict[Code, int] = {
    Code.CANCELLED: 499,
    Code.UNKNOWN: 500,
    Code.INVALID_ARGUMENT: 400,
    Code.DEADLINE_EXCEEDED: 504,
    Code.NOT_FOUND: 404,
    Code.ALREADY_EXISTS: 409,
    Code.PERMISSION_DENIED: 403,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.FAILED_PRECONDITION: 400,
    Code.ABORTED: 409,
    Code.OUT_OF_RANGE: 400,
    Code.UNIMPLEMENTED: 501,
    Code.INTERNAL: 500,
    Code.UNAVAILABLE: 503,
    Code.DATA_LOSS: 500,
    Code.UNAUTHENTICATED: 401,
}


# Unexpected errors are bugs, logged with their traceback; at most once a second per kind, since a
# client can repeat the request that triggers one as often as it likes.
_LIMIT = LogLimit()


def error_body(message: str) -> bytes:
    return orjson.dumps({"error": message})


def http_error(exc: BaseException) -> tuple[int, str, str]:
    """(HTTP status, canonical code name, message) for ``exc``."""
    if isinstance(exc, RegistryUnavailable):
        log.warning("registry unavailable", error=exc.message)
        return HTTP_STATUS[exc.code], exc.code.name, exc.PUBLIC_MESSAGE
    if isinstance(exc, MeshError):
        return HTTP_STATUS[exc.code], exc.code.name, exc.message
    kind = type(exc).__name__
    if _LIMIT.allow(kind):
        log.error("unexpected error", exc_info=exc, suppressed_since_last=_LIMIT.take_suppressed(kind))
    return 500, "INTERNAL", f"internal error: {type(exc).__name__} (details in the server log)"
