"""gRPC to an external model server (mesh.runtime.servers), behind a transport-neutral face.

The adapters in ``mesh.runtime.servers`` speak of methods, messages and status names; this is
the only place their calls touch grpc. ``call`` is blocking (the runtime's load threads),
``forward`` is awaited on the event loop with the request's bytes passed through untouched.
"""

from __future__ import annotations

from typing import Any

import grpc

from mesh.errors import MeshError
from mesh.gen.inference import grpc_service_pb2 as pb

MAX_REASON = 1000  # characters of a server's message kept in an error
SMALL_ANSWER = 4 << 20  # management answers (load, unload, metadata, status)
INFER = "/inference.GRPCInferenceService/ModelInfer"
LIVE = "/inference.GRPCInferenceService/ServerLive"
READY = "/inference.GRPCInferenceService/ModelReady"


class ServerCallError(MeshError):
    """The server answered a call with a status other than OK (or could not be reached).
    ``status`` is the gRPC status name (``UNAVAILABLE``, ``NOT_FOUND``...), ``details`` its message."""

    def __init__(self, status: str, details: str) -> None:
        super().__init__(f"{status}: {details}")
        self.status = status
        self.details = details


def _error(exc: grpc.RpcError) -> ServerCallError:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else None
    name = code.name if code is not None else "UNKNOWN"
    return ServerCallError(name, str(details or name)[:MAX_REASON])


class ServerChannel:
    """Channels to one server: a blocking one for management calls, an asyncio one (made on the
    event loop at the first request) for inference, its answers limited to ``max_message_bytes``."""

    def __init__(self, address: str, max_message_bytes: int) -> None:
        self.address = address
        self.max_message_bytes = max_message_bytes
        self._channel = grpc.insecure_channel(address, options=[
            ("grpc.max_receive_message_length", SMALL_ANSWER), ("grpc.enable_retries", 0)])
        self._aio: grpc.aio.Channel | None = None
        self._infer: Any = None

    def call(self, method: str, request: Any, response: Any, timeout: float) -> Any:
        """``method`` (a full path) with a protobuf ``request``; the ``response`` class's message.
        ServerCallError for any status but OK."""
        stub = self._channel.unary_unary(method, request_serializer=type(request).SerializeToString,
                                         response_deserializer=response.FromString)
        try:
            return stub(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise _error(exc) from None

    def live(self, timeout: float = 2.0) -> bool:
        try:
            return bool(self.call(LIVE, pb.ServerLiveRequest(), pb.ServerLiveResponse, timeout).live)
        except ServerCallError:
            return False

    def _open(self) -> grpc.aio.Channel:
        if self._aio is None:
            self._aio = grpc.aio.insecure_channel(self.address, options=[
                ("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.max_send_message_length", self.max_message_bytes + 1024)])
        return self._aio

    async def forward(self, body: bytes, timeout: float, metadata: tuple[tuple[str, Any], ...]) -> bytes:
        """ModelInfer with ``body`` as the serialized request; the serialized response."""
        if self._infer is None:
            self._infer = self._open().unary_unary(INFER)
        try:
            answer: bytes = await self._infer(body, timeout=timeout, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from None
        return answer

    async def ready(self, name: str, timeout: float, metadata: tuple[tuple[str, Any], ...]) -> bool:
        """ModelReady for ``name`` (awaited on the event loop); False for any failure, an
        UNIMPLEMENTED included."""
        call = self._open().unary_unary(READY, request_serializer=pb.ModelReadyRequest.SerializeToString,
                                        response_deserializer=pb.ModelReadyResponse.FromString)
        try:
            answer = await call(pb.ModelReadyRequest(name=name), timeout=timeout, metadata=metadata)
        except grpc.aio.AioRpcError:
            return False
        return bool(answer.ready)

    async def aclose(self) -> None:
        if self._aio is not None:
            await self._aio.close()
        self._channel.close()


__all__ = ["ServerCallError", "ServerChannel"]
