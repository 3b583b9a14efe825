"""JSON (and Triton's binary tensors) <-> V2 protobuf, for the router's REST front end.

Where the conversion happens, and why here: the router turns a REST request into the same
``ModelInferRequest`` bytes a gRPC client sends, and the runtime's protobuf answer back into JSON.
Runtimes (and the external model servers behind them: MLServer, Triton) then see one body format,
the multiplexed frames and the SPI need no second one, and a REST request costs the runtime exactly
what a gRPC request costs. The price is the router's CPU for the conversion, measured with
``python -m loadtest.scenarios.rest_codec`` (BENCHMARKS.md section 12): for a 1 KiB FP32 tensor
in and out, about 33 us of CPU in JSON and 12 us with binary tensors, where a gRPC request costs
the router about 1 us of such work (reading the model name). That is small beside the latency
REST adds in all (same section); converting at the runtime would move that cost, not remove it,
and would make every runtime and model server speak JSON.

Requests (Open Inference Protocol REST, ``POST /v2/models/{m}/infer``):

* ``inputs``: ``name``, ``shape``, ``datatype``, and ``data`` (flat or nested, row-major) or, with
  Triton's binary extension, ``parameters.binary_data_size`` bytes from the binary part that follows
  the JSON (its length is the ``Inference-Header-Content-Length`` header). Inputs become
  ``raw_input_contents``, so the runtime reads them without a copy. The data must agree with the
  shape and the datatype (a float for an INT32, 300 for a UINT8, a string for an FP32 are refused,
  not converted), else INVALID_ARGUMENT naming the input; sizes are checked before anything is
  allocated.
* ``outputs``: names asked for, each with ``parameters.binary_data``; the request's
  ``parameters.binary_data_output`` makes binary the default (``tritonclient.http`` sets it when it
  names no outputs). ``id`` comes back in the response.

Responses: each output as JSON ``data`` (flat, row-major, as KServe and MLServer send it), or in
the binary part. BYTES outputs are UTF-8 strings in JSON; an output with an element that is not
UTF-8 is sent as base64 strings with ``parameters.content_type = "base64"`` (MLServer's
convention), so nothing is lost.

KServe V1 (``POST /v1/models/{m}:predict``): ``instances`` (or ``inputs``) becomes one input with the
model's first input name and datatype from its metadata (the caller looks them up), and the
first output comes back as nested ``predictions``.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import orjson
from google.protobuf.message import DecodeError

from mesh.errors import InvalidArgument, MeshError
from mesh.gen.inference import grpc_service_pb2 as pb
from mesh.tensors import DEFAULT_MAX_ELEMENTS, MAX_BYTES_ELEMENTS, datatype, decode_response

__all__ = ["BINARY_HEADER", "DEFAULT_MAX_ELEMENTS", "JSON_EXPANSION", "Outputs", "dumps", "first_input",
           "infer_request", "infer_response", "loads", "metadata_request", "metadata_response",
           "v1_request", "v1_response"]

BINARY_HEADER = "inference-header-content-length"
_JSON = orjson.OPT_SERIALIZE_NUMPY
# A parsed JSON number costs about 32 bytes (a float object and its list slot) for its 2 or more
# bytes of text: in-flight bounds count a JSON body as this many times its size.
JSON_EXPANSION = 16
_MAX_NAME = 256


@dataclass(frozen=True, slots=True)
class Outputs:
    """How the client wants outputs back: binary by default or not, and per output."""

    binary_default: bool = False
    binary: tuple[tuple[str, bool], ...] = ()

    def is_binary(self, name: str) -> bool:
        for n, b in self.binary:
            if n == name:
                return b
        return self.binary_default


def dumps(value: Any) -> bytes:
    return orjson.dumps(value, option=_JSON)


def loads(text: bytes | memoryview, what: str = "request body") -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise InvalidArgument(f"{what} is not valid JSON: {exc}") from None


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object")
    return value


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"{what}: 'name' must be a non-empty string")
    if len(value) > _MAX_NAME:
        raise InvalidArgument(f"{what}: 'name' is over {_MAX_NAME} characters")
    return value


def _shape(value: Any, what: str, max_elements: int) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        raise InvalidArgument(f"{what}: 'shape' must be a list of integers")
    if len(value) > 64:
        raise InvalidArgument(f"{what}: shape has {len(value)} dimensions, over the limit of 64")
    if any(d < 0 or d > max_elements for d in value) or math.prod(value) > max_elements:
        raise InvalidArgument(f"{what}: shape {value} has a negative dimension or over {max_elements} elements")
    return value


def _parameters(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    return _object(value, f"{what}: 'parameters'")


def _regular(data: Any, what: str, n: int | None) -> tuple[np.ndarray, list[Any], set[type]]:
    """``data`` as an object array (one pointer per element, whatever the elements are) and its
    elements, row-major. Never numpy's own guess at a dtype: a list holding one long string and many
    short ones would become a fixed-width string array, the longest string's size times the number
    of elements (gigabytes from a 80 KB body). Rows of different lengths come out as an array of
    lists, refused here. Returns the array, its elements and their types."""
    try:
        arr = np.array(data, dtype=object)
    except (ValueError, TypeError):
        raise InvalidArgument(f"{what}: 'data' is not a regular array (rows of different lengths?)") from None
    if n is not None and arr.size > n:
        raise InvalidArgument(f"{what}: 'data' holds {arr.size} values, the shape needs {n}")
    flat = arr.ravel().tolist()
    types = set(map(type, flat))
    if list in types or dict in types:
        raise InvalidArgument(f"{what}: 'data' is not a regular array of values (rows of different lengths, "
                              "or objects?)")
    if n is not None and arr.size != n:
        raise InvalidArgument(f"{what}: 'data' holds {arr.size} values, the shape needs {n}")
    return arr, flat, types


_NUMBERS = frozenset({int, float})
_INTEGERS = frozenset({int})
_BOOLS = frozenset({bool})


def _numeric(flat: list[Any], types: set[type], dt_name: str, dtype: np.dtype[Any], what: str) -> bytes:
    """Raw contents of ``dt_name`` from the JSON values ``flat``: the types must be the datatype's
    (JSON numbers for floats, integers for integers, true/false for BOOL; never strings, lists or
    null) and the values within its range."""
    if not flat:
        return b""
    if dt_name == "BOOL":
        if not types <= _BOOLS:
            raise InvalidArgument(f"{what}: BOOL data must be true or false")
        return np.array(flat, dtype=np.bool_).tobytes()
    if dtype.kind in "iu":
        if not types <= _INTEGERS:
            raise InvalidArgument(f"{what}: {dt_name} data must be integers")
        low, high = min(flat), max(flat)
        info = np.iinfo(dtype)
        if low < info.min or high > info.max:
            bad = low if low < info.min else high
            raise InvalidArgument(f"{what}: value {bad} is out of range for {dt_name} [{info.min}, {info.max}]")
        return np.array(flat, dtype=dtype).tobytes()
    if not types <= _NUMBERS:
        raise InvalidArgument(f"{what}: {dt_name} data must be numbers")
    finfo = np.finfo(dtype)
    try:
        with np.errstate(over="ignore"):  # an overflow is refused just below, not warned about
            out = np.array(flat, dtype=dtype)
    except OverflowError:  # an integer past float64's range
        out = np.array([np.inf], dtype=dtype)
    if not np.isfinite(out).all():
        # JSON has no inf or NaN, so a non-finite value is one too large for the datatype.
        raise InvalidArgument(f"{what}: a value is out of range for {dt_name} [{finfo.min:g}, {finfo.max:g}]")
    return out.tobytes()


def _strings(flat: list[Any], what: str) -> bytes:
    parts: list[bytes] = []
    for item in flat:
        if not isinstance(item, str):
            raise InvalidArgument(f"{what}: BYTES data must be strings")
        raw = item.encode("utf-8", "surrogatepass")
        parts.append(len(raw).to_bytes(4, "little"))
        parts.append(raw)
    return b"".join(parts)


def _binary_size(params: dict[str, Any], what: str) -> int | None:
    size = params.get("binary_data_size")
    if size is None:
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidArgument(f"{what}: 'binary_data_size' must be a non-negative integer")
    return size


def _check_binary_size(size: int, dt_name: str, itemsize: int, n: int, what: str) -> None:
    if dt_name == "BYTES":
        if size < 4 * n:
            raise InvalidArgument(f"{what}: {size} binary bytes are too few for {n} BYTES elements")
    elif size != n * itemsize:
        raise InvalidArgument(f"{what}: binary data holds {size} bytes, shape of {dt_name} needs {n * itemsize}")


def infer_request(body: bytes, header_length: int | None, model_name: str, model_version: str = "", *,
                  max_elements: int = DEFAULT_MAX_ELEMENTS) -> tuple[bytes, Outputs]:
    """The ``ModelInferRequest`` bytes for a V2 REST infer body, and how outputs go back."""
    view = memoryview(body)
    if header_length is None:
        doc, binary = loads(view), view[len(view):]
    else:
        if header_length > len(view):
            raise InvalidArgument(f"Inference-Header-Content-Length {header_length} is past the end of the "
                                  f"{len(view)}-byte body")
        doc, binary = loads(view[:header_length], "JSON header"), view[header_length:]
    doc = _object(doc, "request body")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidArgument("request body: 'inputs' must be a non-empty list")
    req = pb.ModelInferRequest(model_name=model_name, model_version=model_version)
    rid = doc.get("id")
    if rid is not None:
        if not isinstance(rid, str) or len(rid) > 1024:
            raise InvalidArgument("request body: 'id' must be a string of at most 1024 characters")
        req.id = rid
    raw: list[bytes] = []
    seen: set[str] = set()
    pos = 0
    total = 0
    bytes_elements = 0
    for i, item in enumerate(inputs):
        item = _object(item, f"input #{i}")
        name = _name(item.get("name"), f"input #{i}")
        what = f"input {name!r}"
        if name in seen:
            raise InvalidArgument(f"{what} appears more than once")
        seen.add(name)
        dt_name = item.get("datatype")
        if not isinstance(dt_name, str):
            raise InvalidArgument(f"{what}: 'datatype' must be a string")
        try:
            dt = datatype(dt_name)
        except InvalidArgument as exc:
            raise InvalidArgument(f"{what}: {exc.message.removeprefix('datatype: ')}") from None
        shape = _shape(item.get("shape"), what, max_elements)
        n = math.prod(shape)
        total += n
        if total > max_elements:
            raise InvalidArgument(f"the request's inputs have {total} elements, over the limit of {max_elements}")
        if dt.name == "BYTES":
            bytes_elements += n
            if bytes_elements > MAX_BYTES_ELEMENTS:
                raise InvalidArgument(f"{what}: the request's BYTES inputs have over {MAX_BYTES_ELEMENTS} elements")
        size = _binary_size(_parameters(item.get("parameters"), what), what)
        if size is not None:
            if "data" in item:
                raise InvalidArgument(f"{what}: has both 'data' and 'binary_data_size'")
            if pos + size > len(binary):
                raise InvalidArgument(f"{what}: binary_data_size {size} runs past the binary data "
                                      f"({len(binary) - pos} bytes left)")
            _check_binary_size(size, dt.name, dt.itemsize, n, what)
            raw.append(bytes(binary[pos:pos + size]))
            pos += size
        elif "data" not in item:
            raise InvalidArgument(f"{what}: no 'data' and no 'binary_data_size'")
        else:
            _, flat, types = _regular(item["data"], what, n)
            raw.append(_strings(flat, what) if dt.name == "BYTES" else _numeric(flat, types, dt.name, dt.dtype, what))
        tensor = req.inputs.add(name=name, datatype=dt.name)
        tensor.shape.extend(shape)
    if pos != len(binary):
        raise InvalidArgument(f"{len(binary) - pos} bytes of binary data are not claimed by any input")
    req.raw_input_contents.extend(raw)
    params = _parameters(doc.get("parameters"), "request body")
    binary_default = params.get("binary_data_output") is True
    per_output: list[tuple[str, bool]] = []
    outputs = doc.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list):
            raise InvalidArgument("request body: 'outputs' must be a list")
        for i, item in enumerate(outputs):
            item = _object(item, f"output #{i}")
            name = _name(item.get("name"), f"output #{i}")
            req.outputs.add(name=name)
            flag = _parameters(item.get("parameters"), f"output {name!r}").get("binary_data")
            if isinstance(flag, bool):
                per_output.append((name, flag))
    data: bytes = req.SerializeToString()
    return data, Outputs(binary_default, tuple(per_output))


_Answer = TypeVar("_Answer", pb.ModelInferResponse, pb.ModelMetadataResponse)


def _answer(kind: type[_Answer], body: bytes) -> _Answer:
    """A runtime's answer parsed as ``kind``; MeshError (INTERNAL: the runtime's fault) if it is not one."""
    try:
        answer: _Answer = kind.FromString(body)
        return answer
    except (DecodeError, RuntimeError, ValueError):
        raise MeshError(f"the runtime's answer is not a valid {kind.DESCRIPTOR.full_name}") from None


def _response(body: bytes) -> pb.ModelInferResponse:
    return _answer(pb.ModelInferResponse, body)


def _json_data(arr: np.ndarray) -> tuple[Any, dict[str, str] | None]:
    """A tensor's ``data`` for JSON (flat), and the parameters it needs (base64 BYTES)."""
    if arr.dtype.kind != "O":
        flat = arr.reshape(-1)
        return (flat if flat.dtype.isnative else flat.astype(flat.dtype.newbyteorder("="))), None
    items = arr.reshape(-1).tolist()
    try:
        return [b.decode("utf-8") for b in items], None
    except UnicodeDecodeError:
        return [base64.b64encode(b).decode("ascii") for b in items], {"content_type": "base64"}


