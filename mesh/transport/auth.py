"""The one place where bearer tokens are checked: a grpc.aio server interceptor at the router (and
on a runtime's direct port for smart clients, ``runtime_interceptors``).

For each protected method the interceptor wraps the handler grpc found: before the method runs,
the ``authorization: Bearer <token>`` header is authenticated (``mesh.auth.TokenTable``), the
token's role is checked against the method, and every model or vModel ID the request names is
checked against the token's prefixes. Failures answer UNAUTHENTICATED ("missing or invalid bearer
token") or PERMISSION_DENIED (naming the method or the model ID), through the one status mapping
(``mesh.transport.status``).

What is protected:

* ``mmesh.ModelMesh``, ``mmesh.ModelMeshGraphs`` and ``mmesh.ModelMeshStatus``: every method,
  always (once a tokens file is configured).
* ``inference.GRPCInferenceService``: with ``auth.data_plane``, every method but ServerLive and
  ServerReady (probes); the model is the one named by ``mm-model-id`` / ``mm-vmodel-id`` (or their
  ``-bin`` forms), else field 1 of the request (``model_name``, or ``name``), read as the router
  reads it to route, so the check and the routing cannot disagree.
* ``grpc.health.v1.Health`` and anything else: open. Health checks never need a token.

Where the model ID lives in the body, the wrapper parses the body itself (management requests are
small; inference bodies are only scanned for field 1, never decoded). The router never passes the
``authorization`` header on to runtimes (``mesh.router.dataplane.STRIP``): a token reaches a
runtime only when its client sends it there itself, on the direct port. Nothing here logs it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
import structlog
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

from mesh.auth import Principal, Refusals, TokenTable, bearer_token, set_caller
from mesh.errors import InvalidArgument, MeshError
from mesh.gen.inference import grpc_service_pb2 as pb
from mesh.gen.mmesh import graphs_pb2 as gp
from mesh.gen.mmesh import model_mesh_pb2 as mm
from mesh.gen.mmesh import status_pb2 as st
from mesh.settings import AuthSettings
from mesh.transport.metadata import model_selection
from mesh.transport.status import abort
from mesh.transport.wire import read_model_name

log = structlog.get_logger(__name__)

AUTHORIZATION = "authorization"
ORIGIN = "router"  # the interceptor runs at the router only (mesh.router.servicer.ORIGIN)
# V2 probes: answered without a token, like grpc.health.v1.
OPEN_DATA_PLANE = frozenset({"ServerLive", "ServerReady"})
DATA_PLANE_WITH_MODEL = frozenset({"ModelInfer", "ModelMetadata", "ModelReady"})
# Fields of management requests that name a model or a vModel, with what to call them in errors.
_ID_FIELDS = (("modelId", "model"), ("vModelId", "vModel"), ("targetModelId", "model"), ("graphId", "graph"))

Check = Callable[[Principal, Any, Iterable[tuple[str, str | bytes]]], None]


def _token(metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
    for key, value in metadata:
        if key == AUTHORIZATION:
            return bearer_token(value)
    return None


def _management_check(method: str, request_cls: type[Message], roots: tuple[str, ...]) -> Check:
    fields = {f.name for f in request_cls.DESCRIPTOR.fields}
    id_fields = [(name, what) for name, what in _ID_FIELDS if name in fields]
    is_list = method in ("listModels", "listGraphs")
    with_info = "modelInfo" in fields

    def check(principal: Principal, request: Any, _: Iterable[tuple[str, str | bytes]]) -> None:
        principal.check_method(method)
        if not principal.restricted:
            return
        if isinstance(request, bytes | bytearray):
            try:
                request = request_cls.FromString(bytes(request))
            except (DecodeError, RuntimeError, ValueError):
                return  # the handler answers INVALID_ARGUMENT for it
        if is_list:
            principal.check_list_prefix(request.prefix)
        for name, what in id_fields:
            value = getattr(request, name)
            if value:  # an empty ID is the handler's INVALID_ARGUMENT, not a permission question
                principal.check_model(value, what)
        if with_info and request.HasField("modelInfo"):
            principal.check_source(request.modelInfo.path, request.modelInfo.key, roots)
        # registerModels (bulk): its items are checked one by one by the handler
        # (mesh.router.bulk), which reports a refused item and writes none of it.

    return check


def _data_plane_check(method: str) -> Check:
    with_model = method in DATA_PLANE_WITH_MODEL

    def check(principal: Principal, request: Any, metadata: Iterable[tuple[str, str | bytes]]) -> None:
        if not with_model or not principal.prefixes:
            return
        requested, is_vmodel, _ = model_selection(metadata)
        if requested is None:
            body = request if isinstance(request, bytes | bytearray) else request.SerializeToString()
            requested = read_model_name(bytes(body))
        principal.check_model(requested, "vModel" if is_vmodel else "model")

    return check


@dataclass(frozen=True)
class _Rule:
    method: str
    check: Check


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc has no type stubs
    def __init__(self, tokens: TokenTable, *, data_plane: bool, model_roots: tuple[str, ...] = (),
                 management: bool = True, origin: str = ORIGIN) -> None:
        self._tokens = tokens
        self._refusals = Refusals()
        self._rules: dict[str, _Rule] = {}
        self._origin = origin
        # Inference graphs (mmesh.ModelMeshGraphs) like the rest of the management API: the graph ID
        # against the prefixes here, the models a graph names in mesh.router.graph_management.
        # The fleet status (mmesh.ModelMeshStatus, issue 20) too: read methods, whose handlers show a
        # token limited to prefixes only its models (mesh.router.fleet).
        for service in (mm.DESCRIPTOR.services_by_name["ModelMesh"], gp.DESCRIPTOR.services_by_name["ModelMeshGraphs"],
                        st.DESCRIPTOR.services_by_name["ModelMeshStatus"]):
            if not management:  # a runtime's port (runtime_interceptors) serves no management API
                break
            for m in service.methods:
                self._rules[f"/{service.full_name}/{m.name}"] = _Rule(
                    m.name, _management_check(m.name, GetMessageClass(m.input_type), model_roots))
        if data_plane:
            service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
            for m in service.methods:
                if m.name not in OPEN_DATA_PLANE:
                    self._rules[f"/{service.full_name}/{m.name}"] = _Rule(m.name, _data_plane_check(m.name))

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        rule = self._rules.get(handler_call_details.method)
        if handler is None or rule is None:
            return handler
        if handler.unary_unary is None:  # every protected method is unary; deny anything else outright
            return grpc.unary_unary_rpc_method_handler(self._deny)
        return grpc.unary_unary_rpc_method_handler(
            self._guard(rule, handler.unary_unary), request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)

    async def _deny(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "streaming calls are not allowed here")

    def _guard(self, rule: _Rule, inner: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
               ) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
        tokens = self._tokens

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            metadata = context.invocation_metadata() or ()
            principal: Principal | None = None
            try:
                principal = tokens.authenticate(_token(metadata))
                rule.check(principal, request, metadata)
            except MeshError as exc:
                self._refusals.note(exc, rule.method, principal, context.peer())
                # Marked as the router's own answer (mesh-origin), like every other refusal of
                # the router: clients (the controller) tell it from an unreachable router by that.
                await abort(context, exc, origin=self._origin)
            set_caller(principal)  # this call's task only: the handler checks ownership with it
            return await inner(request, context)

        return guarded




def interceptors_for(auth: AuthSettings, model_roots: tuple[str, ...] = ()) -> list[grpc.aio.ServerInterceptor]:
    """The router's interceptors for ``auth`` (none when it is off); reads the tokens file once.
    ``model_roots`` makes registration paths absolute for tokens bound to paths."""
    if not auth.tokens_file:
        if auth.data_plane:
            raise InvalidArgument("setting auth.data_plane needs auth.tokens_file (the tokens to accept)")
        return []
    return [AuthInterceptor(TokenTable.load(auth.tokens_file), data_plane=auth.data_plane, model_roots=model_roots)]


# --- the runtime's token check, for smart clients sending straight to it (docs/client.md) ---------
def runtime_interceptors(auth: AuthSettings) -> list[grpc.aio.ServerInterceptor]:
    """The token check of a runtime's direct port (``runtime.direct_port``, the only port smart
    clients are sent to): with ``auth.data_plane`` (and its tokens file), the V2 methods that name
    a model (ModelInfer, ModelMetadata, ModelReady) need a token, checked by the very rules the
    router applies to its own data plane, so a client that sends straight to a runtime
    (``mesh.client``) gets what the router would give it and no more. Refusals carry the
    runtime's origin mark: a smart client returns them as they are. The internal port (the SPI,
    the routers' multiplexed stream) has no token check: routers send no tokens there, and
    ``tls.allowed_peers`` (or a network policy) keeps clients off it."""
    if not auth.tokens_file or not auth.data_plane:
        return []
    return [AuthInterceptor(TokenTable.load(auth.tokens_file), data_plane=True, management=False, origin="runtime")]
# --- end of the runtime's token check ------------------------------------------------------------


__all__ = ["AUTHORIZATION", "AuthInterceptor", "interceptors_for", "runtime_interceptors"]
