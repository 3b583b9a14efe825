"""gRPC edge of the runtime: the V2 data plane and the mmesh.ModelRuntime SPI, thin over
:class:`~mesh.runtime.service.RuntimeService`.

Each inference binds its log context (model id; request and trace ids from the ``x-request-id``
and ``traceparent`` metadata that the router passes on). With ``log.access_log`` or
``log.tracing`` on, inference goes through :class:`ObservedInference` instead: one access log
line and one span (load wait + predict) per inference.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import structlog

from mesh import __version__
from mesh.errors import BadRecord, ResourceExhausted
from mesh.gen.inference import grpc_service_pb2 as pb
from mesh.gen.inference import grpc_service_pb2_grpc as pb_grpc
from mesh.gen.mmesh import model_runtime_pb2 as spi
from mesh.gen.mmesh import model_runtime_pb2_grpc as spi_grpc
from mesh.logging import Metadata, bind_request
from mesh.registry.records import ModelSpec
from mesh.runtime.service import RuntimeService
from mesh.tracing import Tracer
from mesh.transport.handlers import generic_handler
from mesh.transport.metadata import CHECK_SOURCE, LAST_USED, RETRY_FAILED, flagged, model_selection
from mesh.transport.multiplex import RequestFrame, stream_handler
from mesh.transport.status import code_of, handled
from mesh.transport.wire import read_model_name

ORIGIN = "runtime"
INFER = "/inference.GRPCInferenceService/ModelInfer"
access = structlog.get_logger("mesh.access")


class ObservedInference:
    """``RuntimeService.infer`` with an access log line and/or a span around it (built only when
    ``log.access_log`` or ``log.tracing`` is on)."""

    def __init__(self, service: RuntimeService, *, access_log: bool, tracer: Tracer | None) -> None:
        self._service = service
        self.access_log = access_log
        self.tracer = tracer

    async def infer(self, model_id: str, body: bytes, allow_load: bool, metadata: Metadata) -> bytes:
        ctx = bind_request(model_id, metadata)
        started = time.perf_counter()
        code, message, response, span = grpc.StatusCode.OK, "", b"", None
        if self.tracer is not None:
            span = self.tracer.start(INFER, metadata, model_id)
            ctx.trace_id = self.tracer.trace_id(span)
        try:
            response = await self._service.infer(model_id, body, allow_load=allow_load)
            return response
        except asyncio.CancelledError:
            # The router's deadline ran out (multiplexed requests carry it) or the caller left.
            code, message = grpc.StatusCode.CANCELLED, "cancelled: deadline exceeded or the caller left"
            raise
        except Exception as exc:
            code = code_of(exc)
            message = getattr(exc, "message", "") or type(exc).__name__
            raise
        finally:
            if span is not None and self.tracer is not None:
                self.tracer.end(span, code.name, message, self._service.instance_id)
            if self.access_log:
                access.info("inference", code=code.name, allow_load=allow_load,
                            duration_ms=round((time.perf_counter() - started) * 1000, 3),
                            bytes_in=len(body), bytes_out=len(response))


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, service: RuntimeService, observed: ObservedInference | None = None,
                 max_message_bytes: int | None = None, *, loads: bool = True) -> None:
        self._service = service
        self._observed = observed
        # False on the direct port (add_direct_to_server): a miss answers "not here", whatever the
        # caller's mesh-load header says; only the routers' placement logic decides loads.
        self._loads = loads
        # The port takes FRAME_HEADROOM more than this (for multiplexed frames); a direct call
        # keeps the router's limit.
        self._max_body = max_message_bytes

    async def ServerLive(self, request: pb.ServerLiveRequest,
                         context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest,
                          context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._service.ready)

    @handled(ORIGIN)
    async def ModelReady(self, request: pb.ModelReadyRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        model_id, _, _ = model_selection(context.invocation_metadata())
        return pb.ModelReadyResponse(ready=await self._service.model_ready(model_id or request.name))

    async def ServerMetadata(self, request: pb.ServerMetadataRequest,
                             context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="mesh-serving-runtime", version=__version__, extensions=[])

    @handled(ORIGIN)
    async def ModelMetadata(self, request: pb.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        model_id, _, allow = model_selection(context.invocation_metadata())
        return await self._service.model_metadata(model_id or request.name, allow_load=allow and self._loads)

    @handled(ORIGIN)
    async def model_infer_raw(self, body: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if self._max_body is not None and len(body) > self._max_body:
            raise ResourceExhausted(f"the request is {len(body)} bytes; the limit is {self._max_body} "
                                    "(router.max_message_bytes)")
        metadata = context.invocation_metadata() or ()
        model_id, _, allow = model_selection(metadata)
        allow = allow and self._loads
        model_id = model_id or read_model_name(body)
        if self._observed is not None:
            return await self._observed.infer(model_id, body, allow, metadata)
        bind_request(model_id, metadata)
        return await self._service.infer(model_id, body, allow_load=allow)


class RuntimeSpiServicer(spi_grpc.ModelRuntimeServicer):
    def __init__(self, service: RuntimeService, status: dict[str, object]) -> None:
        self._service = service
        self._status = status

    @handled(ORIGIN)
    async def loadModel(self, request: spi.LoadModelRequest,
                        context: grpc.aio.ServicerContext) -> spi.LoadModelResponse:
        spec = await self._service.spec_for(request.modelId, request.modelType, request.modelPath,
                                            request.modelKey)
        last_used = _last_used_from(context)
        if flagged(context.invocation_metadata(), RETRY_FAILED):  # `mesh model load --retry`
            self._service.forget_failure(spec.model_id)
        entry = await self._service.load(spec, last_used=last_used)
        return spi.LoadModelResponse(sizeInBytes=entry.reserved_bytes)

    @handled(ORIGIN)
    async def unloadModel(self, request: spi.UnloadModelRequest,
                          context: grpc.aio.ServicerContext) -> spi.UnloadModelResponse:
        await self._service.unload(request.modelId)
        return spi.UnloadModelResponse()

    @handled(ORIGIN)
    async def predictModelSize(self, request: spi.PredictModelSizeRequest,
                               context: grpc.aio.ServicerContext) -> spi.PredictModelSizeResponse:
        spec = await self._service.spec_for(request.modelId, request.modelType, request.modelPath,
                                            request.modelKey)
        if flagged(context.invocation_metadata(), CHECK_SOURCE):  # mesh model register
            await self._service.check_source(spec)
        return spi.PredictModelSizeResponse(sizeInBytes=await self._service.predict_size(spec))

    @handled(ORIGIN)
    async def modelSize(self, request: spi.ModelSizeRequest,
                        context: grpc.aio.ServicerContext) -> spi.ModelSizeResponse:
        return spi.ModelSizeResponse(sizeInBytes=self._service.model_size(request.modelId))

    @handled(ORIGIN)
    async def runtimeStatus(self, request: spi.RuntimeStatusRequest,
                            context: grpc.aio.ServicerContext) -> spi.RuntimeStatusResponse:
        # Unlike ModelMesh's runtimes this one does not purge its models here: it publishes its
        # own placements, so there is no outside state that a restart could leave inconsistent.
        return spi.RuntimeStatusResponse(**self._status)  # type: ignore[arg-type]


def _last_used_from(context: grpc.aio.ServicerContext) -> float | None:
    for key, value in context.invocation_metadata() or ():
        if key == LAST_USED:
            try:
                return int(value) / 1000
            except ValueError:
                return None
    return None


def add_to_server(server: grpc.aio.Server, service: RuntimeService, status: dict[str, object], *,
                  max_message_bytes: int, access_log: bool = False, tracer: Tracer | None = None,
                  trust_frame_specs: bool = False) -> None:
    """``max_message_bytes``: the router's limit, for a request and a response (the server itself
    takes ``FRAME_HEADROOM`` more, for multiplexed frames).

    ``trust_frame_specs``: the port admits routers only (``tls.allowed_peers``), so the
    registration a router sends with a cold request may be used instead of a registry read. On an
    open port it is ignored: anyone could send one, for any model ID (a substitution)."""
    observed = (ObservedInference(service, access_log=access_log, tracer=tracer)
                if access_log or tracer is not None else None)
    inference = InferenceServicer(service, observed, max_message_bytes)

    async def multiplexed(frame: RequestFrame) -> bytes:
        if frame.spec and trust_frame_specs:
            # The router's copy of the registration, for this very model only: used if ours is not
            # cached and the model was not deleted lately (mesh.registry.specs: our watch carries
            # deletions only, so a deletion is remembered for NEGATIVE_TTL_S against stale copies).
            try:
                spec = ModelSpec.from_json(frame.spec)
            except BadRecord:
                spec = None
            if spec is not None and spec.model_id == frame.model_id:
                service.specs.prime(spec, replace=False)
        if observed is not None:
            return await observed.infer(frame.model_id, frame.body, frame.allow_load, frame.metadata)
        bind_request(frame.model_id, frame.metadata)
        return await service.infer(frame.model_id, frame.body, allow_load=frame.allow_load)

    server.add_generic_rpc_handlers((
        generic_handler(pb.DESCRIPTOR.services_by_name["GRPCInferenceService"], inference, raw={
            # bytes in, bytes out: the request is decoded on the inference thread
            "ModelInfer": grpc.unary_unary_rpc_method_handler(inference.model_infer_raw)}),
        stream_handler(multiplexed, max_message_bytes),
        generic_handler(spi.DESCRIPTOR.services_by_name["ModelRuntime"], RuntimeSpiServicer(service, status)),
    ))


# --- the direct port, for smart clients (runtime.direct_port; docs/client.md) ----------------------
# What a client may call on it: inference and the V2 reads a client needs, nothing else. The SPI
# (loadModel, unloadModel, ...) and the routers' multiplexed stream stay on the internal port,
# which tls.allowed_peers / mTLS keeps to the routers.
DIRECT_METHODS = ("ModelInfer", "ModelMetadata", "ModelReady", "ServerLive", "ServerReady")


def add_direct_to_server(server: grpc.aio.Server, service: RuntimeService, *, max_message_bytes: int,
                         access_log: bool = False, tracer: Tracer | None = None) -> None:
    """The direct port's only service: ``DIRECT_METHODS`` of the V2 GRPCInferenceService, which
    never load (a miss answers "not here": loads stay the routers' decision). Any other method,
    the SPI's and the multiplexed stream's included, is UNIMPLEMENTED there."""
    observed = (ObservedInference(service, access_log=access_log, tracer=tracer)
                if access_log or tracer is not None else None)
    inference = InferenceServicer(service, observed, max_message_bytes, loads=False)
    everything = generic_handler(pb.DESCRIPTOR.services_by_name["GRPCInferenceService"], inference, raw={
        "ModelInfer": grpc.unary_unary_rpc_method_handler(inference.model_infer_raw)})
    prefix = "/inference.GRPCInferenceService/"
    allowed = frozenset(prefix + name for name in DIRECT_METHODS)

    class Direct(grpc.GenericRpcHandler):  # type: ignore[misc]  # grpc has no type stubs
        def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
            return everything.service(details) if details.method in allowed else None

    server.add_generic_rpc_handlers((Direct(),))
# --- end of the direct port ----------------------------------------------------------------------
