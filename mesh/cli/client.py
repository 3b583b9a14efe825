"""The CLI's gRPC client: the management API and V2 inference against a router."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np

from mesh.errors import InvalidArgument
from mesh.gen.inference import grpc_service_pb2 as pb
from mesh.gen.inference import grpc_service_pb2_grpc as pb_grpc
from mesh.gen.mmesh import model_mesh_pb2 as mm
from mesh.gen.mmesh import model_mesh_pb2_grpc as mm_grpc
from mesh.runtime.tensors import decode_response, encode_request


class CliError(Exception):
    """A failure to report to the user as one line, with an exit code."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class RouterClient:
    def __init__(self, address: str, timeout_s: float) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.channel = grpc.insecure_channel(address, options=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024)])
        self.mesh = mm_grpc.ModelMeshStub(self.channel)
        self.infer_stub = pb_grpc.GRPCInferenceServiceStub(self.channel)

    def call(self, method: Any, request: Any, metadata: tuple[tuple[str, str], ...] = ()) -> Any:
        try:
            return method(request, timeout=self.timeout_s, metadata=metadata)
        except grpc.RpcError as err:
            code = err.code()  # type: ignore[attr-defined]
            details = err.details()  # type: ignore[attr-defined]
            if code == grpc.StatusCode.UNAVAILABLE and ("connect" in (details or "").lower()
                                                        or "failed to" in (details or "").lower()):
                raise CliError(f"cannot reach the router at {self.address}: is it running? "
                               "(start one with `mesh up`)", exit_code=2) from None
            raise CliError(f"{code.name}: {details}") from None

    def close(self) -> None:
        self.channel.close()

    def infer(self, model: str, inputs: dict[str, np.ndarray], *, vmodel: bool,
              outputs: list[str]) -> tuple[pb.ModelInferResponse, dict[str, np.ndarray]]:
        request = encode_request(model_name=model, inputs=inputs, raw=False, outputs=outputs)
        header = "mm-vmodel-id" if vmodel else "mm-model-id"
        response = self.call(self.infer_stub.ModelInfer, request, metadata=((header, model),))
        return response, decode_response(response)


def parse_input(text: str, datatype: str | None) -> np.ndarray:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"--input is not valid JSON: {exc}") from None
    array = np.asarray(value)
    if array.dtype == object:
        raise InvalidArgument("--input must be a rectangular JSON array of numbers or strings")
    if datatype:
        from mesh.runtime.tensors import numpy_dtype

        array = array.astype(numpy_dtype(datatype))
    elif array.dtype.kind == "i":
        array = array.astype(np.int64)
    elif array.dtype.kind == "f":
        array = array.astype(np.float64)
    return array


__all__ = ["CliError", "RouterClient", "mm", "parse_input"]
