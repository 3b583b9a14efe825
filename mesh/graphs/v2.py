"""The V2 messages a graph passes between its steps, handled as bytes wherever possible.

The executor's cost target is "two steps cost the two models plus 1 ms", so requests and responses
stay serialized protobuf, and most conversions are splices of top-level fields, never a decode of
the tensors:

- **A step's request from the node's input** (``$request``): the input's bytes with the step's
  ``model_name`` (and an empty ``model_version``) appended. Protobuf keeps the last value of a
  repeated scalar field, so no re-serialization is needed (the router's ``read_model_name`` and
  every runtime follow that rule).
- **A step's request from a response** (``$response``): ``ModelInferResponse`` and
  ``ModelInferRequest`` share their field numbers and tensor layouts (name 1, datatype 2, shape 3,
  parameters 4, contents 5; ``outputs`` and ``inputs`` are both field 5) except the raw contents:
  ``raw_output_contents`` is field 6 and ``raw_input_contents`` field 7 (6 is the requested
  outputs). So each output becomes the input of the same name, datatype, shape, parameters and
  contents (typed or raw) by copying its field as it is and renumbering the raw contents; the
  response's ``model_name``, ``model_version``, ``id`` and ``parameters`` are dropped and the
  node input's ``id`` and ``parameters`` put in their place (a response's parameters describe
  the response, not the next request).
- **Requested outputs** (the client's ``outputs``) name outputs of the graph's answer, not of
  every step: steps get requests without them (each model answers all its outputs) and the graph's
  final response is cut to them (INVALID_ARGUMENT naming one that is not there).
- **Ensemble results** are the one place that decodes messages (protobuf, not the tensors): the
  outputs of every step, renamed ``<step>.<output>``; if some steps answered raw contents and
  others typed, the typed ones are converted to raw (a response has one form).
- **JSON views** for conditions (:func:`request_view`, :func:`response_view`) are the REST
  form of the message (``id`` and ``parameters`` only when set; tensors with ``name``,
  ``datatype``, ``shape``, flat row-major ``data`` and ``parameters`` when set; BYTES elements as
  UTF-8 text, or base64 when they are not UTF-8, as the REST front end sends them). A tensor's
  ``data`` is decoded only if a condition reaches it.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError

from mesh.errors import InvalidArgument, MeshError
from mesh.gen.inference import grpc_service_pb2 as pb
from mesh.graphs.condition import Lazy
from mesh.tensors import decode_inputs, decode_response

__all__ = ["Request", "finish", "merge", "request_view", "response_view"]

# Top-level field numbers (V2 protocol); every one of them is length-delimited (wire type 2).
_MODEL_NAME, _MODEL_VERSION, _ID, _PARAMETERS, _TENSORS = 1, 2, 3, 4, 5
_REQUESTED_OUTPUTS, _RAW_REQUEST = 6, 7
_RAW_RESPONSE = 6
_RAW_REQUEST_TAG = bytes([(_RAW_REQUEST << 3) | 2])
_EMPTY_VERSION = bytes([(_MODEL_VERSION << 3) | 2, 0])
_LENGTH = struct.Struct("<I")


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string_field(field: int, text: str) -> bytes:
    data = text.encode("utf-8")
    return bytes([(field << 3) | 2]) + _varint(len(data)) + data


def _fields(buf: bytes, what: str) -> list[tuple[int, int, int, int]]:
    """Top-level fields of a serialized message: (field, start of the tag, start of the value, end)."""
    out = []
    pos, end = 0, len(buf)
    while pos < end:
        start = pos
        tag, pos = _read_varint(buf, pos, what)
        field, wire = tag >> 3, tag & 7
        if field == 0:
            raise InvalidArgument(f"{what} is malformed: field number 0")
        if wire == 0:
            _, pos = _read_varint(buf, pos, what)
            value = pos
        elif wire == 1:
            value, pos = pos, pos + 8
        elif wire == 2:
            length, value = _read_varint(buf, pos, what)
            pos = value + length
        elif wire == 5:
            value, pos = pos, pos + 4
        else:
            raise InvalidArgument(f"{what} is malformed: wire type {wire}")
        if pos > end:
            raise InvalidArgument(f"{what} is malformed: a field runs past the end")
        out.append((field, start, value, pos))
    return out


def _read_varint(buf: bytes, pos: int, what: str) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise InvalidArgument(f"{what} is malformed: a truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise InvalidArgument(f"{what} is malformed: a varint too long")


@dataclass(frozen=True, slots=True)
class Request:
    """A node's input: a serialized ModelInferRequest without requested outputs (``body``), and
    its ``id`` and ``parameters`` fields as serialized (``head``), which requests made from
    responses keep."""

    body: bytes
    head: bytes
    id: str

    def to(self, model: str) -> bytes:
        """The request for one step: this body addressed to ``model``."""
        return self.body + _string_field(_MODEL_NAME, model) + _EMPTY_VERSION

    @classmethod
    def from_client(cls, body: bytes) -> tuple[Request, list[str]]:
        """The client's request, and the output names it asks for (none: all)."""
        fields = _fields(body, "the request")
        head = b"".join(body[s:e] for f, s, _, e in fields if f in (_ID, _PARAMETERS))
        id_ = _last_string(body, fields, _ID)
        if not any(f == _REQUESTED_OUTPUTS for f, _, _, _ in fields):
            return cls(body, head, id_), []
        try:
            requested = [o.name for o in pb.ModelInferRequest.FromString(body).outputs]
        except DecodeError:
            raise InvalidArgument("the request is not a ModelInferRequest") from None
        kept = b"".join(body[s:e] for f, s, _, e in fields if f != _REQUESTED_OUTPUTS)
        return cls(kept, head, id_), requested

    @classmethod
    def from_response(cls, response: bytes, input_: Request) -> Request:
        """A request whose inputs are ``response``'s outputs (see the module docstring), with the
        ``id`` and ``parameters`` of ``input_``. Raises InvalidArgument if the bytes do not parse."""
        parts = [input_.head]
        for f, s, v, e in _fields(response, "the response"):
            if f == _TENSORS:
                parts.append(response[s:e])
            elif f == _RAW_RESPONSE:
                parts.append(_RAW_REQUEST_TAG + _varint(e - v) + response[v:e])
        return cls(b"".join(parts), input_.head, input_.id)