def infer_response(body: bytes, outputs: Outputs) -> tuple[bytes, int | None]:
    """The REST body for a ``ModelInferResponse``, and the JSON part's length when outputs travel
    binary (the value of ``Inference-Header-Content-Length``; None: the body is all JSON)."""
    resp = _response(body)
    arrays = decode_response(resp)
    tensors = []
    binary: list[bytes] = []
    for tensor in resp.outputs:
        arr = arrays[tensor.name]
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(arr.shape)}
        if outputs.is_binary(tensor.name):
            if arr.dtype.kind == "O":
                data = b"".join(len(b).to_bytes(4, "little") + b for b in arr.reshape(-1).tolist())
            else:
                data = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
            binary.append(data)
            entry["parameters"] = {"binary_data_size": len(data)}
        else:
            entry["data"], params = _json_data(arr)
            if params:
                entry["parameters"] = params
        tensors.append(entry)
    doc: dict[str, Any] = {"model_name": resp.model_name, "model_version": resp.model_version}
    if resp.id:
        doc["id"] = resp.id
    doc["outputs"] = tensors
    head = orjson.dumps(doc, option=_JSON)
    if not binary:
        return head, None
    return b"".join((head, *binary)), len(head)


def metadata_request(model_name: str, version: str = "") -> bytes:
    data: bytes = pb.ModelMetadataRequest(name=model_name, version=version).SerializeToString()
    return data


