"""Readiness and liveness on the standard ``grpc.health.v1`` service.

Service names and what they mean:

* ``""`` (the server as a whole) and each service the component serves (for the router
  ``inference.GRPCInferenceService`` and ``mmesh.ModelMesh``) follow *readiness*: SERVING only while
  the component can do its job. The component says what that takes (the router: registry mirrors
  listed and watched, the registry reachable, a runtime instance in its view; a runtime: serving,
  its lease alive, the registry reachable). Before the first check and from the start of shutdown
  they are NOT_SERVING.
* ``liveness`` is SERVING for as long as the process serves at all. Liveness probes belong there
  (Kubernetes: ``grpc: {port: 8033, service: liveness}``): an etcd outage then takes pods out of
  the Service's endpoints without having them restarted, which would not bring etcd back.

Readiness is re-evaluated by a root task every ``interval_s`` (0.5 s): the conditions are a few
attribute reads, and polling them keeps the registry code free of callbacks into the health
service. Each change is logged once, with the reason when not ready.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh.transport.server import add_health, bind

log = structlog.get_logger(__name__)

LIVENESS = "liveness"
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# Returns None when ready, else why not (logged on the change).
Check = Callable[[], str | None]


class HealthReporter:
    def __init__(self, server: grpc.aio.Server, services: Sequence[str]) -> None:
        self.servicer = add_health(server)
        self._names = ("", *services)
        self.ready: bool | None = None
        self._why: str | None = None  # the reason last logged for not serving
        self._leaving = False

    async def serve_plaintext(self, host: str, port: int) -> grpc.aio.Server | None:
        """The same health answers on a plaintext port of their own (``health_port``): Kubernetes'
        gRPC probes cannot speak TLS, and a port that requires client certificates would fail them.
        It carries nothing but health. None when ``port`` is 0 (off)."""
        if port == 0:
            return None
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)
        bound = bind(server, host, port)
        await server.start()
        log.info("health serving in plaintext", port=bound)
        return server

    async def start(self) -> None:
        """Before the server starts: alive, not ready (the health servicer's default is SERVING)."""
        await self.servicer.set(LIVENESS, _SERVING)
        for name in self._names:
            await self.servicer.set(name, _NOT_SERVING)

    async def update(self, why_not: str | None) -> None:
        ready = why_not is None and not self._leaving
        if ready == self.ready and (ready or self._leaving or why_not == self._why):
            return  # no change (a new reason for not serving is logged: "starting" gives way to another)
        self._why = why_not
        changed, self.ready = ready != self.ready, ready
        if changed:
            for name in self._names:
                await self.servicer.set(name, _SERVING if ready else _NOT_SERVING)
        if ready:
            log.info("readiness: serving")
        elif self._leaving:
            log.info("readiness: not serving", reason="shutting down")
        else:
            log.warning("readiness: not serving", reason=why_not)

    async def follow(self, check: Check, interval_s: float = 0.5) -> None:
        """Root task: keep the readiness names in line with ``check``."""
        while True:
            await self.update(check())
            await asyncio.sleep(interval_s)

    async def leave(self) -> None:
        """Start of shutdown: NOT_SERVING for good (liveness stays until the server stops)."""
        self._leaving = True
        await self.update("shutting down")


class StartGate(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc has no type stubs
    """Answers every call but health, V2 ServerLive / ServerReady (and reflection) UNAVAILABLE
    until ``open()``.

    A router serves its port from the moment it can, so that probes get an honest NOT_SERVING
    while it builds its view of the registry (seconds, with many placements), instead of a refused
    connection. Calls that arrive meanwhile must not be answered from a half-built view (a loaded
    model would look unloaded, a vModel unknown): they get UNAVAILABLE, which clients retry.
    Once open, a call costs one attribute read here."""

    # The V2 liveness and readiness calls answer for themselves (live: true; ready: false).
    ALWAYS = ("/grpc.health.v1.Health/", "/grpc.reflection.", "/inference.GRPCInferenceService/ServerLive",
              "/inference.GRPCInferenceService/ServerReady")

    def __init__(self, message: str) -> None:
        self.is_open = False
        self._message = message

    def open(self) -> None:
        self.is_open = True

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if self.is_open or handler is None or handler_call_details.method.startswith(self.ALWAYS):
            return handler

        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, self._message)

        # A handler of the same shape, so that gRPC reads the request as the method expects.
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(refuse, handler.request_deserializer,
                                                       handler.response_serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(refuse, handler.request_deserializer,
                                                        handler.response_serializer)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(refuse, handler.request_deserializer,
                                                        handler.response_serializer)
        return grpc.stream_stream_rpc_method_handler(refuse, handler.request_deserializer,
                                                     handler.response_serializer)
