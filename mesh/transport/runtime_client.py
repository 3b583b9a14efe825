"""Calls to runtimes: the ModelRuntime SPI's loadModel (a router's ensureLoaded, vModel targets and
copies; a leaving runtime re-homing its models) and the V2 ServerLive probe (a router taking back
an instance it found unreachable). gRPC stays here; callers see MeshError and booleans. A load
whose runtime dies under it is reported to the crash witness, and a crash quarantines the model
(FAILED_PRECONDITION, not retried elsewhere: ``mesh.registry.crashes``)."""

from __future__ import annotations

from typing import Protocol

import grpc

from mesh.errors import FailedPrecondition, MeshError
from mesh.gen.inference import grpc_service_pb2 as pb
from mesh.gen.mmesh import model_runtime_pb2 as spi
from mesh.gen.mmesh import model_runtime_pb2_grpc as spi_grpc
from mesh.registry.crashes import CrashWitness
from mesh.registry.records import ModelSpec
from mesh.transport.metadata import CHECK_SOURCE, LAST_USED, RETRY_FAILED
from mesh.transport.server import ChannelPool
from mesh.transport.status import MESH_CODES, lost_peer

LIVE = "/inference.GRPCInferenceService/ServerLive"


class Instance(Protocol):
    """Where a call goes: a routing target or an instance record."""

    @property
    def instance_id(self) -> str: ...

    @property
    def endpoint(self) -> str: ...


class RuntimeClient:
    def __init__(self, channels: ChannelPool, witness: CrashWitness | None = None) -> None:
        self._channels = channels
        self._witness = witness  # told when a load loses its runtime (mesh.registry.crashes)

    async def load(self, target: Instance, spec: ModelSpec, last_used_ms: int, timeout_s: float, *,
                   retry_failed: bool = False) -> None:
        """Load ``spec`` on ``target`` (returns once loaded); a failure is a MeshError with the
        runtime's status code and message. ``retry_failed``: the runtime forgets a remembered load
        failure of the model first (``mesh.runtime.failures``)."""
        stub = spi_grpc.ModelRuntimeStub(self._channels.get(target.endpoint))  # type: ignore[no-untyped-call]
        request = spi.LoadModelRequest(modelId=spec.model_id, modelType=spec.type,
                                       modelPath=spec.path, modelKey=spec.key)
        try:
            await stub.loadModel(request, timeout=max(timeout_s, 0.1),
                                 metadata=((LAST_USED, str(last_used_ms)),)
                                 + (((RETRY_FAILED, "1"),) if retry_failed else ()))
        except grpc.aio.AioRpcError as err:
            if self._witness is not None and lost_peer(err):
                crash = await self._witness.lost(spec.model_id, target.instance_id, target.endpoint)
                if crash is not None:
                    raise FailedPrecondition(f"model {spec.model_id!r} is quarantined: {crash.reason}") from None
            error = MeshError(f"loading {spec.model_id!r} on {target.instance_id}: {err.details()}")
            error.code = MESH_CODES.get(err.code(), error.code)
            raise error from None

    async def check_source(self, target: Instance, spec: ModelSpec, timeout_s: float) -> None:
        """Whether ``target`` could read ``spec``'s file or storage key, without loading it (SPI
        predictModelSize with ``mesh-check-source``); a MeshError saying why not."""
        stub = spi_grpc.ModelRuntimeStub(self._channels.get(target.endpoint))  # type: ignore[no-untyped-call]
        request = spi.PredictModelSizeRequest(modelId=spec.model_id, modelType=spec.type,
                                              modelPath=spec.path, modelKey=spec.key)
        try:
            await stub.predictModelSize(request, timeout=timeout_s, metadata=((CHECK_SOURCE, "1"),))
        except grpc.aio.AioRpcError as err:
            error = MeshError(f"{err.details()} (checked on {target.instance_id})")
            error.code = MESH_CODES.get(err.code(), error.code)
            raise error from None

    async def live(self, endpoint: str, timeout_s: float) -> bool:
        """Whether the server at ``endpoint`` answers ServerLive within ``timeout_s``."""
        call = self._channels.get(endpoint).unary_unary(
            LIVE, request_serializer=pb.ServerLiveRequest.SerializeToString,
            response_deserializer=pb.ServerLiveResponse.FromString)
        try:
            await call(pb.ServerLiveRequest(), timeout=timeout_s)
        except (TimeoutError, grpc.aio.AioRpcError):
            return False
        return True


__all__ = ["Instance", "RuntimeClient"]
