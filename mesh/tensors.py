"""The KServe V2 (Open Inference Protocol) tensor codec: protobuf tensors <-> numpy arrays.

This sits on the runtime's hot path, so it is written to be strict and cheap:

* **Strict.** Every malformed request is an :class:`~mesh.errors.InvalidArgument` whose message
  names the input and says what is wrong ("input 'x': raw contents hold 12 bytes, shape [2, 3] of
  FP32 needs 24"). Nothing else escapes :func:`decode_inputs` for any byte string that parses as a
  ``ModelInferRequest`` (a property test holds us to that). Sizes are checked *before* anything is
  allocated, so a small request that claims a huge shape costs nothing.
* **Cheap.** Raw contents (``raw_input_contents``, the form V2 clients use for speed) become arrays
  with ``np.frombuffer``: zero-copy views of the request's bytes. Those arrays are **read-only**;
  a model that wants to write into its input must copy it. Typed contents (``contents.fp32_contents``
  and friends) need one conversion from protobuf's repeated fields, which is the price of that form.

Wire rules (OIP spec and Triton's binary-data extension): raw contents, if used, hold one entry per
input in the order of ``inputs``, and then no input may also carry typed contents; each entry is the
row-major tensor with no padding, little-endian; a BYTES element is a 4-byte little-endian length
followed by that many bytes. FP16 can only travel raw (there is no typed field for it). BF16 is
refused: numpy has no bfloat16, so we could not hand it to a model without an invented conversion.

BOOL raw bytes must be 0 or 1: numpy would otherwise hold "booleans" with other bit patterns, whose
behaviour in arithmetic is undefined, and a client that sends them has a bug worth reporting.

Responses go the other way (:func:`encode_response`). A numpy dtype with no V2 datatype (complex,
datetime, ...) is the model's fault, not the caller's, so it raises a plain
:class:`~mesh.errors.MeshError` (INTERNAL). FP16 outputs in a *typed* response are widened to FP32
(there is no typed FP16 field; widening is exact); in a raw response they stay FP16. BYTES outputs
accept ``str`` (sent as UTF-8), ``bytes``, and any other object as ``str(obj)`` in UTF-8, because
scikit-learn hands back labels as an object array of whatever the training labels were.

The client side (:func:`encode_request`, :func:`decode_response`) shares the same tables and checks;
the CLI, the load generator and the tests use it.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError
from numpy.typing import DTypeLike

from mesh.errors import InvalidArgument, MeshError
from mesh.gen.inference import grpc_service_pb2 as pb

DEFAULT_MAX_ELEMENTS = 50_000_000
MAX_DIMS = 64  # numpy's limit (NPY_MAXDIMS): a shape with more dimensions has no array
# BYTES elements per request, over all its BYTES tensors. Each decodes to a Python bytes object
# (33 bytes and up, plus its slot): 4 request bytes for an empty element become about 41, so the
# element count, not the request size, bounds the memory a BYTES request takes (1 Mi: ~45 MB).
MAX_BYTES_ELEMENTS = 1 << 20

# A BYTES element's length prefix: 4 bytes, unsigned, little-endian.
_LENGTH = struct.Struct("<I")
_MAX_BYTES_ELEMENT = 2**32 - 1


@dataclass(frozen=True, slots=True)
class Datatype:
    """One V2 datatype: its numpy dtype and the ``InferTensorContents`` field that carries it."""

    name: str
    dtype: np.dtype[Any]
    # The typed-contents field; None where the datatype can only be sent raw (FP16).
    field: str | None
    # The dtype of that field on the wire when it is wider than the datatype (INT8 travels in
    # int32 ``int_contents``), so that out-of-range values are refused instead of wrapping.
    wire: np.dtype[Any] | None = None

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize


def _dt(name: str, dtype: str, field: str | None, wire: str | None = None) -> Datatype:
    return Datatype(name, np.dtype(dtype), field, np.dtype(wire) if wire else None)


_DATATYPES: dict[str, Datatype] = {
    d.name: d
    for d in (
        _dt("BOOL", "?", "bool_contents"),
        _dt("UINT8", "u1", "uint_contents", "<u4"),
        _dt("UINT16", "<u2", "uint_contents", "<u4"),
        _dt("UINT32", "<u4", "uint_contents"),
        _dt("UINT64", "<u8", "uint64_contents"),
        _dt("INT8", "i1", "int_contents", "<i4"),
        _dt("INT16", "<i2", "int_contents", "<i4"),
        _dt("INT32", "<i4", "int_contents"),
        _dt("INT64", "<i8", "int64_contents"),
        _dt("FP16", "<f2", None),
        _dt("FP32", "<f4", "fp32_contents"),
        _dt("FP64", "<f8", "fp64_contents"),
        _dt("BYTES", "O", "bytes_contents"),
    )
}

DATATYPES: tuple[str, ...] = tuple(_DATATYPES)
"""The V2 datatype names this codec supports, in the order of the spec's table."""

