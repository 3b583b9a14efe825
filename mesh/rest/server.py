"""The router's REST front end (aiohttp): Open Inference Protocol REST and KServe V1.

A thin edge over ``mesh.router.dataplane``, as the gRPC servicer is: each handler turns the HTTP
request into V2 protobuf bytes (``mesh.rest.codec``), the headers into the data plane's
``(key, value)`` pairs, and relays; errors become HTTP statuses in one place (``mesh.rest.status``)
with a JSON body ``{"error": ...}``.

Endpoints (``{m}``: a model or a vModel; ``/versions/{v}`` is accepted and passed on as
``model_version``):

====================================================  ======================================
``GET /v2``                                             server metadata
``GET /v2/health/live``, ``/v2/health/ready``           200, or 400 when not ready (the spec's
                                                        "4xx means false")
``GET /v2/models/{m}[/versions/{v}]``                   model metadata (from a runtime)
``GET /v2/models/{m}[/versions/{v}]/ready``             200, or 400 when no copy is loaded
``POST /v2/models/{m}[/versions/{v}]/infer``            inference: JSON, or JSON + binary tensors
``GET /v1/models/{m}``                                  ``{"name", "ready"}``
``POST /v1/models/{m}:predict``                         ``{"instances"}`` -> ``{"predictions"}``
====================================================  ======================================

The same as gRPC: ``mm-model-id`` / ``mm-vmodel-id`` headers override the path's name; bearer
tokens (``auth.tokens_file`` with ``auth.data_plane``; health endpoints stay open); the router's
TLS settings (certificate, client certificates, allowed peers); ``modelmesh_api_request_milliseconds``
under the V2 method a call maps to (ModelInfer, ModelMetadata, ModelReady, ServerMetadata...), so a
dashboard counts REST and gRPC together, as ModelMesh's REST proxy did; the access log and spans;
``traceparent``, ``tracestate``, ``x-request-id`` and ``ce-id`` (the id of payload records, as
KServe's logger keeps it) passed on to the runtime, as gRPC metadata is. No other HTTP header
reaches a runtime.

Bounds (docs/security.md, "REST"): a body over ``router.max_message_bytes`` is refused with 413,
counted after decompression, which happens here (gzip, deflate), after the token check; the
in-flight bounds are entered before the body is read, a JSON body counting ``JSON_EXPANSION``
times its size (what parsing it takes), binary tensors once; headers must arrive within
``HEADER_TIMEOUT_S``, a body within ``BODY_TIMEOUT_S``; at most ``MAX_CONNECTIONS`` connections;
aiohttp bounds the request line and headers (8 KiB each). A client that disconnects cancels its
request.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

from mesh.auth import Principal, Refusals, TokenTable, bearer_token, set_caller
from mesh.errors import Code, InvalidArgument, MeshError, ModelNotFound, PermissionDenied, Unavailable
from mesh.observability.metrics import RouterMetrics
from mesh.rest import codec, guards
from mesh.rest.guards import (
    AIOHTTP_LOG,
    KEEPALIVE_TIMEOUT_S,
    Admission,
    Refused,
    close_if_silent,
    forwarded_headers,
    peer,
    peer_names,
    read_body,
    sticky_headers,
    weight,
)
from mesh.rest.status import error_body, http_error
from mesh.router.dataplane import INFER, METADATA, DataPlane, Headers
from mesh.transport.metadata import model_selection

log = structlog.get_logger(__name__)

JSON = "application/json"
_V1_CACHE = 4096  # models whose first input (name, datatype) is remembered for V1 requests
_PREDICT = re.compile(r"^(?P<name>.+):predict$")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(status: int, body: bytes, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=body, content_type=JSON, headers=headers)


class RestServer:
    def __init__(self, plane: DataPlane, metrics: RouterMetrics, *, max_body_bytes: int,
                 tokens: TokenTable | None = None, allowed_peers: tuple[str, ...] = (),
                 max_elements: int | None = None) -> None:
        self.plane = plane
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.tokens = tokens
        self.allowed_peers = frozenset(allowed_peers)
        self.max_elements = max_elements or codec.DEFAULT_MAX_ELEMENTS
        self._refusals = Refusals()
        self._v1_inputs: OrderedDict[str, tuple[str, str] | None] = OrderedDict()
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None

    # --- the HTTP edge ------------------------------------------------------------------------
    def app(self) -> web.Application:
        # Bodies are decompressed here (``_read``), within the size bound and after the token check;
        # aiohttp would inflate any body, read or not, before a handler could refuse it.
        app = web.Application(client_max_size=self.max_body_bytes, handler_args={
            "max_field_size": 8190, "auto_decompress": False, "lingering_time": 1.0,
            "keepalive_timeout": KEEPALIVE_TIMEOUT_S, "logger": AIOHTTP_LOG})
        r = app.router
        r.add_get("/v2", self._guarded(self.server_metadata, "ServerMetadata"))
        r.add_get("/v2/health/live", self._open(self.live, "ServerLive"))
        r.add_get("/v2/health/ready", self._open(self.ready, "ServerReady"))
        for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            r.add_get(base, self._guarded(self.model_metadata, "ModelMetadata"))
            r.add_get(base + "/ready", self._guarded(self.model_ready, "ModelReady"))
            r.add_post(base + "/infer", self._guarded(self.infer, "ModelInfer"))
        r.add_get("/v1/models/{model}", self._guarded(self.v1_status, "ModelReady"))
        r.add_post("/v1/models/{model}", self._guarded(self.v1_predict, "ModelInfer"))
        r.add_route("*", "/{tail:.*}", self._not_found)
        return app

    async def start(self, host: str, port: int, tls: ssl.SSLContext | None) -> int:
        """Listen on ``host:port`` (0: a free port); the port."""
        # handler_cancellation: a client that goes away cancels its request (and its wait on a load).
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False, handler_cancellation=True)
        await runner.setup()
        server = runner.server
        assert server is not None
        loop = asyncio.get_running_loop()

        def connection() -> asyncio.Protocol:
            # Past max_connections a connection is closed at once; one that has not sent a whole
            # request within HEADER_TIMEOUT_S is closed then (a client trickling its headers).
            if len(server.connections) >= guards.MAX_CONNECTIONS:
                return Refused()
            handler = server()
            loop.call_later(guards.HEADER_TIMEOUT_S, close_if_silent, handler)
            return handler

        try:
            self._listener = await loop.create_server(connection, host, port, ssl=tls, backlog=1024,
                                                      reuse_address=True)
        except OSError as exc:
            await runner.cleanup()
            raise Unavailable(f"cannot serve REST on {host}:{port}: {exc.strerror or exc}; choose another "
                              "router.rest_port (0 picks a free one, -1 turns REST off)") from None
        self._runner = runner
        return int(self._listener.sockets[0].getsockname()[1])

    async def stop(self, grace_s: float = 5.0) -> None:
        if self._listener is not None:
            self._listener.close()  # stop accepting; requests in flight finish below
            self._listener = None
        if self._runner is not None:
            await self._runner.shutdown()
            await asyncio.wait_for(self._runner.cleanup(), grace_s)
            self._runner = None

    async def _not_found(self, request: web.Request) -> web.Response:
        return _json(404, error_body(f"no such endpoint: {request.method} {request.path[:200]}"))

    def _open(self, fn: Handler, method: str) -> Handler:
        """Health endpoints: no token needed (probes, as ServerLive and ServerReady on gRPC)."""
        record = self.metrics.request

        async def handle(request: web.Request) -> web.StreamResponse:
            started = time.perf_counter()
            try:
                self._checkpeer(request)
                response = await fn(request)
            except Exception as exc:
                status, code, message = http_error(exc)
                record(method, code, started)
                return _json(status, error_body(message))
            record(method, "OK", started)
            return response

        return handle

    def _guarded(self, fn: Handler, method: str) -> Handler:
        """Everything but health: the token (with ``auth.data_plane``) and the model it names, metrics
        by method."""
        record = self.metrics.request
        per_model = self.metrics.per_model

        async def handle(request: web.Request) -> web.StreamResponse:
            started = time.perf_counter()
            try:
                self._checkpeer(request)
                if self.tokens is not None:
                    self._authorize(request, method)
                response = await fn(request)
            except asyncio.CancelledError:
                record(method, "CANCELLED", started)
                raise
            except web.HTTPRequestEntityTooLarge:
                record(method, "RESOURCE_EXHAUSTED", started)
                return _json(413, error_body(f"request body over the limit of {self.max_body_bytes} bytes "
                                             "(router.max_message_bytes)"))
            except Exception as exc:
                status, code, message = http_error(exc)
                self._record(method, code, started, request, None, per_model)
                error = _json(status, error_body(message))
                if request.content.exception() is not None:
                    # The body broke off mid-way: aiohttp closes this connection after the answer,
                    # so say so, or a keep-alive client sends its next request into a closed socket.
                    error.force_close()
                return error
            self._record(method, "OK", started, request, response, per_model)
            return response

        return handle

    def _record(self, method: str, code: str, started: float, request: web.Request,
                response: web.StreamResponse | None, per_model: bool) -> None:
        size = request.content_length or 0
        out = response.content_length if response is not None else None
        ids = self.plane.labels(forwarded_headers(request), lambda: self._name(request)) if per_model else ("", "")
        self.metrics.request(method, code, started, _Size(size),
                             _Size(out) if out is not None else None, *ids)

    def _checkpeer(self, request: web.Request) -> None:
        if self.allowed_peers and not (peer_names(request) & self.allowed_peers):
            raise PermissionDenied("this client's certificate is not among tls.allowed_peers")

    def _authorize(self, request: web.Request, method: str) -> None:
        assert self.tokens is not None
        principal: Principal | None = None
        peer = f"http:{request.remote}"
        try:
            principal = self.tokens.authenticate(bearer_token(request.headers.get("Authorization")))
            if "model" in request.match_info:  # GET /v2 names none (ServerMetadata: any token)
                requested, is_vmodel, _ = model_selection(forwarded_headers(request))
                principal.check_model(requested if requested is not None else self._name(request),
                                      "vModel" if is_vmodel else "model")
        except MeshError as exc:
            self._refusals.note(exc, method, principal, peer)
            raise
        set_caller(principal)

    # --- endpoints ----------------------------------------------------------------------------
    @staticmethod
    def _name(request: web.Request) -> str:
        name = request.match_info.get("model", "")
        match = _PREDICT.match(name)
        return match.group("name") if match else name

    async def server_metadata(self, request: web.Request) -> web.Response:
        name, version, extensions = self.plane.server_metadata()
        return _json(200, codec.dumps({"name": name, "version": version,
                                              "extensions": [*extensions, "binary_tensor_data"]}))

    async def live(self, request: web.Request) -> web.Response:
        return _json(200, b'{"live":true}')

    async def ready(self, request: web.Request) -> web.Response:
        if self.plane.ready():
            return _json(200, b'{"ready":true}')
        return _json(400, codec.dumps({"ready": False, "error": "the router is not ready"}))

    def _headers(self, request: web.Request, name: str) -> Headers:
        """What the data plane sees of a request naming ``name`` (its path's name): the forwarded
        headers, and the sticky headers of the split vModels it names (itself, or a graph's steps)."""
        headers = forwarded_headers(request)
        return sticky_headers(request, self.plane.sticky_headers(headers, lambda: name), headers)

    async def model_ready(self, request: web.Request) -> web.Response:
        name = self._name(request)
        ready = await self.plane.model_ready(self._headers(request, name), lambda: name)
        body = codec.dumps({"name": name, "ready": ready} if ready else
                                  {"name": name, "ready": False, "error": f"model {name!r} has no loaded copy"})
        return _json(200 if ready else 400, body)

    async def v1_status(self, request: web.Request) -> web.Response:
        name = self._name(request)
        ready = await self.plane.model_ready(self._headers(request, name), lambda: name)
        return _json(200, codec.dumps({"name": name, "ready": ready}))

    async def _relay(self, request: web.Request, method: str, body: bytes, weight: int,
                     resolved: tuple[Headers, tuple[str, str]] | None = None) -> bytes:
        """``DataPlane.relay`` within the in-flight bounds (mesh.transport.inflight); ``resolved``:
        the headers and (requested, model ID) of a request resolved already (V1 predict)."""
        inflight = self.plane.inflight
        connection = inflight.enter(weight, peer(request))
        try:
            name = self._name(request)
            if resolved is not None:
                return await self.plane.relay(method, body, resolved[0], lambda: name, None, resolved[1])
            return await self.plane.relay(method, body, self._headers(request, name), lambda: name, None)
        finally:
            inflight.leave(weight, connection)

    async def model_metadata(self, request: web.Request) -> web.Response:
        body = codec.metadata_request(self._name(request), request.match_info.get("version", ""))
        answer = await self._relay(request, METADATA, body, len(body))
        return _json(200, codec.metadata_response(answer))

    def _admit(self, request: web.Request, header_length: int | None) -> Admission:
        """Enter the in-flight bounds before the body is read, as the body's size says it will weigh
        (a body sent without a length: as the largest one could)."""
        size = request.content_length if request.content_length is not None else self.max_body_bytes
        return Admission(self.plane.inflight, peer(request), weight(size, header_length))

    async def infer(self, request: web.Request) -> web.Response:
        header = request.headers.get(codec.BINARY_HEADER)
        header_length: int | None = None
        if header is not None:
            try:
                header_length = int(header)
            except ValueError:
                raise InvalidArgument(f"Inference-Header-Content-Length {header[:40]!r} is not a number") from None
            if header_length < 0:
                raise InvalidArgument("Inference-Header-Content-Length must not be negative")
        admission = self._admit(request, header_length)
        try:
            raw = await read_body(request, self.max_body_bytes)
            admission.resize(weight(len(raw), header_length))  # what it became, decompressed
            name = self._name(request)
            body, outputs = codec.infer_request(raw, header_length, name, request.match_info.get("version", ""),
                                                max_elements=self.max_elements)
            del raw
            answer = await self.plane.relay(INFER, body, self._headers(request, name), lambda: name, None)
            out, out_header = codec.infer_response(answer, outputs)
        finally:
            admission.leave()
        if out_header is None:
            return _json(200, out)
        return web.Response(status=200, body=out, content_type="application/octet-stream",
                            headers={"Inference-Header-Content-Length": str(out_header)})

    def _resolve(self, request: web.Request) -> tuple[Headers, tuple[str, str]]:
        """A V1 predict's headers and (requested, model ID), resolved once (and counted once, as
        one inference): its metadata read and its inference go to the one split target chosen."""
        name = self._name(request)
        headers = self._headers(request, name)
        return headers, self.plane.named(headers, lambda: name)

    async def _first_input(self, request: web.Request, resolved: tuple[Headers, tuple[str, str]], *,
                           refresh: bool = False) -> tuple[tuple[str, str] | None, bool]:
        """The model's first input (name, datatype) for V1 requests, remembered per model, and
        whether it was remembered (``refresh``: forget it first, read the metadata again)."""
        model_id = resolved[1][1]
        if refresh:
            self._v1_inputs.pop(model_id, None)
        elif model_id in self._v1_inputs:
            self._v1_inputs.move_to_end(model_id)
            return self._v1_inputs[model_id], True
        answer = await self._relay(request, METADATA, codec.metadata_request(model_id), 0, resolved)
        found = codec.first_input(answer)
        self._v1_inputs[model_id] = found
        if len(self._v1_inputs) > _V1_CACHE:
            self._v1_inputs.popitem(last=False)
        return found, False

    async def v1_predict(self, request: web.Request) -> web.Response:
        if not _PREDICT.match(request.match_info.get("model", "")):
            raise ModelNotFound(request.match_info.get("model", "")[:200], what="endpoint for model")
        admission = self._admit(request, None)
        try:
            raw = await read_body(request, self.max_body_bytes)
            admission.resize(weight(len(raw), None))
            resolved = self._resolve(request)
            first, remembered = await self._first_input(request, resolved)
            try:
                return await self._v1_infer(request, raw, first, resolved)
            except MeshError as exc:
                # What was remembered may be stale: the ID registered again, for a model that takes
                # another input. Read the metadata again and, if it changed, try once more with it.
                if not remembered or exc.code is not Code.INVALID_ARGUMENT:
                    raise
                fresh, _ = await self._first_input(request, resolved, refresh=True)
                if fresh == first:
                    raise
                return await self._v1_infer(request, raw, fresh, resolved)
        finally:
            admission.leave()

    async def _v1_infer(self, request: web.Request, raw: bytes, first: tuple[str, str] | None,
                        resolved: tuple[Headers, tuple[str, str]]) -> web.Response:
        body = codec.v1_request(raw, self._name(request), first, max_elements=self.max_elements)
        answer = await self._relay(request, INFER, body, 0, resolved)  # the body is counted by v1_predict
        return _json(200, codec.v1_response(answer))


class _Size:
    """A length without the bytes: the metrics record sizes with ``len()``."""

    __slots__ = ("n",)

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n
