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


def connection_hint(details: str, address: str, *, tls: bool) -> str | None:
    """One line saying why a connection to the router failed and what to do, from gRPC's UNAVAILABLE
    details (their wording is gRPC core's, matched loosely); None: not a connection failure (the router
    answered UNAVAILABLE itself, e.g. no runtime could take the request)."""
    lowered = details.lower()
    if "hostname verification" in lowered or "peer name" in lowered:
        return (f"the router's certificate does not name {address.rsplit(':', 1)[0]}: pass the name it "
                "carries with --tls-server-name (or connect with --router to a name it carries)")
    if "certificate_verify_failed" in lowered or "unable to get local issuer" in lowered:
        return (f"the router's certificate at {address} is not signed by the CA given with --tls-ca "
                "(or by the system's CAs without it): pass the CA that signed it")
    if tls and ("wrong_version_number" in lowered or "tls handshake" in lowered or "ssl" in lowered):
        return (f"TLS with the router at {address} failed: it may serve plaintext (drop the --tls-* "
                f"options), or check --tls-ca, --tls-cert and --tls-key ({details})")
    if not tls and "socket closed" in lowered:
        return (f"the router at {address} closed the connection: it may require TLS (pass --tls-ca with "
                "the CA that signed its certificate)")
    if "connection refused" in lowered or "failed to connect to remote host" in lowered \
            or "name resolution" in lowered or "dns resolution" in lowered:
        return f"cannot reach the router at {address}: is it running? (start one with `mesh up`)"
    if "failed to connect" in lowered or "connections to all backends failing" in lowered:
        return f"cannot connect to the router at {address} ({details})"
    return None


class RouterClient:
    def __init__(self, address: str, timeout_s: float, *, token: str | None = None,
                 credentials: grpc.ChannelCredentials | None = None, server_name: str | None = None) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.tls = credentials is not None
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
            details = err.details() or ""
            if code == grpc.StatusCode.UNAVAILABLE:
                hint = connection_hint(details, self.address, tls=self.tls)
                if hint is not None:
                    raise CliError(hint, exit_code=2) from None
            raise CliError(f"{code.name}: {details}") from None

    def close(self) -> None:
        self.channel.close()

    def infer(self, model: str, inputs: dict[str, np.ndarray], *, vmodel: bool,
              outputs: list[str], graph: bool = False) -> tuple[pb.ModelInferResponse, dict[str, np.ndarray]]:
        request = encode_request(model_name=model, inputs=inputs, raw=False, outputs=outputs)
        # model_name alone is resolved by the router as a vModel, else a graph, else a model (what a
        # V2 client that sets no header gets, as the README says); mm-vmodel-id insists on a vModel.
        # A graph is never named by a header: a header always names a model or a vModel.
        header = (("mm-vmodel-id", model),) if vmodel and not graph else ()
        response = self.call(self.infer_stub.ModelInfer, request, metadata=header)
        return response, decode_response(response)


def parse_input(text: str, datatype: str | None) -> np.ndarray:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"--input is not valid JSON: {exc}") from None
    try:
        array: np.ndarray | None = np.asarray(value)
    except ValueError:  # ragged: numpy refuses nested lists of unequal lengths
        array = None
    if array is None or array.dtype == object:
        raise InvalidArgument("--input must be a rectangular JSON array of numbers or strings "
                              "(every row of the same length), e.g. '[[1.0, 2.0], [3.0, 4.0]]'")
    if datatype:
        from mesh.tensors import numpy_dtype

        try:
            return array.astype(numpy_dtype(datatype))
        except ValueError as exc:
            raise InvalidArgument(f"--input does not convert to {datatype}: {exc}") from None
    if array.dtype.kind == "i":
        array = array.astype(np.int64)
    elif array.dtype.kind == "f":
        array = array.astype(np.float64)
    return array


__all__ = ["CliError", "RouterClient", "channel_credentials", "mm", "parse_input"]
