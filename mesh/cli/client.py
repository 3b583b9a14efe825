"""The CLI's gRPC client: the management API and V2 inference against a router."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import numpy as np

from mesh.cli.errors import CliError
from mesh.errors import InvalidArgument
from mesh.gen.inference import grpc_service_pb2 as pb
from mesh.gen.inference import grpc_service_pb2_grpc as pb_grpc
from mesh.gen.mmesh import graphs_pb2_grpc as gp_grpc
from mesh.gen.mmesh import model_mesh_pb2 as mm
from mesh.gen.mmesh import model_mesh_pb2_grpc as mm_grpc
from mesh.tensors import decode_response, encode_request


def _read(option: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CliError(f"{option}: cannot read {path}: {exc.strerror or exc}", exit_code=2) from None


def channel_credentials(ca: str | None, cert: str | None, key: str | None) -> grpc.ChannelCredentials | None:
    """TLS to the router when any of --tls-ca/--tls-cert/--tls-key is given (no --tls-ca: the system's
    roots); None: plaintext."""
    if not (ca or cert or key):
        return None
    if bool(cert) != bool(key):
        raise CliError("--tls-cert and --tls-key go together (a client certificate and its key)", exit_code=2)
    return grpc.ssl_channel_credentials(root_certificates=_read("--tls-ca", ca) if ca else None,
                                        private_key=_read("--tls-key", key) if key else None,
                                        certificate_chain=_read("--tls-cert", cert) if cert else None)


class RouterClient:
    def __init__(self, address: str, timeout_s: float, *, token: str | None = None,
                 credentials: grpc.ChannelCredentials | None = None, server_name: str | None = None) -> None:
        self.address = address
        self.timeout_s = timeout_s
        options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        self.channel = (grpc.secure_channel(address, credentials, options=options) if credentials is not None
                        else grpc.insecure_channel(address, options=options))
        # The token travels as metadata on every call; it is never printed, not even in errors.
        self._auth: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        # protoc's gRPC stubs are unannotated (mesh/gen is generated): the calls are untyped.
        self.mesh = mm_grpc.ModelMeshStub(self.channel)  # type: ignore[no-untyped-call]
        self.infer_stub = pb_grpc.GRPCInferenceServiceStub(self.channel)  # type: ignore[no-untyped-call]
        self.graphs = gp_grpc.ModelMeshGraphsStub(self.channel)  # type: ignore[no-untyped-call]

    def call(self, method: Any, request: Any, metadata: tuple[tuple[str, str], ...] = ()) -> Any:
        try:
            return method(request, timeout=self.timeout_s, metadata=self._auth + metadata)
        except grpc.RpcError as err:
            code = err.code()
            details = err.details()
            lowered = (details or "").lower()
            if code == grpc.StatusCode.UNAVAILABLE and any(w in lowered for w in ("ssl", "handshake", "certificate")):
                raise CliError(f"TLS with the router at {self.address} failed (check --tls-ca, --tls-cert, "
                               f"--tls-key): {details}", exit_code=2) from None
            if code == grpc.StatusCode.UNAVAILABLE and ("connect" in (details or "").lower()
                                                        or "failed to" in (details or "").lower()):
                raise CliError(f"cannot reach the router at {self.address}: is it running? "
                               "(start one with `mesh up`)", exit_code=2) from None
            raise CliError(f"{code.name}: {details}") from None

    def close(self) -> None:
        self.channel.close()

    def infer(self, model: str, inputs: dict[str, np.ndarray], *, vmodel: bool,
              outputs: list[str], graph: bool = False) -> tuple[pb.ModelInferResponse, dict[str, np.ndarray]]:
        request = encode_request(model_name=model, inputs=inputs, raw=False, outputs=outputs)
        # A graph is named by model_name alone: a header always names a model or a vModel.
        header = () if graph else (("mm-vmodel-id" if vmodel else "mm-model-id", model),)
        response = self.call(self.infer_stub.ModelInfer, request, metadata=header)
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
        from mesh.tensors import numpy_dtype

        array = array.astype(numpy_dtype(datatype))
    elif array.dtype.kind == "i":
        array = array.astype(np.int64)
    elif array.dtype.kind == "f":
        array = array.astype(np.float64)
    return array


__all__ = ["CliError", "RouterClient", "channel_credentials", "mm", "parse_input"]