def _last_string(buf: bytes, fields: Sequence[tuple[int, int, int, int]], field: int) -> str:
    value = ""
    for f, _, v, e in fields:
        if f == field:
            try:
                value = buf[v:e].decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidArgument("the request's id is not valid UTF-8") from None
    return value


def finish(response: bytes, graph_id: str, requested: Sequence[str]) -> bytes:
    """The graph's answer: the last response, named after the graph, cut to the requested outputs."""
    if not requested:
        return response + _string_field(_MODEL_NAME, graph_id) + _EMPTY_VERSION
    resp = _parse_response(response, "the graph's last step")
    index = {o.name: i for i, o in enumerate(resp.outputs)}
    missing = [n for n in requested if n not in index]
    if missing:
        raise InvalidArgument(f"graph {graph_id!r} has no output {missing[0]!r}; its outputs: "
                              f"{', '.join(map(repr, index)) or 'none'}")
    out = pb.ModelInferResponse(model_name=graph_id, id=resp.id)
    out.parameters.MergeFrom(resp.parameters)
    raw = len(resp.raw_output_contents) == len(resp.outputs) and len(resp.outputs) > 0
    for name in dict.fromkeys(requested):
        out.outputs.append(resp.outputs[index[name]])
        if raw:
            out.raw_output_contents.append(resp.raw_output_contents[index[name]])
    return bytes(out.SerializeToString())


def _parse_response(body: bytes, what: str) -> pb.ModelInferResponse:
    try:
        resp: pb.ModelInferResponse = pb.ModelInferResponse.FromString(body)
        return resp
    except DecodeError:
        raise MeshError(f"{what} answered bytes that are not a ModelInferResponse") from None


