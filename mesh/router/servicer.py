"""gRPC edge of the management API (mmesh.ModelMesh): protobuf <-> the ``Management`` core."""

from __future__ import annotations

import grpc

from mesh.errors import InvalidArgument
from mesh.gen.mmesh import model_mesh_pb2 as mm
from mesh.gen.mmesh import model_mesh_pb2_grpc as mm_grpc
from mesh.router.bulk import MAX_BYTES, MAX_ITEMS, BulkItem, BulkRegistration
from mesh.router.management import Management, ModelInfoData, ModelStatus, VModelStatus
from mesh.transport.metadata import CHECK_SOURCE, RETRY_FAILED, flagged
from mesh.transport.status import handled

ORIGIN = "router"


def _info(msg: mm.ModelInfo) -> ModelInfoData:
    return ModelInfoData(type=msg.type, path=msg.path, key=msg.key, size_hint_bytes=msg.sizeHintBytes,
                         min_copies=msg.minCopies, max_copies=msg.maxCopies, labels=tuple(msg.labels),
                         gpu=msg.gpu)


def model_status_pb(status: ModelStatus) -> mm.ModelStatusInfo:
    enum = mm.ModelStatusInfo.ModelStatus
    out = mm.ModelStatusInfo(status=enum.Value(status.status), errors=status.errors)
    for copy in status.copies:
        out.modelCopyInfos.add(location=copy.instance_id, copyStatus=enum.Value(
            {"loading": "LOADING", "loaded": "LOADED", "failed": "LOADING_FAILED"}.get(copy.state, "UNKNOWN")),
            time=copy.time_ms, sizeBytes=copy.size_bytes, device=copy.device)
    return out


def vmodel_status_pb(status: VModelStatus) -> mm.VModelStatusInfo:
    out = mm.VModelStatusInfo(status=mm.VModelStatusInfo.VModelStatus.Value(status.status),
                              activeModelId=status.active_model_id,
                              targetModelId=status.target_model_id, owner=status.owner)
    if status.active is not None:
        out.activeModelStatus.CopyFrom(model_status_pb(status.active))
    if status.target is not None:
        out.targetModelStatus.CopyFrom(model_status_pb(status.target))
    for t in status.split:
        out.splitTargets.add(modelId=t.model_id, weight=t.weight, modelStatus=model_status_pb(t.status),
                             receivingTraffic=t.receiving)
    out.stickyHeader = status.sticky_header
    return out


