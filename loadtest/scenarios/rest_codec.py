"""The router's REST conversion alone: ``mesh.rest.codec`` per request, against the gRPC path's work.

``python -m loadtest.scenarios.rest_codec [--sizes 1KiB,64KiB,1MiB] [--repeats N]
[--min-batch-ms MS] [--json]``

What is timed, in this process, with no server and no network: for an FP32 tensor [1, n] of each
size (1 KiB is n = 256, the request of ``loadtest.scenarios.rest``), the router's two conversions
of one REST inference,

- ``codec.infer_request``: the REST body -> the ``ModelInferRequest`` bytes sent to a runtime;
- ``codec.infer_response``: the runtime's ``ModelInferResponse`` bytes -> the REST body,

for a V2 JSON body (``data`` as text; the answer in JSON) and for Triton's binary tensors (a JSON
header with ``binary_data_size``, then the raw bytes; ``binary_data_output`` asks the answer in
binary). The answer carries an FP32 tensor of the same size (as an identity model's would), sent
raw by the runtime, so both directions convert the size named.

Against it, on the same tensor:

- *gRPC path*: what the router does with the same request over gRPC: it reads the model's name
  (``mesh.transport.wire.read_model_name``, a scan of the top-level fields) and passes the bytes
  through, both ways; nothing else is decoded or encoded.
- *json (stdlib)* and *orjson*: parsing the request's JSON part and dumping the response's JSON
  part, the same documents (the response's data as a list of floats, as the stdlib needs), with
  nothing else: what the codec's choice of orjson buys over the standard library.

Each figure is the median over ``--repeats`` (7) of a batch's time per call; a batch repeats the
call until it takes at least ``--min-batch-ms`` (20 ms), with the garbage collector off (as
``timeit`` does). Before timing, each conversion's output is checked against the tensor it carries.
Microseconds per request, one core; the figures are the codec's CPU cost, not a latency under load.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson

from loadtest.report import add_output_args, emit, machine, machine_line, table
from mesh.gen.inference import grpc_service_pb2 as pb
from mesh.rest import codec
from mesh.tensors import encode_request, encode_response
from mesh.transport.wire import read_model_name

MODEL = "codec-bench"
DEFAULT_SIZES = "1KiB,64KiB,1MiB"
_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20}


def parse_size(text: str) -> int:
    """``1KiB``, ``64KiB``, ``1MiB``, ``4096``: bytes of FP32 tensor data, a multiple of 4."""
    match = re.fullmatch(r"\s*(\d+)\s*([KkMm]i[Bb]|[Bb])?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1KiB, 64KiB, 1MiB)")
    size = int(match.group(1)) * _UNITS[(match.group(2) or "").lower()]
    if size < 4 or size % 4 or size > 64 * 2**20:
        raise argparse.ArgumentTypeError(f"{text!r}: need a multiple of 4 bytes, from 4 B to 64 MiB")
    return size


def label(size: int) -> str:
    for unit, factor in (("MiB", 2**20), ("KiB", 2**10)):
        if size % factor == 0:
            return f"{size // factor} {unit}"
    return f"{size} B"


def time_per_call(fn: Callable[[], object], *, repeats: int, min_batch_s: float) -> float:
    """Median over ``repeats`` batches of the seconds per call; each batch at least ``min_batch_s``."""
    fn()  # warm: first-call costs (imports, caches) are not the steady state
    number = 1
    while True:  # as timeit.autorange: grow the batch until it is long enough to time
        t = _batch(fn, number)
        if t >= min_batch_s:
            break
        number = max(number * 2, int(number * min_batch_s / max(t, 1e-9) * 1.2))
    times = [t / number] + [_batch(fn, number) / number for _ in range(repeats - 1)]
    return statistics.median(times)


def _batch(fn: Callable[[], object], number: int) -> float:
    enabled = gc.isenabled()
    gc.disable()
    try:
        started = time.perf_counter()
        for _ in range(number):
            fn()
        return time.perf_counter() - started
    finally:
        if enabled:
            gc.enable()


def bodies(arr: np.ndarray, binary: bool) -> tuple[bytes, int | None, bytes]:
    """(REST request body, its JSON header's length or None, the runtime's answer bytes)."""
    tensor: dict[str, Any] = {"name": "input", "shape": list(arr.shape), "datatype": "FP32"}
    if binary:
        raw = arr.astype("<f4").tobytes()
        tensor["parameters"] = {"binary_data_size": len(raw)}
        head = json.dumps({"inputs": [tensor], "parameters": {"binary_data_output": True}}).encode()
        body, header_length = head + raw, len(head)
    else:
        tensor["data"] = arr.ravel().tolist()  # a client's JSON: the floats as text
        body, header_length = json.dumps({"inputs": [tensor]}).encode(), None
    answer = encode_response(model_name=MODEL, model_version="1", request_id="",
                             outputs={"output-0": arr}, raw=True).SerializeToString()
    return body, header_length, answer


def _check(arr: np.ndarray, binary: bool, body: bytes, header_length: int | None, answer: bytes) -> None:
    """The codec's outputs carry the tensor (so the timings are of work that was done right)."""
    request, outputs = codec.infer_request(body, header_length, MODEL)
    got = np.frombuffer(pb.ModelInferRequest.FromString(request).raw_input_contents[0], dtype="<f4")
    assert np.array_equal(got, arr.ravel()), "infer_request lost the tensor"
    out, out_header = codec.infer_response(answer, outputs)
    assert (out_header is not None) == binary, (out_header, binary)
    if binary:
        assert out_header is not None
        assert np.array_equal(np.frombuffer(out[out_header:], dtype="<f4"), arr.ravel())
    else:
        assert np.array_equal(np.asarray(orjson.loads(out)["outputs"][0]["data"], dtype=np.float32),
                              arr.ravel())