def merge(parts: Sequence[tuple[str, bytes]], id_: str) -> bytes:
    """One response with every part's outputs renamed ``<step>.<output>``, in order."""
    responses = [(name, _parse_response(body, f"step {name!r}")) for name, body in parts]
    for name, resp in responses:
        if resp.raw_output_contents and len(resp.raw_output_contents) != len(resp.outputs):
            raise MeshError(f"step {name!r} answered {len(resp.raw_output_contents)} raw contents for "
                            f"{len(resp.outputs)} outputs")
    any_raw = any(resp.raw_output_contents for _, resp in responses)
    out = pb.ModelInferResponse(id=id_)
    for name, resp in responses:
        typed_arrays: dict[str, np.ndarray] | None = None
        for i, tensor in enumerate(resp.outputs):
            merged = out.outputs.add()
            merged.CopyFrom(tensor)
            merged.name = f"{name}.{tensor.name}"
            if not any_raw:
                continue
            if resp.raw_output_contents:
                out.raw_output_contents.append(resp.raw_output_contents[i])
                continue
            if typed_arrays is None:
                try:
                    typed_arrays = decode_response(resp)
                except MeshError as e:
                    raise MeshError(f"step {name!r} answered outputs that do not decode: {e.message}") from None
            merged.ClearField("contents")
            out.raw_output_contents.append(_raw(typed_arrays[tensor.name], tensor.datatype))
    return bytes(out.SerializeToString())


def _raw(arr: np.ndarray, datatype: str) -> bytes:
    """A tensor's raw contents (row-major, little-endian; BYTES length-prefixed)."""
    if datatype == "BYTES":
        chunks = []
        for item in arr.reshape(-1):
            data = item if isinstance(item, bytes) else str(item).encode("utf-8")
            chunks.append(_LENGTH.pack(len(data)))
            chunks.append(data)
        return b"".join(chunks)
    little = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
    return np.ascontiguousarray(arr, dtype=little).tobytes()


# ---------------------------------------------------------------------------------------------
# JSON views for conditions


def _param_value(p: pb.InferParameter) -> Any:
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which else None


def _params(params: Any) -> dict[str, Any]:
    return {k: _param_value(v) for k, v in params.items()}


def _json_data(arr: np.ndarray) -> list[Any]:
    flat = arr.reshape(-1)
    if flat.dtype == object:
        out = []
        for item in flat:
            if isinstance(item, bytes):
                try:
                    out.append(item.decode("utf-8"))
                except UnicodeDecodeError:
                    out.append(base64.b64encode(item).decode("ascii"))
            else:
                out.append(item)
        return out
    values: list[Any] = flat.tolist()
    return values


def _tensor_view(t: Any, arrays: Lazy) -> dict[str, Any]:
    view: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
    name = t.name
    view["data"] = Lazy(lambda: _json_data(arrays.value()[name]))
    if t.parameters:
        view["parameters"] = _params(t.parameters)
    return view


def request_view(body: bytes) -> dict[str, Any]:
    """The REST (JSON) form of a serialized ModelInferRequest, with lazily decoded data."""
    try:
        req = pb.ModelInferRequest.FromString(body)
    except DecodeError:
        raise InvalidArgument("the request is not a ModelInferRequest") from None
    arrays = Lazy(lambda: decode_inputs(req))
    view: dict[str, Any] = {}
    if req.id:
        view["id"] = req.id
    if req.parameters:
        view["parameters"] = _params(req.parameters)
    view["inputs"] = [_tensor_view(t, arrays) for t in req.inputs]
    if req.outputs:
        view["outputs"] = [{"name": o.name, **({"parameters": _params(o.parameters)} if o.parameters else {})}
                           for o in req.outputs]
    return view


def response_view(body: bytes) -> dict[str, Any]:
    """The REST (JSON) form of a serialized ModelInferResponse, with lazily decoded data."""
    resp = _parse_response(body, "a step")
    arrays = Lazy(lambda: decode_response(resp))
    view: dict[str, Any] = {"model_name": resp.model_name}
    if resp.model_version:
        view["model_version"] = resp.model_version
    if resp.id:
        view["id"] = resp.id
    if resp.parameters:
        view["parameters"] = _params(resp.parameters)
    view["outputs"] = [_tensor_view(t, arrays) for t in resp.outputs]
    return view
