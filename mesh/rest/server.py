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
``traceparent``, ``tracestate`` and ``x-request-id`` passed on to the runtime. No other HTTP header
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
import logging
import re
import ssl
import time
import zlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web

from mesh.auth import Principal, Refusals, TokenTable, bearer_token, set_caller
from mesh.errors import Code, InvalidArgument, MeshError, ModelNotFound, PermissionDenied, Unavailable
from mesh.observability.metrics import RouterMetrics
from mesh.pem import check_ca, check_cert_and_key
from mesh.rest import codec
from mesh.rest.status import error_body, http_error
from mesh.router.dataplane import INFER, METADATA, DataPlane, Headers
from mesh.settings import TlsSettings
from mesh.transport.inflight import InflightLimit
from mesh.transport.metadata import MODEL_ID, VMODEL_ID, model_selection

log = structlog.get_logger(__name__)

JSON = "application/json"
# The only headers passed on to the data plane: the model selection, trace context, request id.
_FORWARDED = frozenset({MODEL_ID, VMODEL_ID, "traceparent", "tracestate", "x-request-id"})
_V1_CACHE = 4096  # models whose first input (name, datatype) is remembered for V1 requests
_PREDICT = re.compile(r"^(?P<name>.+):predict$")
# A forwarded header value: printable ASCII (what gRPC metadata takes), at most this long.
_MAX_HEADER_VALUE = 1024
_PRINTABLE = re.compile(r"^[\x20-\x7e]*$")
# Clients that trickle: a request line and headers not complete this long after connecting, or a
# body not complete this long after its headers, and the connection is closed (408 for a body).
HEADER_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 30.0
KEEPALIVE_TIMEOUT_S = 75.0  # an idle keep-alive connection (aiohttp's default is an hour)
# Open connections at most; past it a new one is closed at once, so that trickling clients cannot
# take every file descriptor the router has (the gRPC port and the registry need some too).
MAX_CONNECTIONS = 4096
_ENCODINGS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(status: int, body: bytes, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=body, content_type=JSON, headers=headers)


def _headers(request: web.Request) -> Headers:
    """The headers the data plane sees: the forwarded ones, the first value of each, checked to be
    what gRPC metadata can carry (InvalidArgument naming the header otherwise)."""
    out: list[tuple[str, str | bytes]] = []
    seen: set[str] = set()
    for key, value in request.headers.items():
        low = key.lower()
        if low in _FORWARDED and low not in seen:
            if len(value) > _MAX_HEADER_VALUE or not _PRINTABLE.match(value):
                raise InvalidArgument(f"header {low}: the value must be printable ASCII of at most "
                                      f"{_MAX_HEADER_VALUE} characters")
            seen.add(low)
            out.append((low, value))
    return tuple(out)


def _peer(request: web.Request) -> str:
    """The client connection (address and port), for in-flight bounds per connection."""
    peer = request.transport.get_extra_info("peername") if request.transport is not None else None
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"http:{peer[0]}:{peer[1]}"
    return f"http:{request.remote}"


class _RateLimited(logging.Filter):
    """At most one record a second from aiohttp's server logger: malformed requests (a bad header
    line, a broken chunk) are each logged there with a traceback, and clients choose how many."""

    def __init__(self) -> None:
        super().__init__()
        self._next = 0.0

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + 1.0
        return True


_AIOHTTP_LOG = logging.getLogger("mesh.rest.aiohttp")
_AIOHTTP_LOG.addFilter(_RateLimited())


class _Refused(asyncio.Protocol):
    """A connection over ``max_connections``: closed at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class _Admission:
    """A request's share of the in-flight bounds, resizable once its body is read."""

    def __init__(self, inflight: InflightLimit, peer: str, weight: int) -> None:
        self.inflight = inflight
        self.weight = weight
        self.connection = inflight.enter(weight, peer)
        self.peer = peer

    def resize(self, weight: int) -> None:
        if weight != self.weight:
            self.inflight.leave(self.weight, self.connection)
            self.weight = 0
            self.connection = self.inflight.enter(weight, self.peer)
            self.weight = weight

    def leave(self) -> None:
        self.inflight.leave(self.weight, self.connection)


