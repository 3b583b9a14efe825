"""gRPC edge of the route stream (``mmesh.ModelMeshRoutes/watchRoutes``) over ``mesh.router.routes``.

A stream (bidirectional) is: the client's request, then from the router a snapshot (first message
``reset``; the last message of it ``synced``), change sets as the route table changes, and a
heartbeat (an empty ``synced`` message) whenever nothing was sent for ``router.routes_heartbeat_s``;
the client acknowledges each update it applied (its ``sequence``). Every message says whether
direct routing is offered now (``direct``): not when ``router.routes_direct`` is off, when this
router serves TLS but dials runtimes in plaintext (``mesh.router.app`` decides, and warns), or while
the router's own view is not current (its registry mirrors not ready or the registry unreachable):
a client sends everything to the router then.

Authorization. With a tokens file on the router (``auth.tokens_file``) a stream needs a bearer
token whether or not the data plane is protected: the stream discloses where models are loaded
and the runtimes' addresses, as the management API's reading methods do. Role read suffices. A
token with prefixes sees only IDs inside them; a requested ``modelIdPrefix`` must lie inside one
of them (as ``listModels``). The token interceptor (``mesh.transport.auth``) handles unary calls
only, so the check is made here, with the same table, refusal counting and log lines.

Slow readers (``Flow``): at most ``WINDOW`` updates (of at most 1,000 models each) go out
unacknowledged; a stream that acknowledges nothing for ``router.routes_write_timeout_s`` ends with
RESOURCE_EXHAUSTED. grpc's own flow control bounds nothing here: ``context.write`` completes once
grpc has queued the message, so a client that stopped reading used to keep a whole snapshot in the
router's memory. Snapshots are built in slices, the event loop let go between them
(``RouteHub.snapshot_sliced``), and each message only when it is sent. The hub's queue bound
covers the time between writes; streams are bounded in all and per client address.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable, Iterator

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
# Updates a stream may have unacknowledged (Flow): a snapshot of 4,000 models in flight at most.
WINDOW = 4


class RoutesServicer:
    def __init__(self, hub: RouteHub, *, tokens: TokenTable | None, direct: Callable[[], bool],
                 heartbeat_s: float, write_timeout_s: float, runtime_tls: bool, runtime_server_name: str,
                 window: int = WINDOW) -> None:
        self.hub = hub
        self.window = window
        self.tokens = tokens
        self.direct = direct
        self.heartbeat_s = heartbeat_s
        self.write_timeout_s = write_timeout_s
        self._heartbeat_ms = max(1, int(heartbeat_s * 1000))
        self._runtime_tls = runtime_tls
        self._runtime_server_name = runtime_server_name
        self._refusals = Refusals()
        self._flows: set[Flow] = set()

    def close(self) -> None:
        """At shutdown: every stream ends, those waiting for acknowledgements too."""
        self.hub.close()
        for flow in self._flows:
            flow.stop()

    def _visible(self, request: rp.WatchRoutesRequest, context: grpc.aio.ServicerContext
                 ) -> tuple[Visible, Hashable]:
        """The stream's filter and its key (streams with equal keys see the same models); raises
        Unauthenticated / PermissionDenied / InvalidArgument."""
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
            key = (prefix, tuple(sorted(principal.prefixes)))
            return ((lambda m: m.startswith(prefix) and allows(m)) if prefix else allows), key
        return ((lambda m: m.startswith(prefix)) if prefix else (lambda m: True)), (prefix, None)

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

    def _lazy(self, models: list[tuple[str, tuple[Copy, ...]]], *, reset: bool) -> Iterator[rp.RoutesUpdate]:
        """``_messages``, each built only when it is about to be sent: a snapshot waiting for a slow
        client holds references into the table, not the messages (31 MB at 100,000 models)."""
        parts = list(chunks(models))
        for i, part in enumerate(parts):
            yield self._message(part, reset=reset and i == 0, synced=i == len(parts) - 1)

    async def watch(self, context: grpc.aio.ServicerContext) -> None:
        """One stream: the client's first request, then updates written while the client
        acknowledges them (``Flow``), until it leaves or is cut off."""
        sub: Subscription | None = None
        flow: Flow | None = None
        try:
            request = await self._first_request(context)
            visible, key = self._visible(request, context)
            sub = self.hub.subscribe(visible, peer_address(context.peer()), key)
            flow = Flow(context, self.window, self.write_timeout_s)
            self._flows.add(flow)
            pending = self._lazy(await self.hub.snapshot_sliced(visible), reset=True)
            while True:
                for message in pending:
                    if not await flow.send(message):
                        return  # the router is stopping
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
                    pending = self._lazy(await self.hub.snapshot_sliced(visible), reset=True)
                else:
                    changes = sub.take()
                    pending = self._lazy(sorted(changes.items()), reset=False)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as exc:  # MeshErrors become their status; a bug is logged, INTERNAL
            await abort(context, exc, origin=ORIGIN)
        finally:
            if flow is not None:
                flow.close()
                self._flows.discard(flow)
            if sub is not None:
                self.hub.unsubscribe(sub)

    async def _first_request(self, context: grpc.aio.ServicerContext) -> rp.WatchRoutesRequest:
        try:
            body = await asyncio.wait_for(context.read(), self.write_timeout_s)
        except TimeoutError:
            raise InvalidArgument(f"no request within {self.write_timeout_s:g} s: send a WatchRoutesRequest "
                                  "first") from None
        if body is grpc.aio.EOF:
            raise InvalidArgument("the stream ended before its request: send a WatchRoutesRequest first")
        return parse_request(body)

    def handler(self) -> grpc.GenericRpcHandler:
        async def watch(_: object, context: grpc.aio.ServicerContext) -> None:
            await self.watch(context)  # reads with context.read(): bytes, parsed by parse_request

        return grpc.method_handlers_generic_handler(f"mmesh.{SERVICE}", {
            "watchRoutes": grpc.stream_stream_rpc_method_handler(
                watch, response_serializer=rp.RoutesUpdate.SerializeToString)})


def parse_request(body: bytes) -> rp.WatchRoutesRequest:
    try:
        request: rp.WatchRoutesRequest = rp.WatchRoutesRequest.FromString(body)
    except (DecodeError, RuntimeError, ValueError):
        raise InvalidArgument("malformed request: not a valid mmesh.WatchRoutesRequest message") from None
    return request


def peer_address(peer: str) -> str:
    """The client's address without its port (``ipv4:10.0.0.1:5555`` -> ``ipv4:10.0.0.1``): streams
    are bounded per address, and a client opens each from a new port."""
    head, sep, tail = peer.rpartition(":")
    return head if sep and tail.isdigit() else peer


class Flow:
    """A stream's application-level flow control: at most ``window`` updates unacknowledged.

    grpc's own flow control does not bound what a stream holds: ``context.write`` completes once grpc
    has queued the message, so a client that stops reading would leave every update in the router's
    memory. Here the writer waits for the client's acknowledgements (read by a task of their own)
    before sending more, and a client that acknowledges nothing for ``timeout_s`` is cut off
    (RESOURCE_EXHAUSTED). An acknowledgement past what was sent, or a malformed message, ends the
    stream (INVALID_ARGUMENT)."""

    def __init__(self, context: grpc.aio.ServicerContext, window: int, timeout_s: float) -> None:
        self.context = context
        self.window = window
        self.timeout_s = timeout_s
        self.sent = 0
        self.acked = 0
        self.error: MeshError | None = None
        self.stopped = False
        self._acks = asyncio.Event()
        self._reader = asyncio.get_running_loop().create_task(self._read(), name="route-stream-acks")

    async def _read(self) -> None:
        while True:
            body = await self.context.read()
            if body is grpc.aio.EOF:
                return  # the client sends no more: it is cut off once the window is full
            try:
                ack = parse_request(body).ack
                if ack > self.sent:
                    raise InvalidArgument(f"ack {ack} is past the last update sent ({self.sent})")
            except InvalidArgument as exc:
                self.error = exc
                self._acks.set()
                return
            if ack > self.acked:
                self.acked = ack
                self._acks.set()

    def stop(self) -> None:
        """The router is stopping: a send waiting for acknowledgements gives up (returns False)."""
        self.stopped = True
        self._acks.set()

    async def send(self, message: rp.RoutesUpdate) -> bool:
        """False when the router is stopping (nothing sent)."""
        self.sent += 1
        message.sequence = self.sent
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        while self.sent - self.acked > self.window and self.error is None and not self.stopped:
            self._acks.clear()
            left = deadline - asyncio.get_running_loop().time()
            try:
                if left <= 0:
                    raise TimeoutError
                await asyncio.wait_for(self._acks.wait(), left)
            except TimeoutError:
                raise ResourceExhausted(f"route stream fell behind: no update acknowledged for "
                                        f"{self.timeout_s:g} s (router.routes_write_timeout_s); reconnect") from None
        if self.error is not None:
            raise self.error
        if self.stopped:
            return False
        try:
            await asyncio.wait_for(self.context.write(message), self.timeout_s)
        except TimeoutError:
            raise ResourceExhausted(f"route stream fell behind: an update waited more than {self.timeout_s:g} s "
                                    "to be sent (router.routes_write_timeout_s); reconnect") from None
        return True

    def close(self) -> None:
        self._reader.cancel()
