"""structlog set-up: readable on a terminal, JSON lines otherwise; configured once per process.

Process-wide context (component, a runtime's instance id) is bound with ``structlog.contextvars``.
Per-request context is one :class:`RequestContext` in a context variable, set by the request's
handler (each gRPC call and each multiplexed frame runs in its own task, so it cannot leak into
another request). Every line logged while serving the request carries its ``model_id``,
``instance_id`` (at the router: the runtime instance it forwards to), ``request_id`` and
``trace_id``.

Why one object rather than ``bind_contextvars`` per key: binding is the only cost on the hot path
(one ``ContextVar.set``, 0.2 us), and the request and trace ids are worked out from the request's
headers only when a line is actually logged. ``x-request-id`` is taken from the client; without
one, a short random id is made the first time a line needs it (the router makes it up front only
when the access log is on, so that the runtime's lines carry the same id).
"""

from __future__ import annotations

import contextvars
import logging
import secrets
import sys
import time
from collections.abc import Iterable, MutableMapping
from typing import Any

import structlog

from mesh.settings import LogSettings

REQUEST_ID = "x-request-id"
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"

Metadata = Iterable[tuple[str, str | bytes]]


def header(metadata: Metadata, key: str) -> str | None:
    """The first text value of ``key`` in gRPC metadata (keys arrive lower-case)."""
    for k, v in metadata:
        if k == key and isinstance(v, str):
            return v
    return None


def new_request_id() -> str:
    return secrets.token_hex(8)


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace id of a W3C ``traceparent`` (``00-<32 hex>-<16 hex>-<2 hex>``); None if malformed
    or all zeros (invalid by the spec)."""
    if not traceparent:
        return None
    parts = traceparent.strip().split("-")
    if len(parts) < 4 or len(parts[0]) != 2 or parts[0] == "ff" or len(parts[1]) != 32 or len(parts[2]) != 16:
        return None
    trace_id = parts[1].lower()
    try:
        if int(trace_id, 16) == 0 or int(parts[2], 16) == 0:
            return None
    except ValueError:
        return None
    return trace_id


class RequestContext:
    """What a request's log lines carry; the ids are read from ``metadata`` on first use."""

    __slots__ = ("_request_id", "_trace_id", "instance_id", "metadata", "model_id")

    def __init__(self, model_id: str, metadata: Metadata, instance_id: str | None = None) -> None:
        self.model_id = model_id
        self.metadata = metadata
        self.instance_id = instance_id
        self._request_id: str | None = None
        self._trace_id: str | None = ""  # "": not looked up yet

    @property
    def request_id(self) -> str:
        rid = self._request_id
        if rid is None:
            rid = self._request_id = header(self.metadata, REQUEST_ID) or new_request_id()
        return rid

    @request_id.setter
    def request_id(self, value: str) -> None:
        self._request_id = value

    @property
    def trace_id(self) -> str | None:
        tid = self._trace_id
        if tid == "":
            tid = self._trace_id = trace_id_of(header(self.metadata, TRACEPARENT))
        return tid

    @trace_id.setter
    def trace_id(self, value: str | None) -> None:
        self._trace_id = value


_REQUEST: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar("mesh_request", default=None)


def bind_request(model_id: str, metadata: Metadata, instance_id: str | None = None) -> RequestContext:
    """Make ``model_id`` and the ids in ``metadata`` the context of this task's log lines."""
    ctx = RequestContext(model_id, metadata, instance_id)
    _REQUEST.set(ctx)
    return ctx


def current_request() -> RequestContext | None:
    return _REQUEST.get()


def clear_request() -> None:
    """For long-lived tasks created while serving a request (they inherit its context)."""
    _REQUEST.set(None)


def add_request_context(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    ctx = _REQUEST.get()
    if ctx is not None:
        if ctx.model_id:
            event.setdefault("model_id", ctx.model_id)
        if ctx.instance_id is not None:
            event.setdefault("instance_id", ctx.instance_id)
        event.setdefault("request_id", ctx.request_id)
        trace_id = ctx.trace_id
        if trace_id is not None:
            event.setdefault("trace_id", trace_id)
    return event


# Last line of defence for secrets (docs/security.md): a field with one of these names is never
# printed, whoever logs it. The first lines are that tokens and passwords are never passed to a
# logger, and that the router strips the client's ``authorization`` header before forwarding.
SECRET_FIELDS = frozenset({"authorization", "password", "token", "secret", "private_key"})


def redact_secrets(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in SECRET_FIELDS.intersection(event):
        event[key] = "[redacted]"
    return event


def configure(settings: LogSettings, *, component: str) -> None:
    level = getattr(logging, settings.level.upper(), None)
    if not isinstance(level, int):
        level = logging.INFO
    fmt = settings.format
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: structlog.types.Processor = (
        structlog.dev.ConsoleRenderer(colors=False) if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            add_request_context,
            redact_secrets,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(component=component)
    # Libraries that use the standard logging module (grpc, aetcd) go to stderr at warning level.
    logging.basicConfig(level=max(level, logging.WARNING), stream=sys.stderr)


class LogLimit:
    """At most one log line per second per kind; counts the ones left out."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def allow(self, kind: str) -> bool:
        now = time.monotonic()
        if now - self._last.get(kind, -self.interval_s) >= self.interval_s:
            self._last[kind] = now
            return True
        self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
        return False

    def take_suppressed(self, kind: str) -> int:
        return self._suppressed.pop(kind, 0)