def measure_size(size: int, binary: bool, *, repeats: int, min_batch_s: float) -> dict[str, Any]:
    n = size // 4
    arr = np.random.default_rng(n).standard_normal((1, n)).astype(np.float32)
    body, header_length, answer = bodies(arr, binary)
    _check(arr, binary, body, header_length, answer)
    _, outputs = codec.infer_request(body, header_length, MODEL)
    grpc_request = encode_request(model_name=MODEL, inputs={"input": arr}, raw=True).SerializeToString()

    # The JSON documents the codec parses and writes, for the stdlib/orjson comparison.
    json_part = body if header_length is None else body[:header_length]
    out, out_header = codec.infer_response(answer, outputs)
    response_doc = orjson.loads(out if out_header is None else out[:out_header])

    def us(fn: Callable[[], object]) -> float:
        return time_per_call(fn, repeats=repeats, min_batch_s=min_batch_s) * 1e6

    req_us = us(lambda: codec.infer_request(body, header_length, MODEL))
    resp_us = us(lambda: codec.infer_response(answer, outputs))
    grpc_us = us(lambda: read_model_name(grpc_request))
    stdlib_us = us(lambda: (json.loads(json_part), json.dumps(response_doc)))
    orjson_us = us(lambda: (orjson.loads(json_part), orjson.dumps(response_doc)))
    return {"tensor_bytes": size, "encoding": "binary" if binary else "JSON",
            "rest_request_bytes": len(body), "rest_response_bytes": len(out),
            "grpc_request_bytes": len(grpc_request), "grpc_response_bytes": len(answer),
            "infer_request_us": round(req_us, 2), "infer_response_us": round(resp_us, 2),
            "rest_total_us": round(req_us + resp_us, 2), "grpc_path_us": round(grpc_us, 3),
            "json_stdlib_us": round(stdlib_us, 2), "orjson_us": round(orjson_us, 2),
            "stdlib_over_orjson": round(stdlib_us / orjson_us, 2) if orjson_us else None}


def run(sizes: list[int], *, repeats: int, min_batch_s: float) -> dict[str, Any]:
    rows = []
    for size in sizes:
        for binary in (False, True):
            print(f"[rest-codec] {label(size)} {'binary' if binary else 'JSON'}...", file=sys.stderr, flush=True)
            rows.append(measure_size(size, binary, repeats=repeats, min_batch_s=min_batch_s))
    return {"machine": machine(),
            "settings": {"sizes_bytes": sizes, "repeats": repeats, "min_batch_ms": min_batch_s * 1000,
                         "numpy": np.__version__, "orjson": orjson.__version__},
            "rows": rows}


def render(result: dict[str, Any]) -> str:
    rows = [[label(r["tensor_bytes"]), r["encoding"], r["rest_request_bytes"], r["infer_request_us"],
             r["infer_response_us"], r["rest_total_us"], r["grpc_path_us"], r["json_stdlib_us"],
             r["orjson_us"], r["stdlib_over_orjson"] if r["stdlib_over_orjson"] is not None else float("nan")]
            for r in result["rows"]]
    s = result["settings"]
    return "\n".join([
        machine_line(result["machine"]), "",
        f"FP32 [1, n] tensors, the answer the same size; microseconds per request, median of {s['repeats']} "
        f"batches of at least {s['min_batch_ms']:g} ms; orjson {s['orjson']}, numpy {s['numpy']}", "",
        table(["tensor", "REST encoding", "REST body bytes", "infer_request us", "infer_response us",
               "REST total us", "gRPC path us", "json (stdlib) parse+dump us", "orjson parse+dump us",
               "stdlib / orjson"], rows), "",
        "gRPC path: the router reads the model name from the request bytes and passes both bodies through."])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.scenarios.rest_codec",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=DEFAULT_SIZES,
                        help=f"comma-separated FP32 tensor sizes (default {DEFAULT_SIZES})")
    parser.add_argument("--repeats", type=int, default=7, help="batches per figure; the median is kept (default 7)")
    parser.add_argument("--min-batch-ms", type=float, default=20.0,
                        help="a batch repeats the call until it lasts this long (default 20)")
    add_output_args(parser)
    args = parser.parse_args(argv)
    try:
        sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    if not sizes or not 1 <= args.repeats <= 100 or not 0 < args.min_batch_ms <= 10_000:
        parser.error("need at least one size, 1 <= --repeats <= 100 and 0 < --min-batch-ms <= 10000")
    result = run(sizes, repeats=args.repeats, min_batch_s=args.min_batch_ms / 1000)
    emit(args, result, render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
