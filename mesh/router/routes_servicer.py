"""gRPC edge of the route stream (``mmesh.ModelMeshRoutes/watchRoutes``) over ``mesh.router.routes``.

A stream is: a snapshot (first message ``reset``; the last message of it ``synced``), then change
sets as the route table changes, and a heartbeat (an empty ``synced`` message) whenever nothing
was sent for ``router.routes_heartbeat_s``. Every message says whether direct routing is offered
now (``direct``): not when ``router.routes_direct`` is off, when the router dials runtimes with a
client certificate (then the runtimes require mTLS, which a client lacks: the router's
``tls.runtime_cert_file``), or while the router's own view is not current (its registry mirrors not
ready or the registry unreachable): a client sends everything to the router then.

Authorization. With a tokens file on the router (``auth.tokens_file``) a stream needs a bearer
token whether or not the data plane is protected: the stream discloses where models are loaded
and the runtimes' addresses, as the management API's reading methods do. Role read suffices. A
token with prefixes sees only IDs inside them; a requested ``modelIdPrefix`` must lie inside one
of them (as ``listModels``). The token interceptor (``mesh.transport.auth``) handles unary calls
only, so the check is made here, with the same table, refusal counting and log lines.

Slow readers: a write that does not complete within ``router.routes_write_timeout_s`` ends the
stream with RESOURCE_EXHAUSTED; the hub's queue bound covers the time between writes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
import structlog
from google.protobuf.message import DecodeError

from mesh.auth import Principal, Refusals, TokenTable, bearer_token
from mesh.errors import InvalidArgument, MeshError, ResourceExhausted
from mesh.gen.mmesh import routes_pb2 as rp
from mesh.router.routes import Copy, RouteHub, Subscription, Visible, chunks
from mesh.transport.auth import AUTHORIZATION
from mesh.transport.status import abort

log = structlog.get_logger(__name__)

ORIGIN = "router"
SERVICE = "ModelMeshRoutes"
MAX_PREFIX = 256


class RoutesServicer:
    def __init__(self, hub: RouteHub, *, tokens: TokenTable | None, direct: Callable[[], bool],
                 heartbeat_s: float, write_timeout_s: float, runtime_tls: bool, runtime_server_name: str) -> None:
        self.hub = hub
        self.tokens = tokens
        self.direct = direct
        self.heartbeat_s = heartbeat_s
        self.write_timeout_s = write_timeout_s
        self._heartbeat_ms = max(1, int(heartbeat_s * 1000))
        self._runtime_tls = runtime_tls
        self._runtime_server_name = runtime_server_name
        self._refusals = Refusals()

    def _visible(self, request: rp.WatchRoutesRequest, context: grpc.aio.ServicerContext) -> Visible:
        """The stream's filter; raises Unauthenticated / PermissionDenied / InvalidArgument."""
        prefix = request.modelIdPrefix
        if len(prefix) > MAX_PREFIX:
            raise InvalidArgument(f"modelIdPrefix is {len(prefix)} characters; the limit is {MAX_PREFIX}")
        principal: Principal | None = None
        if self.tokens is not None:
            token = None
            for key, value in context.invocation_metadata() or ():
                if key == AUTHORIZATION:
                    token = bearer_token(value)
            try:
                principal = self.tokens.authenticate(token)
                if prefix and principal.prefixes:
                    principal.check_list_prefix(prefix)
            except MeshError as exc:
                self._refusals.note(exc, "watchRoutes", principal, context.peer())
                raise
        if principal is not None and principal.prefixes:
            allows = principal.allows
            return (lambda m: m.startswith(prefix) and allows(m)) if prefix else allows
        return (lambda m: m.startswith(prefix)) if prefix else (lambda m: True)

    def _message(self, models: list[tuple[str, tuple[Copy, ...]]], *, reset: bool, synced: bool
                 ) -> rp.RoutesUpdate:
        update = rp.RoutesUpdate(reset=reset, synced=synced, direct=self.direct(), heartbeatMs=self._heartbeat_ms,
                                 runtimeTls=self._runtime_tls, runtimeServerName=self._runtime_server_name)
        for model_id, copies in models:
            entry = update.models.add(modelId=model_id)
            for instance_id, endpoint in copies:
                entry.copies.add(instanceId=instance_id, endpoint=endpoint)
        return update

    def _messages(self, models: list[tuple[str, tuple[Copy, ...]]], *, reset: bool) -> list[rp.RoutesUpdate]:
        parts = list(chunks(models))
        return [self._message(part, reset=reset and i == 0, synced=i == len(parts) - 1)
                for i, part in enumerate(parts)]

    async def watch(self, request: rp.WatchRoutesRequest, context: grpc.aio.ServicerContext) -> None:
        """One stream, written with ``context.write`` until the client leaves or is cut off."""
        sub: Subscription | None = None
        try:
            visible = self._visible(request, context)
            sub = self.hub.subscribe(visible)
            pending = self._messages(self.hub.snapshot(visible), reset=True)
            while True:
                for message in pending:
                    try:
                        await asyncio.wait_for(context.write(message), self.write_timeout_s)
                    except TimeoutError:
                        raise ResourceExhausted(f"route stream fell behind: an update waited more than "
                                                f"{self.write_timeout_s:g} s for the client to read it "
                                                "(router.routes_write_timeout_s); reconnect") from None
                try:
                    await asyncio.wait_for(sub.wake.wait(), self.heartbeat_s)
                except TimeoutError:
                    pass
                sub.wake.clear()
                if self.hub.closed:
                    return  # the router is stopping: the client reconnects (to another router)
                if sub.resync:  # the queue overflowed: start over from the current table
                    sub.resync = False
                    sub.queue.clear()
                    pending = self._messages(self.hub.snapshot(visible), reset=True)
                else:
                    changes = sub.take()
                    pending = self._messages(sorted(changes.items()), reset=False)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as exc:  # MeshErrors become their status; a bug is logged, INTERNAL
            await abort(context, exc, origin=ORIGIN)
        finally:
            if sub is not None:
                self.hub.unsubscribe(sub)

    def handler(self) -> grpc.GenericRpcHandler:
        async def watch(body: bytes, context: grpc.aio.ServicerContext) -> None:
            try:
                request = rp.WatchRoutesRequest.FromString(body)
            except (DecodeError, RuntimeError, ValueError):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    "malformed request: not a valid mmesh.WatchRoutesRequest message")
            await self.watch(request, context)

        return grpc.method_handlers_generic_handler(f"mmesh.{SERVICE}", {
            "watchRoutes": grpc.unary_stream_rpc_method_handler(
                watch, response_serializer=rp.RoutesUpdate.SerializeToString)})
