"""A smart V2 client: inference straight to a runtime that holds the model, the router on any doubt.

    async with SmartClient("router:8033", token=..., root_certificates=...) as client:
        answer = await client(request_bytes, metadata=(("mm-model-id", "my-model"),), timeout=5)

It is called like a raw grpc.aio multicallable (serialized ``ModelInferRequest`` in, serialized
``ModelInferResponse`` out, ``grpc.aio.AioRpcError`` on failure), so code written against the router's
``GRPCInferenceService/ModelInfer`` swaps it in unchanged (``mesh-loadtest --client smart`` does).

How a request goes (the routes and what counts as doubt: ``mesh.client.routes``):

1. Direct, when the request names its model with an ``mm-model-id`` header, the route stream is
   synced, current and offers direct routing, and the model has a loaded copy: a unary ModelInfer
   on this client's channel to that runtime, with ``mesh-load: deny`` (the router's "believed
   loaded" mark: the runtime answers "not here" rather than load) and the client's own headers.
2. Else through the router, with the client's request and headers unchanged: vModels (the client
   keeps no vModel targets; the router resolves them, splits included), requests naming the model
   only in the body (a name may be a vModel or an inference graph: the router decides), cold
   models (the router picks the home, which loads), and everything while the routes are in doubt.
3. A direct try that fails is sent once more, through the router, with what is left of the
   deadline: on "not here" (the copy was evicted meanwhile; the model then goes to the router
   for a second, while the router's update catches up) and on any status the runtime did not answer itself
   (connection refused or reset, UNAVAILABLE, a missed deadline with time left, a runtime killed
   under the request: its endpoint is then skipped for a few seconds). This assumes inference is
   idempotent, as the router's own retries do (DESIGN.md, routing step 4): a request a dying
   runtime had already computed may be computed again. The runtime's own answers (the model's
   INVALID_ARGUMENT, a token refusal: marked with ``mesh-origin``) are returned as they are, as
   the router would return them.

Auth and TLS as the router's: ``token`` goes as ``authorization: Bearer`` on the stream, on routed
calls and on direct calls; a runtime with ``auth.data_plane`` checks it with the router's rules
(``mesh.transport.auth.runtime_interceptors``). With ``root_certificates`` the client speaks TLS
to the router (``private_key``/``certificate_chain`` for a router that requires client
certificates), and to runtimes' direct ports when the router says they use TLS, verified with
``runtime_root_certificates`` (default: the router's CA) under the name the router announces
(``tls.runtime_server_name``). A client that speaks TLS to the router never goes direct in
plaintext (unless ``allow_plaintext_runtimes=True``). Without a CA for runtimes that use TLS, or
when the router offers no direct routing, every request goes through the router.

Resources: one channel to the router and one per runtime endpoint in the routes (closed when the
endpoint leaves them); headers prepared per distinct header tuple, in a bounded cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from typing import Any

import grpc
import structlog

from mesh.client.routes import Copy, Routes
from mesh.gen.mmesh import routes_pb2 as rp

log = structlog.get_logger(__name__)

INFER = "/inference.GRPCInferenceService/ModelInfer"
WATCH = "/mmesh.ModelMeshRoutes/watchRoutes"
MODEL_ID = "mm-model-id"
ROUTER_ONLY_HEADERS = frozenset({"mm-model-id-bin", "mm-vmodel-id", "mm-vmodel-id-bin"})
LOAD_MODE = ("mesh-load", "deny")  # mesh.transport.metadata.LOAD_MODE: a miss answers "not here"
ORIGIN_KEY = "mesh-origin"  # mesh.transport.status: the runtime's own answer
NOT_HERE_KEY = "mesh-not-here"
MAX_HEADER_SETS = 4096
# Refusals of the stream itself: retried slowly (a fixed token will not change its mind).
_REFUSED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED)

Metadata = Sequence[tuple[str, str | bytes]]


class SmartClient:
    def __init__(self, router: str, *, token: str | None = None, model_id_prefix: str = "",
                 root_certificates: bytes | None = None, private_key: bytes | None = None,
                 certificate_chain: bytes | None = None, runtime_root_certificates: bytes | None = None,
                 direct: bool = True, stale_after_s: float | None = None, suspect_s: float = 5.0,
                 max_message_bytes: int = 16 << 20, allow_plaintext_runtimes: bool = False) -> None:
        self.router = router
        self.prefix = model_id_prefix
        self.direct_enabled = direct
        self._auth: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        self._options = [("grpc.max_send_message_length", max_message_bytes),
                         ("grpc.max_receive_message_length", max_message_bytes)]
        self._router_creds = (grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
                              if root_certificates is not None else None)
        self._runtime_ca = runtime_root_certificates or root_certificates
        self._runtime_key = (private_key, certificate_chain)
        # TLS to the router never becomes plaintext to a runtime, unless the caller says so.
        self._plaintext_ok = root_certificates is None or allow_plaintext_runtimes
        self.routes = Routes(stale_after_s=stale_after_s, suspect_s=suspect_s)
        self._runtime_tls = False
        self._runtime_name = ""
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._calls: dict[str, grpc.aio.UnaryUnaryMultiCallable] = {}
        self._direct_md: dict[Any, tuple[tuple[str, str | bytes], ...]] = {}
        self._router_md: dict[Any, tuple[tuple[str, str | bytes], ...]] = {}
        self._router_channel: grpc.aio.Channel | None = None
        self._router_call: grpc.aio.UnaryUnaryMultiCallable | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._updated = asyncio.Event()
        self._last_prune = 0.0
        # What happened to requests, for tests and benchmarks (plain ints: no cost worth a flag).
        self.counts = {"direct": 0, "routed": 0, "not_here": 0, "direct_failed": 0}

    # --- life cycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._router_channel is not None:
            return
        self._router_channel = self._channel(self.router, self._router_creds, "")
        self._router_call = self._router_channel.unary_unary(INFER)
        if self.direct_enabled:
            self._watcher = asyncio.create_task(self._watch(), name="smart-client-routes")

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        channels = [*self._channels.values(), *([self._router_channel] if self._router_channel else [])]
        self._channels.clear()
        self._calls.clear()
        self._router_channel = self._router_call = None
        await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)

    async def __aenter__(self) -> SmartClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def wait_synced(self, timeout: float) -> bool:
        """Until the routes are synced and direct routing is offered (False after ``timeout``)."""
        return await self.wait_for(lambda: self.routes.usable(time.monotonic()), timeout)

    async def wait_route(self, model_id: str, timeout: float, *, present: bool = True) -> bool:
        """Until ``model_id`` has (or, ``present=False``, has no) direct route."""
        return await self.wait_for(lambda: (self.routes.pick(model_id, time.monotonic()) is not None) == present,
                                   timeout)

    async def wait_for(self, condition: Any, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not condition():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._updated.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._updated.wait(), min(left, 0.05))
        return True

    # --- requests ---------------------------------------------------------------------------------
    async def __call__(self, body: bytes, timeout: float | None = None, metadata: Metadata | None = None) -> bytes:
        """One ModelInfer: serialized request in, serialized response out (module docstring); the
        arguments as a grpc.aio multicallable takes them."""
        if metadata is None:
            metadata = ()
        model_id = _model_of(metadata)
        if model_id is not None:
            now = time.monotonic()
            copy = self.routes.pick(model_id, now)
            if copy is not None:
                return await self._direct(copy, model_id, body, metadata, timeout, now)
        return await self._routed(body, metadata, timeout)

    infer = __call__

    async def _routed(self, body: bytes, metadata: Metadata, timeout: float | None) -> bytes:
        call = self._router_call
        if call is None:
            raise RuntimeError("SmartClient is not started (use `async with` or await start())")
        self.counts["routed"] += 1
        md = self._router_md.get(metadata) if isinstance(metadata, tuple) else None
        if md is None:
            md = (*metadata, *self._auth)
            if isinstance(metadata, tuple):
                _remember(self._router_md, metadata, md)
        answer: bytes = await call(body, metadata=md, timeout=timeout)
        return answer

    async def _direct(self, copy: Copy, model_id: str, body: bytes, metadata: Metadata, timeout: float | None,
                      started: float) -> bytes:
        endpoint = copy[1]
        call = self._calls.get(endpoint)
        if call is None:
            call = self._open(endpoint)
        md = self._direct_md.get(metadata) if isinstance(metadata, tuple) else None
        if md is None:
            md = (*metadata, LOAD_MODE, *self._auth)
            if isinstance(metadata, tuple):
                _remember(self._direct_md, metadata, md)
        self.counts["direct"] += 1
        try:
            answer: bytes = await call(body, metadata=md, timeout=timeout)
            return answer
        except grpc.aio.AioRpcError as err:
            trailers = err.trailing_metadata() or ()
            if any(k == NOT_HERE_KEY for k, _ in trailers):
                self.counts["not_here"] += 1
                self.routes.not_here(model_id, time.monotonic())
            elif any(k == ORIGIN_KEY for k, _ in trailers):
                raise  # the runtime's own answer about this request: the router would return it too
            else:
                self.counts["direct_failed"] += 1
                self.routes.failed(endpoint, time.monotonic())
            left = None if timeout is None else timeout - (time.monotonic() - started)
            if left is not None and left <= 0:
                raise
        return await self._routed(body, metadata, left)

    # --- channels ---------------------------------------------------------------------------------
    def _channel(self, target: str, creds: grpc.ChannelCredentials | None, server_name: str) -> grpc.aio.Channel:
        if creds is None:
            return grpc.aio.insecure_channel(target, options=self._options)
        options = [*self._options, *([("grpc.ssl_target_name_override", server_name)] if server_name else [])]
        return grpc.aio.secure_channel(target, creds, options=options)

    def _open(self, endpoint: str) -> grpc.aio.UnaryUnaryMultiCallable:
        creds = None
        if self._runtime_tls:
            key, chain = self._runtime_key
            creds = grpc.ssl_channel_credentials(self._runtime_ca, key, chain)
        channel = self._channel(endpoint, creds, self._runtime_name)
        self._channels[endpoint] = channel
        call = self._calls[endpoint] = channel.unary_unary(INFER)
        return call

    def _prune(self, now: float) -> None:
        """Close the channels of endpoints no route names any more (at most once a second)."""
        if now - self._last_prune < 1.0:
            return
        self._last_prune = now
        keep = self.routes.endpoints()
        for endpoint in [e for e in self._channels if e not in keep]:
            channel = self._channels.pop(endpoint)
            self._calls.pop(endpoint, None)
            asyncio.get_running_loop().create_task(channel.close(), name=f"smart-client-close:{endpoint}")
        self.routes.prune(now)

    # --- the route stream -------------------------------------------------------------------------
    async def _watch(self) -> None:
        assert self._router_channel is not None
        watch = self._router_channel.stream_stream(WATCH, request_serializer=rp.WatchRoutesRequest.SerializeToString,
                                                   response_deserializer=rp.RoutesUpdate.FromString)
        request = rp.WatchRoutesRequest(modelIdPrefix=self.prefix)
        backoff = 0.1
        while True:
            call = watch(metadata=self._auth or None)
            try:
                await call.write(request)
                while True:
                    update = await call.read()
                    if update is grpc.aio.EOF:
                        break
                    self._apply(update)
                    # The router sends a few updates ahead of what is acknowledged, no more.
                    await call.write(rp.WatchRoutesRequest(ack=update.sequence))
                    backoff = 0.1
                reason = "the router ended the stream"
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as err:
                # InvalidStateError: an acknowledgement written after the router ended the call.
                code, details = ((err.code(), err.details()) if isinstance(err, grpc.aio.AioRpcError)
                                 else (await call.code(), await call.details()))
                reason = f"{code.name}: {details}"
                if code in _REFUSED:
                    backoff = 30.0  # this router will not serve this client routes: it uses the router
            finally:
                call.cancel()
            self.routes.lost()
            self._updated.set()
            log.info("route stream lost; sending through the router until it resyncs", router=self.router,
                     reason=reason, retry_s=backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0) if backoff < 30.0 else backoff

    def _apply(self, update: rp.RoutesUpdate) -> None:
        now = time.monotonic()
        if update.runtimeTls != self._runtime_tls or update.runtimeServerName != self._runtime_name:
            self._runtime_tls, self._runtime_name = update.runtimeTls, update.runtimeServerName
            self._last_prune = 0.0
            for channel in self._channels.values():  # dialled with the old security: dial anew
                asyncio.get_running_loop().create_task(channel.close())
            self._channels.clear()
            self._calls.clear()
        # Runtimes over TLS need a CA to verify them with; runtimes in plaintext are used only by a
        # client that speaks plaintext to the router too (or allow_plaintext_runtimes). Otherwise the
        # router carries everything.
        if update.runtimeTls:
            direct = update.direct and self._runtime_ca is not None
        else:
            direct = update.direct and self._plaintext_ok
        self.routes.apply(reset=update.reset, synced=update.synced, direct=direct, heartbeat_ms=update.heartbeatMs,
                          models=((m.modelId, tuple((c.instanceId, c.endpoint) for c in m.copies))
                                  for m in update.models), now=now)
        self._prune(now)
        self._updated.set()


def _model_of(metadata: Metadata) -> str | None:
    """The model an ``mm-model-id`` header names; None (ask the router) for anything else."""
    model_id = None
    for key, value in metadata:
        if key == MODEL_ID:
            if not isinstance(value, str):
                return None
            model_id = value
        elif key in ROUTER_ONLY_HEADERS:
            return None
    return model_id


def _remember(cache: dict[Any, tuple[tuple[str, str | bytes], ...]], key: Any,
              value: tuple[tuple[str, str | bytes], ...]) -> None:
    if len(cache) >= MAX_HEADER_SETS:
        cache.clear()  # bounded: a client sending endless distinct headers rebuilds them, no more
    cache[key] = value
