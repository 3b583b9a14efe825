"""The V2 tensor codec: round trips for every datatype, every malformed request, and fuzzing."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mesh.errors import Code, InvalidArgument, MeshError
from mesh.gen.inference import grpc_service_pb2 as pb
from mesh.tensors import (
    DATATYPES,
    TensorSpec,
    datatype,
    datatype_for,
    decode_inputs,
    decode_response,
    encode_request,
    encode_response,
    numpy_dtype,
    requested_outputs,
    select_outputs,
)

NUMERIC = [d for d in DATATYPES if d != "BYTES"]


def _values(name: str) -> np.ndarray:
    """A 2x3 array of ``name`` holding its extremes, so that no conversion can hide a wrap."""
    dt = numpy_dtype(name)
    if name == "BYTES":
        return np.array([[b"", b"a", "é".encode()], [b"\x00\xff", b"x" * 300, b"z"]], dtype=object)
    if name == "BOOL":
        return np.array([[True, False, True], [False, False, True]])
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return np.array([[info.min, info.max, 0], [1, info.max - 1, info.min + 1]], dtype=dt)
    info_f = np.finfo(dt)
    return np.array([[info_f.min, info_f.max, 0.0], [-1.5, np.inf, info_f.tiny]], dtype=dt)


def _wire(req: pb.ModelInferRequest) -> pb.ModelInferRequest:
    """The request as the runtime receives it: serialized and parsed again."""
    return pb.ModelInferRequest.FromString(req.SerializeToString())


def _req(*tensors: tuple[str, str, list[int]], raw: list[bytes] | None = None) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="m")
    for name, dt, shape in tensors:
        req.inputs.add(name=name, datatype=dt, shape=shape)
    if raw is not None:
        req.raw_input_contents.extend(raw)
    return req


def _bad(req: pb.ModelInferRequest, *fragments: str, **kwargs: int) -> str:
    with pytest.raises(InvalidArgument) as info:
        decode_inputs(_wire(req), **kwargs)
    message = info.value.message
    for fragment in fragments:
        assert fragment in message, message
    return message


# --- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
@pytest.mark.parametrize("name", DATATYPES)
def test_request_round_trip_every_datatype(name: str, raw: bool) -> None:
    if name == "FP16" and not raw:
        pytest.skip("FP16 has no typed field; see test_fp16_typed_is_widened")
    arr = _values(name)
    req = _wire(encode_request(model_name="m", inputs={"x": arr}, raw=raw))
    assert req.inputs[0].datatype == name
    assert list(req.inputs[0].shape) == [2, 3]
    assert len(req.raw_input_contents) == (1 if raw else 0)
    out = decode_inputs(req)["x"]
    assert out.dtype == arr.dtype
    assert out.shape == arr.shape
    assert out.tolist() == arr.tolist()


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
@pytest.mark.parametrize("name", DATATYPES)
def test_response_round_trip_every_datatype(name: str, raw: bool) -> None:
    arr = _values(name)
    resp = encode_response(model_name="m", model_version="1", request_id="r", outputs={"y": arr}, raw=raw)
    resp = pb.ModelInferResponse.FromString(resp.SerializeToString())
    assert (resp.model_name, resp.model_version, resp.id) == ("m", "1", "r")
    out = decode_response(resp)["y"]
    if name == "FP16" and not raw:
        assert resp.outputs[0].datatype == "FP32"
        np.testing.assert_array_equal(out, arr.astype(np.float32))
    else:
        assert resp.outputs[0].datatype == name
        assert out.dtype == arr.dtype
        assert out.tolist() == arr.tolist()


def test_fp16_typed_is_widened() -> None:
    arr = np.array([1.5, -2.0], dtype=np.float16)
    req = _wire(encode_request(model_name="m", inputs={"h": arr}, raw=False))
    assert req.inputs[0].datatype == "FP32"
    np.testing.assert_array_equal(decode_inputs(req)["h"], arr.astype(np.float32))


@pytest.mark.parametrize("shape", [[], [0], [0, 3], [3, 0, 2], [1, 1, 1, 1], [5]])
@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
def test_shapes_including_scalars_and_empty(shape: list[int], raw: bool) -> None:
    arr = np.arange(int(np.prod(shape)), dtype=np.int32).reshape(shape)
    words = np.array([str(i) for i in range(arr.size)], dtype=object).reshape(shape)
    req = _wire(encode_request(model_name="m", inputs={"n": arr, "w": words}, raw=raw))
    got = decode_inputs(req)
    assert got["n"].shape == tuple(shape) and got["n"].tolist() == arr.tolist()
    assert got["w"].shape == tuple(shape)
    assert [v.decode() for v in got["w"].ravel()] == list(words.ravel())


def test_raw_decode_is_zero_copy_and_read_only() -> None:
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    out = decode_inputs(_wire(encode_request(model_name="m", inputs={"x": arr})))["x"]
    assert not out.flags.writeable
    assert not out.flags.owndata
    assert isinstance(out.base, bytes | memoryview) or isinstance(out.base.base, bytes)


def test_inputs_keep_request_order() -> None:
    inputs = {"b": np.zeros(1, np.int8), "a": np.zeros(1, np.int8), "c": np.zeros(1, np.int8)}
    assert list(decode_inputs(_wire(encode_request(model_name="m", inputs=inputs)))) == ["b", "a", "c"]


def test_typed_contents_use_the_spec_fields() -> None:
    req = encode_request(
        model_name="m",
        inputs={
            "i8": np.array([-1], np.int8),
            "u16": np.array([7], np.uint16),
            "i64": np.array([1], np.int64),
            "u64": np.array([2**64 - 1], np.uint64),
            "b": np.array([True]),
            "f": np.array([0.5], np.float32),
            "d": np.array([0.25]),
            "s": np.array(["x"]),
        },
        raw=False,
    )
    fields = {t.name: [f.name for f, _ in t.contents.ListFields()] for t in req.inputs}
    assert fields == {
        "i8": ["int_contents"],
        "u16": ["uint_contents"],
        "i64": ["int64_contents"],
        "u64": ["uint64_contents"],
        "b": ["bool_contents"],
        "f": ["fp32_contents"],
        "d": ["fp64_contents"],
        "s": ["bytes_contents"],
    }


def test_bytes_raw_wire_format_is_length_prefixed_little_endian() -> None:
    req = encode_request(model_name="m", inputs={"s": np.array(["ab", "", "é"])})
    assert req.raw_input_contents[0] == b"\x02\x00\x00\x00ab" + b"\x00" * 4 + b"\x02\x00\x00\x00\xc3\xa9"


def test_numeric_raw_is_little_endian_even_for_big_endian_arrays() -> None:
    arr = np.array([1, 256], dtype=">i4")
    req = encode_request(model_name="m", inputs={"x": arr})
    assert req.raw_input_contents[0] == struct.pack("<2i", 1, 256)
    assert decode_inputs(_wire(req))["x"].tolist() == [1, 256]


def test_encode_bytes_outputs_from_str_bytes_and_other_objects() -> None:
    out = np.array(["héllo", b"raw", 7, None], dtype=object)
    for raw in (True, False):
        resp = encode_response(model_name="m", model_version="", request_id="", outputs={"o": out}, raw=raw)
        assert decode_response(resp)["o"].tolist() == ["héllo".encode(), b"raw", b"7", b"None"]
    fixed = np.array([b"ab", b"c"], dtype="S2")
    resp = encode_response(model_name="m", model_version="", request_id="", outputs={"o": fixed}, raw=True)
    assert decode_response(resp)["o"].tolist() == [b"ab", b"c"]


def test_raw_response_has_one_entry_per_output_in_order() -> None:
    outputs = {"z": np.array([1.0]), "a": np.array([1, 2], np.int64)}
    resp = encode_response(model_name="m", model_version="", request_id="", outputs=outputs, raw=True)
    assert [o.name for o in resp.outputs] == ["z", "a"]
    assert [len(b) for b in resp.raw_output_contents] == [8, 16]
    assert not any(o.HasField("contents") for o in resp.outputs)


def test_unsupported_output_dtype_is_internal_not_invalid_argument() -> None:
    with pytest.raises(MeshError) as info:
        encode_response(
            model_name="m", model_version="", request_id="", outputs={"c": np.array([1j])}, raw=True
        )
    assert not isinstance(info.value, InvalidArgument)
    assert info.value.code is Code.INTERNAL
    assert "output 'c'" in info.value.message and "complex128" in info.value.message


def test_unsupported_input_dtype_in_a_client_request_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match="input 'c'"):
        encode_request(model_name="m", inputs={"c": np.array([1j])})


def test_datatype_table() -> None:
    assert datatype_for(np.bool_) == "BOOL"
    assert datatype_for(np.int64) == "INT64"
    assert datatype_for(np.float32) == "FP32"
    assert datatype_for(np.dtype("U3")) == "BYTES"
    assert datatype_for(np.dtype(">f8")) == "FP64"
    assert datatype("INT8").field == "int_contents"
    assert datatype("UINT32").field == "uint_contents"
    assert datatype("FP16").field is None
    with pytest.raises(MeshError):
        datatype_for(np.complex64)
    with pytest.raises(InvalidArgument, match="BF16"):
        numpy_dtype("BF16")


def test_tensor_spec_to_pb() -> None:
    meta = TensorSpec("input", "FP32", (-1, 4)).to_pb()
    assert (meta.name, meta.datatype, list(meta.shape)) == ("input", "FP32", [-1, 4])


def test_select_outputs() -> None:
    outputs = {"a": np.zeros(1), "b": np.ones(1)}
    assert list(select_outputs(outputs, [])) == ["a", "b"]
    assert list(select_outputs(outputs, ["b", "a"])) == ["b", "a"]
    with pytest.raises(InvalidArgument) as info:
        select_outputs(outputs, ["a", "nope"])
    assert "'nope'" in info.value.message and "['a', 'b']" in info.value.message


def test_requested_outputs() -> None:
    req = encode_request(model_name="m", inputs={"x": np.zeros(1)}, outputs=["p", "q"])
    assert requested_outputs(req) == ["p", "q"]


# --- malformed requests -----------------------------------------------------------------------


def test_no_inputs() -> None:
    _bad(pb.ModelInferRequest(model_name="m"), "no inputs")


def test_input_without_name() -> None:
    _bad(_req(("x", "FP32", [0]), ("", "FP32", [0])), "input #1 has no name")


def test_duplicate_input_name() -> None:
    _bad(_req(("x", "FP32", [0]), ("x", "FP32", [0])), "input 'x'", "more than once")


def test_unknown_datatype() -> None:
    _bad(_req(("x", "FP8", [1])), "input 'x'", "unknown datatype 'FP8'", "FP32")


def test_lowercase_datatype_is_unknown() -> None:
    _bad(_req(("x", "fp32", [1])), "input 'x'", "unknown datatype 'fp32'")


def test_bf16_is_refused_clearly() -> None:
    _bad(_req(("x", "BF16", [1]), raw=[b"\x00\x00"]), "input 'x'", "BF16", "bfloat16")


def test_negative_dimension() -> None:
    _bad(_req(("x", "FP32", [2, -1])), "input 'x'", "negative")


def test_too_many_elements() -> None:
    _bad(_req(("x", "FP32", [1000, 1000])), "input 'x'", "1000000 elements", max_elements=999_999)


def test_huge_dimension_with_zero_elements() -> None:
    _bad(_req(("x", "FP32", [0, 2**62])), "input 'x'", "dimension over the limit")


def test_raw_count_differs_from_input_count() -> None:
    req = _req(("x", "INT8", [1]), ("y", "INT8", [1]), raw=[b"\x01"])
    _bad(req, "raw_input_contents has 1 entries for 2")


def test_raw_and_typed_contents_together() -> None:
    req = _req(("x", "INT32", [1]), ("y", "INT32", [1]), raw=[b"\x00" * 4, b"\x00" * 4])
    req.inputs[1].contents.int_contents.append(3)
    _bad(req, "input 'y'", "typed contents", "raw_input_contents")


def test_raw_size_mismatch_message() -> None:
    message = _bad(_req(("x", "FP32", [2, 3]), raw=[b"\x00" * 12]))
    assert message == "input 'x': raw contents hold 12 bytes, shape [2, 3] of FP32 needs 24"


def test_raw_too_long() -> None:
    _bad(_req(("x", "INT64", [1]), raw=[b"\x00" * 9]), "input 'x'", "9 bytes", "needs 8")


def test_raw_bool_must_be_zero_or_one() -> None:
    _bad(_req(("x", "BOOL", [2]), raw=[b"\x01\x02"]), "input 'x'", "0 or 1")


def test_raw_bytes_truncated_prefix() -> None:
    _bad(_req(("s", "BYTES", [2]), raw=[b"\x03\x00\x00\x00abc\x01\x00"]), "input 's'", "end after 1 of 2")


def test_raw_bytes_length_beyond_buffer() -> None:
    _bad(_req(("s", "BYTES", [1]), raw=[b"\x05\x00\x00\x00abc"]), "input 's'", "claims 5 bytes", "3 remain")


def test_raw_bytes_trailing_garbage() -> None:
    _bad(_req(("s", "BYTES", [1]), raw=[b"\x01\x00\x00\x00ab"]), "input 's'", "1 trailing bytes")


def test_raw_bytes_too_short_for_the_element_count() -> None:
    _bad(_req(("s", "BYTES", [1000]), raw=[b"\x00" * 8]), "input 's'", "too few for 1000")


def test_raw_bytes_enormous_length_prefix() -> None:
    _bad(_req(("s", "BYTES", [1]), raw=[b"\xff\xff\xff\xff"]), "input 's'", "claims 4294967295 bytes")


def test_typed_count_mismatch() -> None:
    req = _req(("x", "FP32", [2, 3]))
    req.inputs[0].contents.fp32_contents.extend([1.0] * 5)
    _bad(req, "input 'x'", "contents hold 5 values", "needs 6")


def test_typed_wrong_field_for_datatype() -> None:
    req = _req(("x", "INT64", [1]))
    req.inputs[0].contents.int_contents.append(1)
    _bad(req, "input 'x'", "INT64 takes contents.int64_contents", "got int_contents")


def test_typed_several_fields() -> None:
    req = _req(("x", "FP32", [1]))
    req.inputs[0].contents.fp32_contents.append(1.0)
    req.inputs[0].contents.fp64_contents.append(1.0)
    _bad(req, "input 'x'", "fp32_contents", "fp64_contents")


def test_typed_fp16_is_refused() -> None:
    req = _req(("h", "FP16", [1]))
    req.inputs[0].contents.fp32_contents.append(1.0)
    _bad(req, "input 'h'", "FP16 can only be sent in raw_input_contents")


def test_no_data_for_a_non_empty_shape() -> None:
    _bad(_req(("x", "FP32", [3])), "input 'x'", "no data", "3 values")


@pytest.mark.parametrize(
    ("dt", "field", "value"),
    [
        ("INT8", "int_contents", 128),
        ("INT16", "int_contents", -40000),
        ("UINT8", "uint_contents", 256),
        ("UINT16", "uint_contents", 70000),
    ],
)
def test_typed_values_out_of_range(dt: str, field: str, value: int) -> None:
    req = _req(("x", dt, [2]))
    getattr(req.inputs[0].contents, field).extend([0, value])
    _bad(req, "input 'x'", f"value {value} is out of range for {dt}")


def test_response_decoding_is_just_as_strict() -> None:
    resp = pb.ModelInferResponse()
    resp.outputs.add(name="y", datatype="FP64", shape=[2])
    resp.raw_output_contents.append(b"\x00" * 8)
    with pytest.raises(InvalidArgument, match="output 'y': raw contents hold 8 bytes"):
        decode_response(resp)


# --- fuzzing ----------------------------------------------------------------------------------

_MAX = 10_000  # keeps allocations small however the fuzzer sets shapes


def _decode_or_invalid(req: pb.ModelInferRequest) -> None:
    try:
        out = decode_inputs(req, max_elements=_MAX)
    except InvalidArgument as exc:
        assert exc.message
        return
    assert list(out) == [t.name for t in req.inputs]
    for tensor in req.inputs:
        arr = out[tensor.name]
        assert list(arr.shape) == list(tensor.shape)
        assert arr.dtype == numpy_dtype(tensor.datatype)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_fuzz_random_bytes(data: bytes) -> None:
    try:
        req = pb.ModelInferRequest.FromString(data)
    except DecodeError:
        return
    _decode_or_invalid(req)


_SEED_REQUEST = encode_request(
    model_name="m",
    inputs={"a": np.arange(6, dtype=np.float32).reshape(2, 3), "s": np.array(["x", "yz"])},
).SerializeToString()


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, len(_SEED_REQUEST) - 1), st.integers(0, 255)), max_size=8),
    st.integers(0, len(_SEED_REQUEST)),
)
def test_fuzz_mutated_valid_request(flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(_SEED_REQUEST)
    for pos, value in flips:
        data[pos] = value
    try:
        req = pb.ModelInferRequest.FromString(bytes(data[:cut]))
    except DecodeError:
        return
    _decode_or_invalid(req)


_FIELDS = [
    "bool_contents",
    "int_contents",
    "int64_contents",
    "uint_contents",
    "uint64_contents",
    "fp32_contents",
    "fp64_contents",
    "bytes_contents",
]


@st.composite
def _requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="m")
    n = draw(st.integers(0, 3))
    use_raw = draw(st.booleans())
    for _ in range(n):
        tensor = req.inputs.add(
            name=draw(st.sampled_from(["", "a", "b", "c"])),
            datatype=draw(st.sampled_from([*DATATYPES, "BF16", "FP8", ""])),
            shape=draw(st.lists(st.integers(-2, 6), max_size=3)),
        )
        if use_raw:
            req.raw_input_contents.append(draw(st.binary(max_size=64)))
        if draw(st.booleans()):
            field = draw(st.sampled_from(_FIELDS))
            container = getattr(tensor.contents, field)
            if field == "bytes_contents":
                container.extend(draw(st.lists(st.binary(max_size=4), max_size=8)))
            elif field == "bool_contents":
                container.extend(draw(st.lists(st.booleans(), max_size=8)))
            elif field in ("fp32_contents", "fp64_contents"):
                container.extend(draw(st.lists(st.floats(width=32), max_size=8)))
            else:
                lo = 0 if field.startswith("uint") else -(2**31)
                container.extend(draw(st.lists(st.integers(lo, 2**31 - 1), max_size=8)))
    if use_raw and draw(st.booleans()):
        req.raw_input_contents.append(b"")  # an extra raw entry
    return req


@settings(max_examples=500, deadline=None)
@given(_requests())
def test_fuzz_structured_requests(req: pb.ModelInferRequest) -> None:
    _decode_or_invalid(_wire(req))


_dtypes = st.sampled_from(
    [
        np.bool_,
        np.int8,
        np.int16,
        np.int32,
        np.int64,
        np.uint8,
        np.uint16,
        np.uint32,
        np.uint64,
        np.float16,
        np.float32,
        np.float64,
    ]
)


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(_dtypes, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)), st.booleans())
def test_property_round_trip(arr: np.ndarray, raw: bool) -> None:
    req = _wire(encode_request(model_name="m", inputs={"x": arr}, raw=raw))
    out = decode_inputs(req)["x"]
    want = arr.astype(np.float32) if (arr.dtype == np.float16 and not raw) else arr
    assert out.shape == want.shape
    assert out.dtype == want.dtype
    np.testing.assert_array_equal(out, want)