def ssl_context(tls: TlsSettings) -> ssl.SSLContext | None:
    """The REST port's TLS, from the same settings (and checks) as the gRPC port's."""
    if not tls.cert_file and not tls.key_file:
        return None
    check_cert_and_key("tls.cert_file", tls.cert_file, "tls.key_file", tls.key_file)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.client_ca_file:
        check_ca("tls.client_ca_file", tls.client_ca_file)
        ctx.load_verify_locations(tls.client_ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.client_auth == "require" else ssl.CERT_OPTIONAL
    return ctx


def _peer_names(request: web.Request) -> set[str]:
    cert = request.transport.get_extra_info("peercert") if request.transport is not None else None
    names: set[str] = set()
    if not cert:
        return names
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                names.add(value)
    names.update(value for key, value in cert.get("subjectAltName", ()) if key == "DNS")
    return names


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
            "keepalive_timeout": KEEPALIVE_TIMEOUT_S, "logger": _AIOHTTP_LOG})
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
            if len(server.connections) >= MAX_CONNECTIONS:
                return _Refused()
            handler = server()
            loop.call_later(HEADER_TIMEOUT_S, _close_if_silent, handler)
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
                self._check_peer(request)
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
                self._check_peer(request)
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
        ids = self.plane.labels(_headers(request), lambda: self._name(request)) if per_model else ("", "")
        self.metrics.request(method, code, started, _Size(size),
                             _Size(out) if out is not None else None, *ids)

    def _check_peer(self, request: web.Request) -> None:
        if self.allowed_peers and not (_peer_names(request) & self.allowed_peers):
            raise PermissionDenied("this client's certificate is not among tls.allowed_peers")

    def _authorize(self, request: web.Request, method: str) -> None:
        assert self.tokens is not None
        principal: Principal | None = None
        peer = f"http:{request.remote}"
        try:
            principal = self.tokens.authenticate(bearer_token(request.headers.get("Authorization")))
            if "model" in request.match_info:  # GET /v2 names none (ServerMetadata: any token)
                requested, is_vmodel, _ = model_selection(_headers(request))
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

    async def model_ready(self, request: web.Request) -> web.Response:
        name = self._name(request)
        ready = await self.plane.model_ready(_headers(request), lambda: name)
        body = codec.dumps({"name": name, "ready": ready} if ready else
                                  {"name": name, "ready": False, "error": f"model {name!r} has no loaded copy"})
        return _json(200 if ready else 400, body)

    async def v1_status(self, request: web.Request) -> web.Response:
        name = self._name(request)
        ready = await self.plane.model_ready(_headers(request), lambda: name)
        return _json(200, codec.dumps({"name": name, "ready": ready}))

    async def _relay(self, request: web.Request, method: str, body: bytes, weight: int) -> bytes:
        """``DataPlane.relay`` within the in-flight bounds (mesh.transport.inflight)."""
        inflight = self.plane.inflight
        connection = inflight.enter(weight, _peer(request))
        try:
            name = self._name(request)
            return await self.plane.relay(method, body, _headers(request), lambda: name, None)
        finally:
            inflight.leave(weight, connection)

    async def model_metadata(self, request: web.Request) -> web.Response:
        body = codec.metadata_request(self._name(request), request.match_info.get("version", ""))
        answer = await self._relay(request, METADATA, body, len(body))
        return _json(200, codec.metadata_response(answer))

    def _admit(self, request: web.Request, header_length: int | None) -> _Admission:
        """Enter the in-flight bounds before the body is read, as the body's size says it will weigh
        (a body sent without a length: as the largest one could)."""
        size = request.content_length if request.content_length is not None else self.max_body_bytes
        return _Admission(self.plane.inflight, _peer(request), _weight(size, header_length))

    async def _read(self, request: web.Request) -> bytes:
        """The body, decompressed (gzip, deflate) within ``max_body_bytes``, within BODY_TIMEOUT_S."""
        if request.content_length is not None and request.content_length > self.max_body_bytes:
            raise web.HTTPRequestEntityTooLarge(max_size=self.max_body_bytes, actual_size=request.content_length)
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity") and encoding not in _ENCODINGS:
            raise InvalidArgument(f"Content-Encoding {encoding[:40]!r} is not supported: send gzip, deflate or "
                                  "an uncompressed body")
        try:
            async with asyncio.timeout(BODY_TIMEOUT_S):
                raw = await request.read()
        except TimeoutError:
            raise InvalidArgument(f"the request body did not arrive within {BODY_TIMEOUT_S:g} s") from None
        except web.RequestPayloadError as exc:
            # A body that breaks off: the client's error, not an internal one.
            reason = " ".join(str(exc).split()).removeprefix("400, message: ")
            raise InvalidArgument(f"the request body cannot be read: {reason}") from None
        if encoding in ("", "identity"):
            return raw
        inflater = zlib.decompressobj(_ENCODINGS[encoding])
        try:
            body = inflater.decompress(raw, self.max_body_bytes + 1)
        except zlib.error:
            if encoding != "deflate":
                raise InvalidArgument(f"the request body cannot be read: not valid {encoding} data") from None
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)  # raw deflate, as some clients send it
            try:
                body = inflater.decompress(raw, self.max_body_bytes + 1)
            except zlib.error:
                raise InvalidArgument("the request body cannot be read: not valid deflate data") from None
        if len(body) > self.max_body_bytes:
            raise web.HTTPRequestEntityTooLarge(max_size=self.max_body_bytes, actual_size=len(body))
        if not inflater.eof:
            raise InvalidArgument(f"the request body cannot be read: its {encoding} data is cut short")
        return body

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
            raw = await self._read(request)
            admission.resize(_weight(len(raw), header_length))  # what it became, decompressed
            name = self._name(request)
            body, outputs = codec.infer_request(raw, header_length, name, request.match_info.get("version", ""),
                                                max_elements=self.max_elements)
            del raw
            answer = await self.plane.relay(INFER, body, _headers(request), lambda: name, None)
            out, out_header = codec.infer_response(answer, outputs)
        finally:
            admission.leave()
        if out_header is None:
            return _json(200, out)
        return web.Response(status=200, body=out, content_type="application/octet-stream",
                            headers={"Inference-Header-Content-Length": str(out_header)})

    async def _first_input(self, request: web.Request, *, refresh: bool = False) -> tuple[tuple[str, str] | None, bool]:
        """The model's first input (name, datatype) for V1 requests, remembered per model, and
        whether it was remembered (``refresh``: forget it first, read the metadata again)."""
        name = self._name(request)
        model_id, _ = self.plane.select(_headers(request), lambda: name)
        if refresh:
            self._v1_inputs.pop(model_id, None)
        elif model_id in self._v1_inputs:
            self._v1_inputs.move_to_end(model_id)
            return self._v1_inputs[model_id], True
        answer = await self._relay(request, METADATA, codec.metadata_request(model_id), 0)
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
            raw = await self._read(request)
            admission.resize(_weight(len(raw), None))
            first, remembered = await self._first_input(request)
            try:
                return await self._v1_infer(request, raw, first)
            except MeshError as exc:
                # What was remembered may be stale: the ID registered again, for a model that takes
                # another input. Read the metadata again and, if it changed, try once more with it.
                if not remembered or exc.code is not Code.INVALID_ARGUMENT:
                    raise
                fresh, _ = await self._first_input(request, refresh=True)
                if fresh == first:
                    raise
                return await self._v1_infer(request, raw, fresh)
        finally:
            admission.leave()

    async def _v1_infer(self, request: web.Request, raw: bytes, first: tuple[str, str] | None) -> web.Response:
        body = codec.v1_request(raw, self._name(request), first, max_elements=self.max_elements)
        answer = await self._relay(request, INFER, body, 0)  # the body is counted by v1_predict
        return _json(200, codec.v1_response(answer))


class _Size:
    """A length without the bytes: the metrics record sizes with ``len()``."""

    __slots__ = ("n",)

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


def _weight(size: int, header_length: int | None) -> int:
    """What a body of ``size`` bytes counts for in the in-flight bounds: its JSON part
    ``JSON_EXPANSION`` times (what parsing it takes), its binary tensors once."""
    json_part = size if header_length is None else min(header_length, size)
    return json_part * codec.JSON_EXPANSION + (size - json_part)


def _close_if_silent(handler: Any) -> None:
    """Close ``handler``'s connection if no request has arrived on it yet (aiohttp keeps no timer
    for that; ``_request_count`` and ``_current_request`` are its own bookkeeping)."""
    if getattr(handler, "_request_count", 1) == 0 and getattr(handler, "_current_request", 1) is None:
        transport = getattr(handler, "transport", None)
        if transport is not None:
            transport.close()
