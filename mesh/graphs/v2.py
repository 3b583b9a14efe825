"""The V2 messages a graph passes between its steps, handled as bytes wherever possible.

The executor's cost target is "two steps cost the two models plus 1 ms", so requests and responses
stay serialized protobuf and are spliced by top-level field from zero-copy slices
(``memoryview``), never decoded down to the tensors: each step's request is one ``join`` (one
copy of the tensors per step), and so is the graph's answer.

- **A step's request from the node's input** (``$request``): the input's fields but
  ``model_name``, ``model_version`` and the requested outputs, plus the step's ``model_name``.
- **A step's request from a response** (``$response``): ``ModelInferResponse`` and
  ``ModelInferRequest`` share their field numbers and tensor layouts (name 1, datatype 2, shape 3,
  parameters 4, contents 5; ``outputs`` and ``inputs`` are both field 5) except the raw contents:
  ``raw_output_contents`` is field 6 and ``raw_input_contents`` field 7 (6 is the requested
  outputs). So each output becomes the input of the same name, datatype, shape, parameters and
  contents (typed or raw: ``raw_output_contents[i]`` becomes ``raw_input_contents[i]``) by copying
  its field as it is; the response's ``model_name``, ``model_version``, ``id`` and ``parameters``
  are dropped and the node input's ``id`` and ``parameters`` put in their place (a response's
  parameters describe the response, not the next request).
- **Requested outputs** (the client's ``outputs``) name outputs of the graph's answer, not of
  every step: steps get requests without them (each model answers all its outputs) and the graph's
  final response is cut to them (INVALID_ARGUMENT naming one that is not there). The answer's
  ``model_name`` is the graph's ID, its ``model_version`` empty.
- **Ensemble results**: the outputs of every step, renamed ``<step>.<output>`` (the tensor's name
  field replaced, the rest spliced); if some steps answered raw contents and others typed, the typed
  ones are decoded and converted to raw (a response has one form): the only decode of tensors here.
  The merged answer carries the node input's ``id`` and no parameters.
- **JSON views** for conditions (:func:`request_view`, :func:`response_view`) are the REST
  form of the message (``id`` and ``parameters`` only when set; tensors with ``name``,
  ``datatype``, ``shape``, flat row-major ``data`` and ``parameters`` when set; BYTES elements as
  UTF-8 text, or base64 when they are not UTF-8, as the REST front end sends them). A tensor's
  ``data`` is decoded, and the raw contents copied, only if a condition reaches it, and only for a
  tensor of at most 1 Mi elements (INVALID_ARGUMENT beyond: a JSON list costs ~32 bytes an
  element). The request's
  view has no ``model_name`` nor ``outputs`` (the graph's, not the node's).
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
from mesh.transport.wire import read_varint

__all__ = ["Request", "finish", "merge", "request_view", "response_view"]

# Top-level field numbers (V2 protocol); every one of them is length-delimited (wire type 2).
_MODEL_NAME, _MODEL_VERSION, _ID, _PARAMETERS, _TENSORS = 1, 2, 3, 4, 5
_REQUESTED_OUTPUTS, _RAW_REQUEST = 6, 7
_RAW_RESPONSE = 6
_RAW_REQUEST_TAG = bytes([(_RAW_REQUEST << 3) | 2])
_RAW_RESPONSE_TAG = bytes([(_RAW_RESPONSE << 3) | 2])
_TENSORS_TAG = bytes([(_TENSORS << 3) | 2])
_EMPTY_VERSION = bytes([(_MODEL_VERSION << 3) | 2, 0])
_LENGTH = struct.Struct("<I")
MAX_VIEW_ELEMENTS = 1 << 20


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


Buffer = bytes | memoryview


def _fields(buf: Buffer, what: str) -> list[tuple[int, int, int, int]]:
    """Top-level fields of a serialized message: (field, start of the tag, start of the value, end).

    A field that is not length-delimited is reported with its number negated: every field this
    module acts on by number is length-delimited, and protobuf parses a known field number with
    another wire type as an unknown field, so it is kept as one (passed on as it is) rather than
    taken for, say, an empty raw_input_contents."""
    out = []
    pos, end = 0, len(buf)
    while pos < end:
        start = pos
        tag = buf[pos]
        if tag < 0x80:      # one-byte tags: every field of the V2 messages
            pos += 1
        else:
            tag, pos = read_varint(buf, pos, what)
        field, wire = tag >> 3, tag & 7
        if field == 0:
            raise InvalidArgument(f"{what} is malformed: field number 0")
        if wire == 2:
            if pos < end and buf[pos] < 0x80:
                length, value = buf[pos], pos + 1
            else:
                length, value = read_varint(buf, pos, what)
            pos = value + length
        elif wire == 0:
            _, pos = read_varint(buf, pos, what)
            value = pos
        elif wire == 1:
            value, pos = pos, pos + 8
        elif wire == 5:
            value, pos = pos, pos + 4
        else:
            raise InvalidArgument(f"{what} is malformed: wire type {wire}")
        if pos > end:
            raise InvalidArgument(f"{what} is malformed: a field runs past the end")
        out.append((field if wire == 2 else -field, start, value, pos))
    return out


def _kept(buf: Buffer, fields: Sequence[tuple[int, int, int, int]], drop: tuple[int, ...]) -> list[Buffer]:
    """Zero-copy slices of ``buf`` holding its fields but those numbered in ``drop``; contiguous
    fields share one slice."""
    view = memoryview(buf)
    out: list[Buffer] = []
    run_start = run_end = -1
    for f, s, _, e in fields:
        if f in drop:
            continue
        if s == run_end:
            run_end = e
            continue
        if run_start >= 0:
            out.append(view[run_start:run_end])
        run_start, run_end = s, e
    if run_start >= 0:
        out.append(view[run_start:run_end])
    return out


def _name_fields(model: str) -> bytes:
    return _string_field(_MODEL_NAME, model) + _EMPTY_VERSION


@dataclass(frozen=True, slots=True)
class Request:
    """A node's input, as zero-copy pieces of the bytes it came from: its fields but the model's
    name and version, the requested outputs and the raw contents (``parts``: small), the raw
    contents (``raw``: views), and its ``id`` and ``parameters`` fields as serialized (``head``),
    which requests made from responses keep. Each step's request is one join of the pieces and the
    step's model name: one copy of the tensors per step."""

    parts: tuple[Buffer, ...]
    raw: tuple[Buffer, ...]
    head: bytes
    id: str

    @property
    def size(self) -> int:
        """About the bytes of a step's request made by :meth:`to` (its tags and model name aside)."""
        return sum(len(p) for p in self.parts) + sum(len(r) + 6 for r in self.raw)

    def to(self, model: str) -> bytes:
        """The request for one step: these fields addressed to ``model``."""
        pieces: list[Buffer] = [*self.parts]
        for r in self.raw:
            pieces.append(_RAW_REQUEST_TAG + _varint(len(r)))
            pieces.append(r)
        pieces.append(_name_fields(model))
        return b"".join(pieces)

    @classmethod
    def from_client(cls, body: bytes) -> tuple[Request, list[str]]:
        """The client's request, and the output names it asks for (none: all)."""
        fields = _fields(body, "the request")
        head = b"".join(body[s:e] for f, s, _, e in fields if f in (_ID, _PARAMETERS))
        id_ = _last_string(body, fields, _ID)
        requested = []
        for f, _, v, e in fields:
            if f == _REQUESTED_OUTPUTS:
                try:
                    requested.append(pb.ModelInferRequest.InferRequestedOutputTensor.FromString(body[v:e]).name)
                except DecodeError:
                    raise InvalidArgument("the request is malformed: a requested output does not parse") from None
        view = memoryview(body)
        parts = _kept(view, fields, (_MODEL_NAME, _MODEL_VERSION, _REQUESTED_OUTPUTS, _RAW_REQUEST))
        raw = tuple(view[v:e] for f, _, v, e in fields if f == _RAW_REQUEST)
        return cls(tuple(parts), raw, head, id_), requested

    @classmethod
    def from_response(cls, response: bytes, input_: Request) -> Request:
        """A request whose inputs are ``response``'s outputs (see the module docstring), with the
        ``id`` and ``parameters`` of ``input_``. Raises InvalidArgument if the bytes do not parse."""
        view = memoryview(response)
        fields = _fields(view, "the response")
        parts: list[Buffer] = [input_.head, *_kept(view, [f for f in fields if f[0] == _TENSORS], ())]
        raw = tuple(view[v:e] for f, _, v, e in fields if f == _RAW_RESPONSE)
        return cls(tuple(parts), raw, input_.head, input_.id)


