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

Bounds: a body over ``router.max_message_bytes`` is refused with 413 before it is read; in-flight
bytes count a JSON body ``JSON_EXPANSION`` times (what parsing it takes), binary tensors once.
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
from mesh.pem import check_ca, check_cert_and_key
from mesh.rest import codec
from mesh.rest.status import error_body, http_error
from mesh.router.dataplane import INFER, METADATA, DataPlane, Headers
from mesh.settings import TlsSettings
from mesh.transport.metadata import MODEL_ID, VMODEL_ID, model_selection

log = structlog.get_logger(__name__)

JSON = "application/json"
# The only headers passed on to the data plane: the model selection, trace context, request id.
_FORWARDED = frozenset({MODEL_ID, VMODEL_ID, "traceparent", "tracestate", "x-request-id"})
_V1_CACHE = 4096  # models whose first input (name, datatype) is remembered for V1 requests
_PREDICT = re.compile(r"^(?P<name>.+):predict$")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(status: int, body: bytes, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=body, content_type=JSON, headers=headers)


def _headers(request: web.Request) -> Headers:
    out: list[tuple[str, str | bytes]] = []
    for key, value in request.headers.items():
        low = key.lower()
        if low in _FORWARDED:
            out.append((low, value))
    return tuple(out)


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

    # --- the HTTP edge ------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body_bytes, handler_args={"max_field_size": 8190})
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
        site = web.TCPSite(runner, host, port, ssl_context=tls, backlog=1024)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise Unavailable(f"cannot serve REST on {host}:{port}: {exc.strerror or exc}; choose another "
                              "router.rest_port (0 picks a free one, -1 turns REST off)") from None
        self._runner = runner
        addresses = runner.addresses
        return int(addresses[0][1]) if addresses else port

    async def stop(self, grace_s: float = 5.0) -> None:
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
        connection = inflight.enter(weight, f"http:{request.remote}")
        try:
            name = self._name(request)
            return await self.plane.relay(method, body, _headers(request), lambda: name, None)
        finally:
            inflight.leave(weight, connection)

    async def model_metadata(self, request: web.Request) -> web.Response:
        body = codec.metadata_request(self._name(request), request.match_info.get("version", ""))
        answer = await self._relay(request, METADATA, body, len(body))
        return _json(200, codec.metadata_response(answer))

    async def _read(self, request: web.Request) -> bytes:
        if request.content_length is not None and request.content_length > self.max_body_bytes:
            raise web.HTTPRequestEntityTooLarge(max_size=self.max_body_bytes, actual_size=request.content_length)
        try:
            return await request.read()
        except web.RequestPayloadError as exc:
            # A body that breaks off, or does not decode as its Content-Encoding says (gzip, br):
            # the client's error, not an internal one.
            reason = " ".join(str(exc).split()).removeprefix("400, message: ")
            raise InvalidArgument(f"the request body cannot be read: {reason}") from None

    async def infer(self, request: web.Request) -> web.Response:
        raw = await self._read(request)
        header = request.headers.get(codec.BINARY_HEADER)
        header_length: int | None = None
        if header is not None:
            try:
                header_length = int(header)
            except ValueError:
                raise InvalidArgument(f"Inference-Header-Content-Length {header[:40]!r} is not a number") from None
            if header_length < 0:
                raise InvalidArgument("Inference-Header-Content-Length must not be negative")
        json_part = len(raw) if header_length is None else min(header_length, len(raw))
        weight = json_part * codec.JSON_EXPANSION + (len(raw) - json_part)
        inflight = self.plane.inflight
        connection = inflight.enter(weight, f"http:{request.remote}")
        try:
            name = self._name(request)
            body, outputs = codec.infer_request(raw, header_length, name, request.match_info.get("version", ""),
                                                max_elements=self.max_elements)
            del raw
            answer = await self.plane.relay(INFER, body, _headers(request), lambda: name, None)
            out, out_header = codec.infer_response(answer, outputs)
        finally:
            inflight.leave(weight, connection)
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
        raw = await self._read(request)
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

    async def _v1_infer(self, request: web.Request, raw: bytes, first: tuple[str, str] | None) -> web.Response:
        body = codec.v1_request(raw, self._name(request), first, max_elements=self.max_elements)
        answer = await self._relay(request, INFER, body, len(raw) * codec.JSON_EXPANSION)
        return _json(200, codec.v1_response(answer))


class _Size:
    """A length without the bytes: the metrics record sizes with ``len()``."""

    __slots__ = ("n",)

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n
