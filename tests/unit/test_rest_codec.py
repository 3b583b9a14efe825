"""REST bodies <-> V2 protobuf (mesh.rest.codec), and the one mapping of error codes to HTTP."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from mesh.errors import Code, InvalidArgument
from mesh.gen.inference import grpc_service_pb2 as pb
from mesh.rest import codec
from mesh.rest.status import HTTP_STATUS
from mesh.tensors import decode_inputs, encode_response
from mesh.transport.status import GRPC_CODES


def _inputs(body: bytes, header: int | None = None) -> tuple[pb.ModelInferRequest, dict[str, np.ndarray]]:
    raw, _ = codec.infer_request(body, header, "m")
    req = pb.ModelInferRequest.FromString(raw)
    return req, decode_inputs(req)


def test_json_tensors_become_raw_contents_of_their_datatype() -> None:
    doc = {"id": "r1", "inputs": [
        {"name": "a", "shape": [2, 2], "datatype": "FP32", "data": [[1, 2.5], [3, 4]]},
        {"name": "b", "shape": [3], "datatype": "INT8", "data": [-128, 0, 127]},
        {"name": "c", "shape": [2], "datatype": "BOOL", "data": [True, False]},
        {"name": "d", "shape": [2], "datatype": "BYTES", "data": ["héllo", ""]}]}
    req, arrays = _inputs(json.dumps(doc).encode())
    assert (req.model_name, req.id) == ("m", "r1")
    np.testing.assert_array_equal(arrays["a"], np.array([[1, 2.5], [3, 4]], dtype=np.float32))
    assert arrays["a"].dtype == np.float32 and arrays["b"].dtype == np.int8
    assert arrays["c"].tolist() == [True, False]
    assert arrays["d"].tolist() == ["héllo".encode(), b""]


def test_binary_tensors_follow_the_json_header() -> None:
    values = np.arange(6, dtype=np.float32)
    header = json.dumps({"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 24}}],
                         "outputs": [{"name": "y", "parameters": {"binary_data": True}}]}).encode()
    raw, outputs = codec.infer_request(header + values.tobytes(), len(header), "m")
    req = pb.ModelInferRequest.FromString(raw)
    np.testing.assert_array_equal(decode_inputs(req)["x"], values.reshape(2, 3))
    assert [o.name for o in req.outputs] == ["y"] and outputs.is_binary("y")


def _x(datatype: str, data: object, shape: list[int] | None = None) -> dict[str, object]:
    return {"inputs": [{"name": "x", "shape": [1] if shape is None else shape, "datatype": datatype, "data": data}]}


@pytest.mark.parametrize(("doc", "message"), [
    (_x("FP32", [1, 2], [3]),
     "input 'x': 'data' holds 2 values, the shape needs 3"),
    (_x("INT32", [1.5]), "input 'x': INT32 data must be integers"),
    (_x("UINT8", [300]), "value 300 is out of range for UINT8"),
    (_x("FP32", ["1"]), "FP32 data must be numbers"),
    (_x("FP16", [70000]), "input 'x': a value is out of range for FP16"),
    (_x("FP32", [1e300]), "input 'x': a value is out of range for FP32"),
    (_x("FP32", [[1], [2, 3]], [2]), "not a regular array"),
    (_x("BF16", [1]), "input 'x': datatype BF16"),
    (_x("NOPE", [1]), "input 'x': unknown datatype 'NOPE'"),
    (_x("FP32", [], [1 << 40]), "over 50000000 elements"),
    ({"inputs": []}, "'inputs' must be a non-empty list"),
    ([1, 2], "request body must be a JSON object"),
])
def test_bad_json_tensors_are_refused_naming_the_input(doc: object, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message.replace("(", r"\(").replace("[", r"\[")):
        codec.infer_request(json.dumps(doc).encode(), None, "m")


def test_binary_sizes_must_add_up() -> None:
    header = json.dumps({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 8}}]}).encode()
    with pytest.raises(InvalidArgument, match="runs past the binary data"):
        codec.infer_request(header + b"\0" * 4, len(header), "m")
    with pytest.raises(InvalidArgument, match="4 bytes of binary data are not claimed"):
        codec.infer_request(header + b"\0" * 12, len(header), "m")
    with pytest.raises(InvalidArgument, match="past the end"):
        codec.infer_request(header, len(header) + 1, "m")


def _answer(outputs: dict[str, np.ndarray], raw: bool = True) -> bytes:
    return encode_response(model_name="m", model_version="1", request_id="r1", outputs=outputs,
                           raw=raw).SerializeToString()


def test_responses_are_flat_json_or_binary_as_asked() -> None:
    answer = _answer({"p": np.array([[0.25, 0.75]], dtype=np.float64),
                      "label": np.array([b"a", b"\xff"], dtype=object)})
    body, header = codec.infer_response(answer, codec.Outputs())
    assert header is None
    doc = json.loads(body)
    assert doc["id"] == "r1" and doc["outputs"][0] == {"name": "p", "datatype": "FP64", "shape": [1, 2],
                                                       "data": [0.25, 0.75]}
    # Not UTF-8: base64, marked as MLServer marks it.
    label = doc["outputs"][1]
    assert label["parameters"] == {"content_type": "base64"} and label["data"] == ["YQ==", "/w=="]
    body, header = codec.infer_response(answer, codec.Outputs(binary_default=True))
    assert header is not None
    head = json.loads(body[:header])
    sizes = [o["parameters"]["binary_data_size"] for o in head["outputs"]]
    assert sizes == [16, 4 + 1 + 4 + 1]
    np.testing.assert_array_equal(np.frombuffer(body[header:header + 16], "<f8"), [0.25, 0.75])
    assert body[header + 16:] == struct.pack("<I", 1) + b"a" + struct.pack("<I", 1) + b"\xff"


def test_v1_rows_take_the_models_first_input_and_predictions_are_nested() -> None:
    raw = codec.v1_request(b'{"instances": [[1, 2], [3, 4]]}', "m", ("input", "FP32"))
    req = pb.ModelInferRequest.FromString(raw)
    assert [(t.name, t.datatype, list(t.shape)) for t in req.inputs] == [("input", "FP32", [2, 2])]
    assert decode_inputs(req)["input"].dtype == np.float32
    typed = pb.ModelInferRequest.FromString(codec.v1_request(b'{"inputs": [[1.5, 2]]}', "m", None))
    assert (typed.inputs[0].name, typed.inputs[0].datatype) == ("input-0", "FP64")
    assert json.loads(codec.v1_response(_answer({"predict": np.array([[1, 2], [3, 4]])}))) == {
        "predictions": [[1, 2], [3, 4]]}
    with pytest.raises(InvalidArgument, match="'instances' holds objects"):
        codec.v1_request(b'{"instances": [{"a": 1}]}', "m", None)
    with pytest.raises(InvalidArgument, match="expected 'instances'"):
        codec.v1_request(b'{"rows": []}', "m", None)


def test_every_code_maps_to_grpc_and_http_and_client_mistakes_are_4xx() -> None:
    assert set(GRPC_CODES) == set(Code) == set(HTTP_STATUS)
    assert len(set(GRPC_CODES.values())) == len(Code)
    for code in (Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.ALREADY_EXISTS, Code.UNAUTHENTICATED,
                 Code.PERMISSION_DENIED, Code.FAILED_PRECONDITION, Code.OUT_OF_RANGE, Code.RESOURCE_EXHAUSTED):
        assert 400 <= HTTP_STATUS[code] < 500, code
