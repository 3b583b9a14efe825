"""gRPC edge of the runtime: the V2 data plane and the mmesh.ModelRuntime SPI, thin over
:class:`~mesh.runtime.service.RuntimeService`."""

from __future__ import annotations

import grpc

from mesh import __version__
from mesh.gen.inference import grpc_service_pb2 as pb
from mesh.gen.inference import grpc_service_pb2_grpc as pb_grpc
from mesh.gen.mmesh import model_runtime_pb2 as spi
from mesh.gen.mmesh import model_runtime_pb2_grpc as spi_grpc
from mesh.registry.records import ModelSpec
from mesh.runtime.service import RuntimeService
from mesh.transport.handlers import generic_handler
from mesh.transport.metadata import LAST_USED, model_selection
from mesh.transport.multiplex import RequestFrame, stream_handler
from mesh.transport.status import handled

ORIGIN = "runtime"


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, service: RuntimeService) -> None:
        self._service = service

    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext):
        return pb.ServerReadyResponse(ready=self._service.ready)

    @handled(ORIGIN)
    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext):
        model_id, _, _ = model_selection(context.invocation_metadata())
        return pb.ModelReadyResponse(ready=await self._service.model_ready(model_id or request.name))

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext):
        return pb.ServerMetadataResponse(name="mesh-serving-runtime", version=__version__, extensions=[])

    @handled(ORIGIN)
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext):
        model_id, _, allow = model_selection(context.invocation_metadata())
        return await self._service.model_metadata(model_id or request.name, allow_load=allow)

    @handled(ORIGIN)
    async def model_infer_raw(self, body: bytes, context: grpc.aio.ServicerContext) -> bytes:
        model_id, _, allow = model_selection(context.invocation_metadata())
        return await self._service.infer(model_id, body, allow_load=allow)


class RuntimeSpiServicer(spi_grpc.ModelRuntimeServicer):
    def __init__(self, service: RuntimeService, status: dict[str, object]) -> None:
        self._service = service
        self._status = status

    @handled(ORIGIN)
    async def loadModel(self, request: spi.LoadModelRequest, context: grpc.aio.ServicerContext):
        spec = await self._service.spec_for(request.modelId, request.modelType, request.modelPath,
                                            request.modelKey)
        last_used = _last_used_from(context)
        entry = await self._service.load(spec, last_used=last_used)
        return spi.LoadModelResponse(sizeInBytes=entry.reserved_bytes)

    @handled(ORIGIN)
    async def unloadModel(self, request: spi.UnloadModelRequest, context: grpc.aio.ServicerContext):
        await self._service.unload(request.modelId)
        return spi.UnloadModelResponse()

    @handled(ORIGIN)
    async def predictModelSize(self, request: spi.PredictModelSizeRequest,
                               context: grpc.aio.ServicerContext):
        spec = await self._service.spec_for(request.modelId, request.modelType, request.modelPath,
                                            request.modelKey)
        return spi.PredictModelSizeResponse(sizeInBytes=self._service.predict_size(spec))

    @handled(ORIGIN)
    async def modelSize(self, request: spi.ModelSizeRequest, context: grpc.aio.ServicerContext):
        return spi.ModelSizeResponse(sizeInBytes=self._service.model_size(request.modelId))

    @handled(ORIGIN)
    async def runtimeStatus(self, request: spi.RuntimeStatusRequest,
                            context: grpc.aio.ServicerContext):
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


def add_to_server(server: grpc.aio.Server, service: RuntimeService, status: dict[str, object]) -> None:
    inference = InferenceServicer(service)

    async def multiplexed(frame: RequestFrame) -> bytes:
        if frame.spec:
            # The router's copy of the registration: used only if ours is not cached; our registry
            # watch keeps what we cache current either way.
            service.specs.prime(ModelSpec.from_json(frame.spec), replace=False)
        return await service.infer(frame.model_id, frame.body, allow_load=frame.allow_load)

    server.add_generic_rpc_handlers((
        generic_handler(pb.DESCRIPTOR.services_by_name["GRPCInferenceService"], inference, raw={
            # bytes in, bytes out: the request is decoded on the inference thread
            "ModelInfer": grpc.unary_unary_rpc_method_handler(inference.model_infer_raw)}),
        stream_handler(multiplexed),
        generic_handler(spi.DESCRIPTOR.services_by_name["ModelRuntime"], RuntimeSpiServicer(service, status)),
    ))