def _tensors_json(tensors: Any) -> list[dict[str, Any]]:
    return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in tensors]


def parse_metadata(body: bytes) -> pb.ModelMetadataResponse:
    return _answer(pb.ModelMetadataResponse, body)


def metadata_response(body: bytes) -> bytes:
    """The REST body of a ``ModelMetadataResponse``."""
    meta = parse_metadata(body)
    return orjson.dumps({"name": meta.name, "versions": list(meta.versions), "platform": meta.platform,
                         "inputs": _tensors_json(meta.inputs), "outputs": _tensors_json(meta.outputs)})


def v1_request(body: bytes, model_name: str, first_input: tuple[str, str] | None, *,
               max_elements: int = DEFAULT_MAX_ELEMENTS) -> bytes:
    """The ``ModelInferRequest`` bytes for a KServe V1 predict body. ``first_input``: the model's
    first input (name, datatype) from its metadata; None: ``input-0``, typed from the JSON."""
    doc = _object(loads(body), "request body")
    key = "instances" if "instances" in doc else "inputs" if "inputs" in doc else None
    if key is None:
        raise InvalidArgument("request body: expected 'instances' (or 'inputs'), a list of rows")
    data = doc[key]
    if not isinstance(data, list) or not data:
        raise InvalidArgument(f"request body: '{key}' must be a non-empty list")
    if isinstance(data[0], dict):
        raise InvalidArgument(f"request body: '{key}' holds objects (named inputs), which V1 here does not take; "
                              "send rows of values, or use the V2 infer endpoint for named inputs")
    what = f"request body: '{key}'"
    arr, flat, types = _regular(data, what, None)
    if arr.size > max_elements:
        raise InvalidArgument(f"{what} has {arr.size} values, over the limit of {max_elements}")
    if types <= _BOOLS:
        guessed = "BOOL"
    elif types <= _INTEGERS:
        guessed = "INT64"
    elif types <= _NUMBERS:
        guessed = "FP64"
    elif types <= {str}:
        guessed = "BYTES"
    else:
        raise InvalidArgument(f"{what} must be a regular array of numbers, booleans or strings")
    name, dt_name = first_input or ("input-0", guessed)
    if dt_name == "BYTES" or guessed == "BYTES":
        dt_name = "BYTES"
        raw = _strings(flat, what)
    else:
        dt = datatype(dt_name)
        raw = _numeric(flat, types, dt.name, dt.dtype, what)
    req = pb.ModelInferRequest(model_name=model_name)
    tensor = req.inputs.add(name=name, datatype=dt_name)
    tensor.shape.extend(arr.shape)
    req.raw_input_contents.append(raw)
    out: bytes = req.SerializeToString()
    return out


def v1_response(body: bytes) -> bytes:
    """``{"predictions": ...}``: the first output, nested by its shape."""
    resp = _response(body)
    arrays = decode_response(resp)
    if not arrays:
        return orjson.dumps({"predictions": []})
    arr = next(iter(arrays.values()))
    if arr.dtype.kind == "O":
        items, _ = _json_data(arr)
        predictions: Any = np.asarray(items, dtype=object).reshape(arr.shape).tolist()
    else:
        predictions = arr
    return orjson.dumps({"predictions": predictions}, option=_JSON)


def first_input(metadata: bytes) -> tuple[str, str] | None:
    """(name, datatype) of a model's first input, from its ``ModelMetadataResponse`` bytes."""
    meta = parse_metadata(metadata)
    if not meta.inputs:
        return None
    return meta.inputs[0].name, meta.inputs[0].datatype