_BY_KIND_SIZE: dict[tuple[str, int], str] = {
    ("b", 1): "BOOL",
    ("u", 1): "UINT8",
    ("u", 2): "UINT16",
    ("u", 4): "UINT32",
    ("u", 8): "UINT64",
    ("i", 1): "INT8",
    ("i", 2): "INT16",
    ("i", 4): "INT32",
    ("i", 8): "INT64",
    ("f", 2): "FP16",
    ("f", 4): "FP32",
    ("f", 8): "FP64",
}


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A model's input or output as ModelMetadata describes it; -1 in ``shape`` is a variable dim."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_pb(self) -> pb.ModelMetadataResponse.TensorMetadata:
        return pb.ModelMetadataResponse.TensorMetadata(
            name=self.name, datatype=self.datatype, shape=list(self.shape)
        )


def datatype(name: str) -> Datatype:
    """The table entry for a V2 datatype name; InvalidArgument for BF16 and unknown names."""
    return _lookup(name, "datatype")


def numpy_dtype(name: str) -> np.dtype[Any]:
    """The numpy dtype a V2 datatype decodes to (``object`` for BYTES)."""
    return _lookup(name, "datatype").dtype


def datatype_for(dtype: DTypeLike) -> str:
    """The V2 datatype of a numpy dtype; MeshError (INTERNAL) when there is none."""
    dt = np.dtype(dtype)
    if dt.kind in "OUS":
        return "BYTES"
    name = _BY_KIND_SIZE.get((dt.kind, dt.itemsize))
    if name is None:
        raise MeshError(f"numpy dtype {dt} has no V2 datatype")
    return name


# ---------------------------------------------------------------------------------------------
# decoding


def decode_inputs(
    req: pb.ModelInferRequest, *, max_elements: int = DEFAULT_MAX_ELEMENTS
) -> dict[str, np.ndarray]:
    """The request's input tensors as numpy arrays, keyed by name, in request order.

    Raw arrays are read-only views of the request's bytes (see the module docstring); BYTES
    tensors are object arrays of ``bytes``. Raises InvalidArgument for any malformed input.
    """
    if not req.inputs:
        raise InvalidArgument("the request has no inputs")
    return _decode_tensors(req.inputs, req.raw_input_contents, "input", max_elements)


def decode_response(
    resp: pb.ModelInferResponse, *, max_elements: int = DEFAULT_MAX_ELEMENTS
) -> dict[str, np.ndarray]:
    """The response's output tensors as numpy arrays (the client side of :func:`encode_response`)."""
    return _decode_tensors(resp.outputs, resp.raw_output_contents, "output", max_elements)


