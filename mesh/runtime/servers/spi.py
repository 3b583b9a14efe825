"""Servers that implement ModelMesh's runtime SPI (``mmesh.ModelRuntime``).

This is the contract ModelMesh's own runtimes and the modelmesh-runtime-adapter ecosystem
(its Triton, MLServer, OVMS and TorchServe adapters) serve, so any of them plugs in unchanged:

- at start, ``runtimeStatus`` until it answers READY (bounded). Per the SPI it purges the
  server's models, so it is called once: after that the runtime holds the truth. Its
  ``methodInfos`` say where ModelInfer wants the model ID: with an ``idInjectionPath`` of ``[1]``
  the runtime rewrites ``model_name``; otherwise (and always) it sends the ``mm-model-id`` header
  (``mm-model-id-bin`` for an ID that is not printable ASCII), as ModelMesh does;
- ``loadModel(modelId, modelType, modelPath, modelKey)`` with the path where the runtime pulled
  the model and the registration's key; the answer's ``sizeInBytes`` is the copy's size (the
  server's own measurement, ModelMesh's contract), else the runtime's measurement or prediction;
- ``unloadModel(modelId)`` at eviction;
- inference on the same address's ``inference.GRPCInferenceService``, as ModelMesh forwards it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import structlog

from mesh.errors import InvalidArgument, Unavailable
from mesh.gen.mmesh import model_runtime_pb2 as spb
from mesh.registry.records import ModelSpec
from mesh.runtime.servers.base import ExternalServer, field_one
from mesh.transport.model_server import INFER, ServerCallError

log = structlog.get_logger(__name__)

SERVICE = "/mmesh.ModelRuntime/"
READY_TIMEOUT_S = 60.0


class SpiServer(ExternalServer):
    kind = "spi"
    default_types = ()

    def __init__(self, address: str, **kwargs: Any) -> None:
        super().__init__(address, **kwargs)
        if not self.types:
            raise InvalidArgument("runtime.server_types must name the model types the SPI server serves "
                              "(its runtimeStatus does not say)")
        self.inject = False
        self.status: spb.RuntimeStatusResponse | None = None

    def _rpc(self, method: str, request: Any, response: Any, timeout: float) -> Any:
        return self.channel.call(SERVICE + method, request, response, timeout)

    def prepare(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            try:
                status = self._rpc("runtimeStatus", spb.RuntimeStatusRequest(), spb.RuntimeStatusResponse, 5.0)
            except ServerCallError as exc:
                status = None
                why = exc.message[:300]
            else:
                why = spb.RuntimeStatusResponse.Status.Name(status.status)
                if status.status == spb.RuntimeStatusResponse.READY:
                    break
            if time.monotonic() > deadline:
                raise Unavailable(f"the SPI model server at {self.address} is not READY after {READY_TIMEOUT_S:g} s "
                                  f"({why})")
            time.sleep(0.5)
        self.status = status
        info = status.methodInfos.get(INFER.lstrip("/"))  # keyed "inference.GRPCInferenceService/ModelInfer"
        self.inject = info is not None and list(info.idInjectionPath) == [1]
        log.info("SPI model server ready", version=status.runtimeVersion[:100],
                 capacity_bytes=status.capacityInBytes, inject_model_name=self.inject)

    def server_name(self, model_id: str) -> str:
        return model_id

    def addressing(self, model_id: str, name: str) -> tuple[bytes, tuple[tuple[str, Any], ...]]:
        header: tuple[str, Any] = ("mm-model-id", model_id) if model_id.isascii() and model_id.isprintable() \
            else ("mm-model-id-bin", model_id.encode())
        return (field_one(model_id) if self.inject else b""), (header,)

    def _load(self, spec: ModelSpec, path: Path, name: str, timeout: float) -> int:
        answer = self._rpc("loadModel", spb.LoadModelRequest(modelId=name, modelType=spec.type, modelPath=str(path),
                                                             modelKey=spec.key or "{}"),
                           spb.LoadModelResponse, timeout)
        return int(answer.sizeInBytes)

    def _unload(self, name: str, timeout: float) -> None:
        self._rpc("unloadModel", spb.UnloadModelRequest(modelId=name), spb.UnloadModelResponse, timeout)


__all__ = ["SpiServer"]