def _last_string(buf: Buffer, fields: Sequence[tuple[int, int, int, int]], field: int) -> str:
    value = ""
    for f, _, v, e in fields:
        if f == field:
            try:
                value = bytes(buf[v:e]).decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidArgument("the request's id is not valid UTF-8") from None
    return value


def finish(response: bytes, graph_id: str, requested: Sequence[str]) -> bytes:
    """The graph's answer: the last response, named after the graph, cut to the requested outputs."""
    fields = _fields(response, "the graph's last answer")
    if not requested:
        return b"".join((*_kept(response, fields, (_MODEL_NAME, _MODEL_VERSION)), _name_fields(graph_id)))
    tensors = [(_tensor_name(response, v, e), s, e) for f, s, v, e in fields if f == _TENSORS]
    raws = [(s, e) for f, s, _, e in fields if f == _RAW_RESPONSE]
    first: dict[str, int] = {}
    for i, (name, _, _) in enumerate(tensors):
        first.setdefault(name, i)
    missing = [n for n in requested if n not in first]
    if missing:
        raise InvalidArgument(f"graph {graph_id!r} has no output {missing[0]!r}; its outputs: "
                              f"{', '.join(map(repr, first)) or 'none'}")
    if raws and len(raws) != len(tensors):
        raise MeshError(f"the graph's last answer has {len(raws)} raw contents for {len(tensors)} outputs")
    view = memoryview(response)
    parts: list[Buffer] = [_name_fields(graph_id)]
    parts.extend(view[s:e] for f, s, _, e in fields if f in (_ID, _PARAMETERS))
    wanted = [first[n] for n in dict.fromkeys(requested)]
    parts.extend(view[tensors[i][1]:tensors[i][2]] for i in wanted)
    if raws:
        parts.extend(view[raws[i][0]:raws[i][1]] for i in wanted)
    return b"".join(parts)