class ModelMeshServicer(mm_grpc.ModelMeshServicer):
    def __init__(self, management: Management) -> None:
        self._m = management
        self._bulk = BulkRegistration(management)

    @handled(ORIGIN)
    async def registerModel(
            self, request: mm.RegisterModelRequest, context: grpc.aio.ServicerContext) -> mm.ModelStatusInfo:
        check = flagged(context.invocation_metadata(), CHECK_SOURCE)  # mesh model register
        status = await self._m.register_model(request.modelId, _info(request.modelInfo),
                                              load_now=request.loadNow, sync=request.sync,
                                              last_used_ms=request.lastUsedTime, check_source=check)
        return model_status_pb(status)

    @handled(ORIGIN)
    async def registerModels(
            self, request: mm.RegisterModelsRequest, context: grpc.aio.ServicerContext) -> mm.RegisterModelsResponse:
        # The bounds first, before anything is decoded further, read or written.
        if len(request.items) > MAX_ITEMS:
            raise InvalidArgument(f"registerModels got {len(request.items):,} items; the limit is {MAX_ITEMS:,} "
                                  "a call (send several calls)")
        size = request.ByteSize()
        if size > MAX_BYTES:
            raise InvalidArgument(f"registerModels got {size:,} bytes; the limit is {MAX_BYTES:,} a call "
                                  "(send several calls)")
        items = [BulkItem(model_id=it.modelId, info=_info(it.modelInfo), load_now=it.loadNow, vmodel_id=it.vModelId,
                          owner=it.owner, auto_delete=it.autoDeleteTargetModel) for it in request.items]
        out = mm.RegisterModelsResponse()
        for r in await self._bulk.register(items, all_or_nothing=request.allOrNothing):
            result = out.results.add(index=r.index, modelId=r.model_id, code=r.code, message=r.message,
                                     created=r.created)
            if r.vmodel is not None:
                result.vModelStatus.CopyFrom(vmodel_status_pb(r.vmodel))
        return out

    @handled(ORIGIN)
    async def unregisterModel(
            self, request: mm.UnregisterModelRequest, context: grpc.aio.ServicerContext) -> mm.UnregisterModelResponse:
        await self._m.unregister_model(request.modelId)
        return mm.UnregisterModelResponse()

    @handled(ORIGIN)
    async def getModelStatus(
            self, request: mm.GetStatusRequest, context: grpc.aio.ServicerContext) -> mm.ModelStatusInfo:
        return model_status_pb(await self._m.model_status(request.modelId))

    @handled(ORIGIN)
    async def ensureLoaded(
            self, request: mm.EnsureLoadedRequest, context: grpc.aio.ServicerContext) -> mm.ModelStatusInfo:
        retry = flagged(context.invocation_metadata(), RETRY_FAILED)  # mesh model load --retry
        status = await self._m.ensure_loaded(request.modelId, sync=request.sync,
                                             last_used_ms=request.lastUsedTime, retry_failed=retry)
        return model_status_pb(status)

    @handled(ORIGIN)
    async def setVModel(self, request: mm.SetVModelRequest, context: grpc.aio.ServicerContext) -> mm.VModelStatusInfo:
        status = await self._m.set_vmodel(
            request.vModelId, request.targetModelId, owner=request.owner,
            update_only=request.updateOnly,
            info=_info(request.modelInfo) if request.HasField("modelInfo") else None,
            auto_delete=request.autoDeleteTargetModel, load_now=request.loadNow, force=request.force,
            sync=request.sync, expected_target=request.expectedTargetModelId)
        return vmodel_status_pb(status)

    @handled(ORIGIN)
    async def setVModelSplit(
            self, request: mm.SetVModelSplitRequest, context: grpc.aio.ServicerContext) -> mm.VModelStatusInfo:
        status = await self._m.set_vmodel_split(
            request.vModelId, [(t.modelId, t.weight) for t in request.targets], owner=request.owner,
            sticky_header=request.stickyHeader, sync=request.sync, stable=request.stableModelId,
            infos={t.modelId: _info(t.modelInfo) for t in request.targets[:64] if t.HasField("modelInfo")})
        return vmodel_status_pb(status)

    @handled(ORIGIN)
    async def promoteVModel(
            self, request: mm.PromoteVModelRequest, context: grpc.aio.ServicerContext) -> mm.VModelStatusInfo:
        status = await self._m.promote_vmodel(request.vModelId, request.modelId, owner=request.owner,
                                              sync=request.sync)
        return vmodel_status_pb(status)

    @handled(ORIGIN)
    async def getVModelStatus(
            self, request: mm.GetVModelStatusRequest, context: grpc.aio.ServicerContext) -> mm.VModelStatusInfo:
        return vmodel_status_pb(await self._m.vmodel_status(request.vModelId, request.owner))

    @handled(ORIGIN)
    async def deleteVModel(
            self, request: mm.DeleteVModelRequest, context: grpc.aio.ServicerContext) -> mm.DeleteVModelResponse:
        await self._m.delete_vmodel(request.vModelId, request.owner)
        return mm.DeleteVModelResponse()

    @handled(ORIGIN)
    async def listModels(
            self, request: mm.ListModelsRequest, context: grpc.aio.ServicerContext) -> mm.ListModelsResponse:
        entries, token = await self._m.list_models(prefix=request.prefix, page_size=request.pageSize,
                                                   page_token=request.pageToken)
        out = mm.ListModelsResponse(nextPageToken=token)
        for e in entries:
            out.models.add(modelId=e.spec.model_id, modelInfo=mm.ModelInfo(
                type=e.spec.type, path=e.spec.path, key=e.spec.key, sizeHintBytes=e.spec.size_hint_bytes,
                minCopies=e.spec.min_copies, maxCopies=e.spec.max_copies, labels=list(e.spec.labels),
                gpu=e.spec.gpu_mode),
                status=mm.ModelStatusInfo.ModelStatus.Value(e.status), loadedCopies=e.loaded_copies)
        return out
