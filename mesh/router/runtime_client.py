"""The router's calls to runtimes over the ModelRuntime SPI (ensureLoaded, vModel targets)."""

from __future__ import annotations

import grpc

from mesh.errors import MeshError
from mesh.gen.mmesh import model_runtime_pb2 as spi
from mesh.gen.mmesh import model_runtime_pb2_grpc as spi_grpc
from mesh.registry.records import ModelSpec
from mesh.router.routing import Target
from mesh.transport.metadata import LAST_USED
from mesh.transport.server import ChannelPool
from mesh.transport.status import MESH_CODES


class RuntimeClient:
    def __init__(self, channels: ChannelPool) -> None:
        self._channels = channels

    async def load(self, target: Target, spec: ModelSpec, last_used_ms: int, timeout_s: float) -> None:
        stub = spi_grpc.ModelRuntimeStub(self._channels.get(target.endpoint))
        request = spi.LoadModelRequest(modelId=spec.model_id, modelType=spec.type,
                                       modelPath=spec.path, modelKey=spec.key)
        try:
            await stub.loadModel(request, timeout=timeout_s,
                                 metadata=((LAST_USED, str(last_used_ms)),))
        except grpc.aio.AioRpcError as err:
            error = MeshError(f"loading {spec.model_id!r} on {target.instance_id}: {err.details()}")
            error.code = MESH_CODES.get(err.code(), error.code)
            raise error from None