def _tensor_name(buf: Buffer, start: int, end: int) -> str:
    """The name (field 1) of the tensor serialized at buf[start:end]."""
    sub = memoryview(buf)[start:end]
    return _last_string(sub, _fields(sub, "an output tensor"), 1)


def _parse_response(body: bytes, what: str) -> pb.ModelInferResponse:
    try:
        resp: pb.ModelInferResponse = pb.ModelInferResponse.FromString(body)
        return resp
    except DecodeError:
        raise MeshError(f"{what} answered bytes that are not a ModelInferResponse") from None


def merge(parts: Sequence[tuple[str, bytes]], id_: str) -> bytes:
    """One response with every part's outputs renamed ``<step>.<output>``, in order (spliced:
    only a typed answer among raw ones is decoded, to convert it)."""
    answers = []
    for name, body in parts:
        fields = _fields(body, f"the answer of step {name!r}")
        tensors = [(v, e) for f, _, v, e in fields if f == _TENSORS]
        raws = [(v, e) for f, _, v, e in fields if f == _RAW_RESPONSE]
        if raws and len(raws) != len(tensors):
            raise MeshError(f"step {name!r} answered {len(raws)} raw contents for {len(tensors)} outputs")
        answers.append((name, body, tensors, raws))
    any_raw = any(raws for _, _, _, raws in answers)
    out: list[Buffer] = [_string_field(_ID, id_)] if id_ else []
    raw_out: list[Buffer] = []
    for name, body, tensors, raws in answers:
        view = memoryview(body)
        if any_raw and tensors and not raws:
            for tensor, raw in _typed_as_raw(name, body):
                out.extend(_renamed(name, memoryview(tensor)))
                raw_out.extend((_RAW_RESPONSE_TAG + _varint(len(raw)), raw))
            continue
        for v, e in tensors:
            out.extend(_renamed(name, view[v:e]))
        for v, e in raws:
            raw_out.extend((_RAW_RESPONSE_TAG + _varint(e - v), view[v:e]))
    return b"".join(out + raw_out)


