"""The router's gRPC V2 front end: a thin servicer over ``mesh.router.dataplane``.

``ModelInfer`` and ``ModelMetadata`` are registered through a generic handler with no
(de)serializers: the request arrives as the client's bytes and leaves as the same bytes, and the
response comes back the same way. Without a header the model is field 1 of the request
(``read_model_name``, which touches nothing else). Errors become statuses in one place
(``mesh.transport.status``).
"""

from __future__ import annotations

import grpc

from mesh.errors import ResourceExhausted
from mesh.gen.inference import grpc_service_pb2 as pb
from mesh.observability.metrics import RouterMetrics
from mesh.router.dataplane import INFER, METADATA, DataPlane
from mesh.transport.handlers import generic_handler
from mesh.transport.status import status_of
from mesh.transport.wire import read_model_name


class InferenceServicer:
    def __init__(self, plane: DataPlane, metrics: RouterMetrics) -> None:
        self.plane = plane
        self.metrics = metrics

    async def model_infer(self, body: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return await self._bounded(INFER, body, context)

    async def model_metadata_raw(self, body: bytes, context: grpc.aio.ServicerContext) -> bytes:
        # Counted like an inference: its body may be as large, and it may wait for a load.
        return await self._bounded(METADATA, body, context)

    async def _bounded(self, method: str, body: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """``DataPlane.relay`` within the in-flight bounds (mesh.transport.inflight)."""
        size = len(body)
        inflight = self.plane.inflight
        try:
            connection = inflight.enter(size, context.peer())
            refused = ""
        except ResourceExhausted as exc:
            refused = exc.message
        if refused:  # aborted outside the except block: no cycle keeps the body (mesh.malloc.trim)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refused)
        try:
            return await self.plane.relay(method, body, context.invocation_metadata() or (),
                                          lambda: read_model_name(body), context.time_remaining())
        except Exception as exc:
            code, message = status_of(exc)
            await context.abort(code, message)
            raise AssertionError("unreachable: abort raises") from None
        finally:
            inflight.leave(size, connection)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ModelReadyResponse:
        try:
            ready = await self.plane.model_ready(context.invocation_metadata() or (),
                                                 lambda: request.name)
            return pb.ModelReadyResponse(ready=ready)
        except Exception as exc:
            code, message = status_of(exc)
            await context.abort(code, message)
        raise AssertionError("unreachable: abort raises")

    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
                          ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.plane.ready())

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
                             ) -> pb.ServerMetadataResponse:
        name, version, extensions = self.plane.server_metadata()
        return pb.ServerMetadataResponse(name=name, version=version, extensions=list(extensions))

    def _model_labels(self, body: bytes, context: grpc.aio.ServicerContext) -> tuple[str, str]:
        return self.plane.labels(context.invocation_metadata() or (),
                                 lambda: read_model_name(body))

    def handler(self) -> grpc.GenericRpcHandler:
        # Every method records modelmesh_api_request_milliseconds (and ModelInfer its sizes).
        timed = self.metrics.timed
        return generic_handler(pb.DESCRIPTOR.services_by_name["GRPCInferenceService"],
                               self.metrics.metered(self), raw={
            # bytes in, bytes out: no protobuf work on the router for inference
            "ModelInfer": grpc.unary_unary_rpc_method_handler(
                timed("ModelInfer", self.model_infer, self._model_labels)),
            "ModelMetadata": grpc.unary_unary_rpc_method_handler(
                timed("ModelMetadata", self.model_metadata_raw, self._model_labels)),
        })
