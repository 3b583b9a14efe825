"""W3C trace context across the router hop, and OpenTelemetry spans when asked for.

Propagation costs nothing extra and is always on: the router passes the client's ``traceparent``
and ``tracestate`` headers on to the runtime with the rest of the client's metadata (in the
multiplexed frame's metadata field, or as metadata of the unary call), and both log the trace id
with each line about the request (``mesh.logging``).

With ``log.tracing = "otel"`` (and the ``tracing`` extra installed) each component also records
spans: the router one per forwarded request, a child of the client's ``traceparent`` or the root of
a new trace, and sends *its own* span context onward; the runtime one per inference (waiting for a
load, then predicting), a child of what it received. So a trace shows client -> router -> runtime.

Export: the OpenTelemetry SDK's tracer provider of the process. If the process has not installed
one (an embedding application or a test may), a provider with the SDK's ``ConsoleSpanExporter`` is
installed (spans as JSON on stdout, batched). OTLP export is not built in: an application that needs
it installs its own provider with an OTLP exporter before starting the components.

The OpenTelemetry imports stay inside this module, and happen only when tracing is on.
"""

from __future__ import annotations

import os
from typing import Any

from mesh.errors import CODE_NUMBERS, InvalidArgument
from mesh.logging import TRACEPARENT, TRACESTATE, Metadata
from mesh.settings import LogSettings

_TRACE_HEADERS = (TRACEPARENT, TRACESTATE)


class Tracer:
    """Spans of one component (``router`` or ``runtime``) over the process's tracer provider."""

    def __init__(self, component: str) -> None:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        from opentelemetry.trace.status import Status, StatusCode

        provider = trace.get_tracer_provider()
        if not isinstance(provider, TracerProvider):
            name = os.environ.get("OTEL_SERVICE_NAME") or f"mesh-{component}"
            provider = TracerProvider(resource=Resource.create({"service.name": name}))
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
            trace.set_tracer_provider(provider)
        self.component = component
        self._tracer = provider.get_tracer(f"mesh.{component}")
        self._propagator = TraceContextTextMapPropagator()
        self._set_span_in_context = trace.set_span_in_context
        self._server = trace.SpanKind.SERVER
        self._status, self._error = Status, StatusCode.ERROR

    def start(self, method: str, metadata: Metadata, model_id: str) -> Any:
        """A span for one request, the child of the ``traceparent`` in ``metadata`` if any."""
        carrier = {k: v for k, v in metadata if k in _TRACE_HEADERS and isinstance(v, str)}
        parent = self._propagator.extract(carrier) if carrier else None
        service, _, name = method.strip("/").rpartition("/")
        return self._tracer.start_span(
            method.strip("/"), context=parent, kind=self._server,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name,
                        "mesh.component": self.component, "mesh.model_id": model_id})

    @staticmethod
    def trace_id(span: Any) -> str:
        return f"{span.get_span_context().trace_id:032x}"

    def onward(self, metadata: tuple[tuple[str, str | bytes], ...], span: Any
               ) -> tuple[tuple[str, str | bytes], ...]:
        """``metadata`` with the trace headers replaced by ``span``'s context (for the next hop)."""
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=self._set_span_in_context(span))
        kept = tuple((k, v) for k, v in metadata if k not in _TRACE_HEADERS)
        return kept + tuple(carrier.items())

    def end(self, span: Any, code_name: str, message: str = "", instance_id: str | None = None) -> None:
        """End ``span`` with the request's status, by its canonical name (``OK``, ``NOT_FOUND``...)."""
        span.set_attribute("rpc.grpc.status_code", CODE_NUMBERS.get(code_name, 2))
        if instance_id:
            span.set_attribute("mesh.instance_id", instance_id)
        if code_name != "OK":
            span.set_status(self._status(self._error, f"{code_name}: {message}" if message else code_name))
        span.end()


def tracer_for(settings: LogSettings, component: str) -> Tracer | None:
    """The component's tracer, or None with tracing off (then nothing is imported or recorded)."""
    mode = settings.tracing.strip().lower()
    if mode == "off":
        return None
    if mode != "otel":
        raise InvalidArgument(f"setting log.tracing: {settings.tracing!r} is not off or otel")
    try:
        return Tracer(component)
    except ImportError:
        raise InvalidArgument("log.tracing = otel needs the OpenTelemetry SDK: "
                              "pip install 'mesh-serving[tracing]'") from None