def _decode_tensors(
    tensors: Sequence[Any], raw: Sequence[bytes], side: str, max_elements: int
) -> dict[str, np.ndarray]:
    use_raw = len(raw) > 0
    if use_raw and len(raw) != len(tensors):
        raise InvalidArgument(
            f"raw_{side}_contents has {len(raw)} entries for {len(tensors)} {side}s; "
            f"it needs one per {side}, in the order of the {side}s"
        )
    out: dict[str, np.ndarray] = {}
    bytes_elements = 0
    for i, tensor in enumerate(tensors):
        name = tensor.name
        if not name:
            raise InvalidArgument(f"{side} #{i} has no name")
        what = f"{side} {name[:100]!r}"
        if name in out:
            raise InvalidArgument(f"{what} appears more than once")
        dt = _lookup(tensor.datatype, what)
        shape = _checked_shape(what, tensor.shape, max_elements)
        n = math.prod(shape)
        if dt.name == "BYTES":
            bytes_elements += n
            if bytes_elements > MAX_BYTES_ELEMENTS:
                raise InvalidArgument(f"{what}: the request's BYTES tensors have {bytes_elements} elements or "
                                      f"more, over the limit of {MAX_BYTES_ELEMENTS}")
        if use_raw:
            if tensor.HasField("contents") and tensor.contents.ListFields():
                raise InvalidArgument(
                    f"{what}: has typed contents although raw_{side}_contents is used; "
                    f"the protocol allows one form per request"
                )
            out[name] = _from_raw(what, dt, shape, n, raw[i])
        else:
            out[name] = _from_contents(what, dt, shape, n, tensor.contents, side)
    return out


def _lookup(name: str, what: str) -> Datatype:
    dt = _DATATYPES.get(name)
    if dt is not None:
        return dt
    if name == "BF16":
        raise InvalidArgument(
            f"{what}: datatype BF16 is not supported (numpy has no bfloat16); send FP32 or FP16"
        )
    raise InvalidArgument(f"{what}: unknown datatype {name!r}; supported: {', '.join(DATATYPES)}")


def _checked_shape(what: str, dims: Iterable[int], max_elements: int) -> list[int]:
    shape = list(dims)
    if len(shape) > MAX_DIMS:
        raise InvalidArgument(f"{what}: shape has {len(shape)} dimensions, over the limit of {MAX_DIMS}")
    for d in shape:
        if d < 0:
            raise InvalidArgument(f"{what}: shape {shape} has a negative dimension")
        # Checked per dim too: [0, 2**62] has no elements but no array library accepts it.
        if d > max_elements:
            raise InvalidArgument(
                f"{what}: shape {shape} has a dimension over the limit of {max_elements} elements"
            )
    n = math.prod(shape)
    if n > max_elements:
        raise InvalidArgument(f"{what}: shape {shape} has {n} elements, over the limit of {max_elements}")
    return shape


def _from_raw(what: str, dt: Datatype, shape: list[int], n: int, buf: bytes) -> np.ndarray:
    if dt.name == "BYTES":
        return _parse_bytes(what, shape, n, buf)
    need = n * dt.itemsize
    if len(buf) != need:
        raise InvalidArgument(
            f"{what}: raw contents hold {len(buf)} bytes, shape {shape} of {dt.name} needs {need}"
        )
    if dt.name == "BOOL":
        as_bytes = np.frombuffer(buf, dtype=np.uint8)
        if n and as_bytes.max() > 1:
            raise InvalidArgument(f"{what}: BOOL raw contents must hold bytes 0 or 1")
    # Zero-copy: a read-only view of the request's bytes object.
    return np.frombuffer(buf, dtype=dt.dtype).reshape(shape)


def _parse_bytes(what: str, shape: list[int], n: int, buf: bytes) -> np.ndarray:
    size = len(buf)
    # Every element costs at least its 4-byte prefix: refuse before allocating n object slots.
    if size < 4 * n:
        raise InvalidArgument(
            f"{what}: BYTES raw contents hold {size} bytes, too few for {n} length-prefixed elements"
        )
    out = np.empty(n, dtype=object)
    pos = 0
    for i in range(n):
        if pos + 4 > size:
            raise InvalidArgument(f"{what}: BYTES raw contents end after {i} of {n} elements")
        (length,) = _LENGTH.unpack_from(buf, pos)
        pos += 4
        end = pos + length
        if end > size:
            raise InvalidArgument(
                f"{what}: BYTES element {i} claims {length} bytes but only {size - pos} remain"
            )
        out[i] = buf[pos:end]
        pos = end
    if pos != size:
        raise InvalidArgument(
            f"{what}: BYTES raw contents have {size - pos} trailing bytes after {n} elements"
        )
    return out.reshape(shape)