def _renamed(prefix: str, tensor: memoryview) -> list[Buffer]:
    """An output field (tag, length, tensor) for ``tensor`` renamed ``<prefix>.<its name>``."""
    fields = _fields(tensor, "an output tensor")
    name = _string_field(1, f"{prefix}.{_last_string(tensor, fields, 1)}")
    kept = _kept(tensor, fields, (1,))
    size = len(name) + sum(len(k) for k in kept)
    return [_TENSORS_TAG + _varint(size), name, *kept]


def _typed_as_raw(name: str, body: bytes) -> list[tuple[bytes, bytes]]:
    """Each output of a typed answer as (tensor without contents, raw contents)."""
    resp = _parse_response(body, f"step {name!r}")
    try:
        arrays = decode_response(resp)
    except MeshError as e:
        raise MeshError(f"step {name!r} answered outputs that do not decode: {e.message}") from None
    out = []
    for tensor in resp.outputs:
        raw = _raw(arrays[tensor.name], tensor.datatype)
        tensor.ClearField("contents")
        out.append((bytes(tensor.SerializeToString()), raw))
    return out


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


def _json_data(arr: np.ndarray, what: str) -> list[Any]:
    flat = arr.reshape(-1)
    if flat.size > MAX_VIEW_ELEMENTS:
        # A Python list costs ~32 bytes an element: a condition may not turn a large tensor into one.
        raise InvalidArgument(f"a condition reads the data of {what}, {flat.size} elements; conditions read "
                              f"tensors of at most {MAX_VIEW_ELEMENTS} elements")
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
    view["data"] = Lazy(lambda: _json_data(arrays.value()[name], f"tensor {name[:100]!r}"))
    if t.parameters:
        view["parameters"] = _params(t.parameters)
    return view


def request_view(request: Request) -> dict[str, Any]:
    """The REST (JSON) form of a node's input request, with lazily decoded data (the raw contents
    are not even copied unless a condition reaches a tensor's data)."""
    raw = request.raw
    try:
        req = pb.ModelInferRequest.FromString(b"".join(request.parts))
    except DecodeError:
        raise InvalidArgument("the request is not a ModelInferRequest") from None

    def arrays() -> dict[str, np.ndarray]:
        req.raw_input_contents.extend(bytes(r) for r in raw)
        return decode_inputs(req)

    lazy = Lazy(arrays)
    view: dict[str, Any] = {}
    if req.id:
        view["id"] = req.id
    if req.parameters:
        view["parameters"] = _params(req.parameters)
    view["inputs"] = [_tensor_view(t, lazy) for t in req.inputs]
    return view


def response_view(body: bytes) -> dict[str, Any]:
    """The REST (JSON) form of a serialized ModelInferResponse, with lazily decoded data."""
    buf = memoryview(body)
    fields = _fields(buf, "the response")
    raw = [buf[v:e] for f, _, v, e in fields if f == _RAW_RESPONSE]
    resp = _parse_response(b"".join(_kept(buf, fields, (_RAW_RESPONSE,))), "a step")

    def arrays() -> dict[str, np.ndarray]:
        resp.raw_output_contents.extend(bytes(r) for r in raw)
        return decode_response(resp)

    lazy = Lazy(arrays)
    view: dict[str, Any] = {"model_name": resp.model_name}
    if resp.model_version:
        view["model_version"] = resp.model_version
    if resp.id:
        view["id"] = resp.id
    if resp.parameters:
        view["parameters"] = _params(resp.parameters)
    view["outputs"] = [_tensor_view(t, lazy) for t in resp.outputs]
    return view