def _from_contents(
    what: str, dt: Datatype, shape: list[int], n: int, contents: pb.InferTensorContents, side: str
) -> np.ndarray:
    # ListFields lists only the non-empty repeated fields, so this is also "which fields are set".
    fields = contents.ListFields()
    if dt.field is None:
        if fields or n:
            raise InvalidArgument(f"{what}: {dt.name} can only be sent in raw_{side}_contents")
        return np.empty(shape, dtype=dt.dtype)
    if not fields:
        if n == 0:
            return np.empty(shape, dtype=dt.dtype)
        raise InvalidArgument(
            f"{what}: no data; shape {shape} of {dt.name} needs {n} values in contents.{dt.field} "
            f"or raw_{side}_contents"
        )
    if len(fields) > 1 or fields[0][0].name != dt.field:
        got = ", ".join(f.name for f, _ in fields)
        raise InvalidArgument(f"{what}: datatype {dt.name} takes contents.{dt.field}, got {got}")
    values = fields[0][1]
    if len(values) != n:
        raise InvalidArgument(
            f"{what}: contents hold {len(values)} values, shape {shape} of {dt.name} needs {n}"
        )
    if dt.name == "BYTES":
        arr = np.empty(n, dtype=object)
        arr[:] = list(values)
        return arr.reshape(shape)
    if dt.wire is None:
        return np.array(values, dtype=dt.dtype).reshape(shape)
    wide = np.array(values, dtype=dt.wire)
    info = np.iinfo(dt.dtype)
    if n and (wide.min() < info.min or wide.max() > info.max):
        bad = wide[(wide < info.min) | (wide > info.max)][0]
        raise InvalidArgument(
            f"{what}: value {int(bad)} is out of range for {dt.name} [{info.min}, {info.max}]"
        )
    return wide.astype(dt.dtype).reshape(shape)


# ---------------------------------------------------------------------------------------------
# encoding


def encode_response(
    *,
    model_name: str,
    model_version: str,
    request_id: str,
    outputs: Mapping[str, np.ndarray],
    raw: bool,
) -> pb.ModelInferResponse:
    """A ModelInferResponse holding ``outputs`` in order, raw or as typed contents.

    Raises MeshError (INTERNAL) for an output whose dtype has no V2 datatype: a model bug.
    """
    resp = pb.ModelInferResponse(model_name=model_name, model_version=model_version, id=request_id)
    raw_out: list[bytes] | None = [] if raw else None
    for name, arr in outputs.items():
        _encode_tensor(resp.outputs.add(), f"output {name!r}", name, arr, raw_out)
    if raw_out is not None:
        resp.raw_output_contents.extend(raw_out)
    return resp


def encode_request(
    *,
    model_name: str,
    inputs: Mapping[str, np.ndarray],
    raw: bool = True,
    model_version: str = "",
    request_id: str = "",
    outputs: Sequence[str] = (),
) -> pb.ModelInferRequest:
    """A ModelInferRequest for ``inputs`` (the client side of :func:`decode_inputs`).

    ``outputs`` names the requested outputs; empty asks for the model's default outputs.
    Raises InvalidArgument for an array whose dtype has no V2 datatype (here the caller's fault).
    """
    req = pb.ModelInferRequest(model_name=model_name, model_version=model_version, id=request_id)
    raw_in: list[bytes] | None = [] if raw else None
    for name, arr in inputs.items():
        try:
            _encode_tensor(req.inputs.add(), f"input {name!r}", name, arr, raw_in)
        except InvalidArgument:
            raise
        except MeshError as exc:
            raise InvalidArgument(exc.message) from exc
    if raw_in is not None:
        req.raw_input_contents.extend(raw_in)
    for name in outputs:
        req.outputs.add(name=name)
    return req


def _encode_tensor(tensor: Any, what: str, name: str, value: Any, raw_out: list[bytes] | None) -> None:
    arr = np.asarray(value)
    try:
        dt_name = datatype_for(arr.dtype)
    except MeshError:
        raise MeshError(f"{what}: numpy dtype {arr.dtype} has no V2 datatype") from None
    if dt_name == "FP16" and raw_out is None:
        # No typed field carries FP16; widening to FP32 is exact (module docstring).
        arr, dt_name = arr.astype(np.float32), "FP32"
    tensor.name = name
    tensor.datatype = dt_name
    tensor.shape.extend(arr.shape)
    if dt_name == "BYTES":
        items = [_as_bytes(v) for v in arr.ravel().tolist()]
        if raw_out is not None:
            raw_out.append(_pack_bytes(what, items))
        else:
            tensor.contents.bytes_contents.extend(items)
        return
    dt = _DATATYPES[dt_name]
    # astype to the table's little-endian dtype: a no-op on little-endian hosts for native arrays.
    arr = arr.astype(dt.dtype, copy=False)
    if raw_out is not None:
        raw_out.append(arr.tobytes(order="C"))
    else:
        assert dt.field is not None  # only FP16 lacks one, and it was widened above
        getattr(tensor.contents, dt.field).extend(arr.ravel().tolist())


def _as_bytes(v: Any) -> bytes:
    if isinstance(v, bytes):
        return v
    if isinstance(v, str):
        return v.encode("utf-8")
    if isinstance(v, bytearray | memoryview):
        return bytes(v)
    return str(v).encode("utf-8")


def _pack_bytes(what: str, items: list[bytes]) -> bytes:
    parts: list[bytes] = []
    for b in items:
        if len(b) > _MAX_BYTES_ELEMENT:
            raise MeshError(f"{what}: a BYTES element of {len(b)} bytes exceeds the 4 GiB limit")
        parts.append(_LENGTH.pack(len(b)))
        parts.append(b)
    return b"".join(parts)


# ---------------------------------------------------------------------------------------------
# requested outputs


def infer_bytes(model: Any, model_id: str, body: bytes) -> bytes:
    """One inference on a loaded model (``LoadedModel``), bytes to bytes: decode the serialized
    ``ModelInferRequest``, predict the requested outputs, encode the response. The runtime's
    inference threads call it for in-process models, a model worker for its own."""
    try:
        request = pb.ModelInferRequest.FromString(body)
    except (DecodeError, RuntimeError, ValueError):
        raise InvalidArgument("malformed request: not a valid inference.ModelInferRequest message") from None
    outputs = model.predict(decode_inputs(request), [o.name for o in request.outputs])
    response = encode_response(model_name=request.model_name or model_id, model_version="1",
                               request_id=request.id, outputs=outputs, raw=len(request.raw_input_contents) > 0)
    data: bytes = response.SerializeToString()
    return data


def requested_outputs(req: pb.ModelInferRequest) -> list[str]:
    """The names in the request's ``outputs`` field; empty means "the model's default outputs"."""
    return [o.name for o in req.outputs]


def select_outputs(outputs: Mapping[str, np.ndarray], requested: Sequence[str]) -> dict[str, np.ndarray]:
    """The requested outputs in requested order (all of ``outputs`` when nothing is requested).

    Raises InvalidArgument naming the unknown output and listing the model's outputs.
    """
    if not requested:
        return dict(outputs)
    selected: dict[str, np.ndarray] = {}
    for name in requested:
        if name not in outputs:
            raise InvalidArgument(f"unknown output {name!r}; the model's outputs are {sorted(outputs)}")
        selected[name] = outputs[name]
    return selected
