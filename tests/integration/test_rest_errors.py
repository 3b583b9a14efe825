"""Bad input at the router's REST front end gets the right HTTP status and a JSON body
``{"error": "..."}`` that names the problem; nothing is a 5xx and the server keeps serving.

The cases are written out (one per kind of mistake, each with the words its message must hold),
then Hypothesis writes more (derandomized, so a failure reproduces): JSON-ish documents, some near
a valid request and some anything at all, and arbitrary bytes, with and without the binary
extension's ``Inference-Header-Content-Length``, gzip-compressed or only claiming to be, sent to the
V2 and V1 endpoints of a real mesh.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import joblib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.tensors import DATATYPES
from tests.support.inprocess import InProcessMesh, memory_url

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

LIMIT = 64 * 1024  # router.max_message_bytes here: bodies over it are refused with 413
INFER = "/v2/models/iris/infer"
X = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]


@dataclass(frozen=True)
class Reply:
    status: int
    content_type: str
    body: bytes

    def error(self) -> str:
        """The error message; fails unless the body is JSON with an "error" string."""
        assert self.content_type == "application/json", (self.status, self.content_type, self.body[:200])
        doc = json.loads(self.body)
        assert isinstance(doc, dict) and isinstance(doc.get("error"), str) and doc["error"], doc
        return str(doc["error"])


@dataclass(frozen=True)
class Expected:
    predict: list[int]


@pytest.fixture(scope="module")
def expected(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Expected]:
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    x, y = load_iris(return_X_y=True)
    model = LogisticRegression(max_iter=500).fit(x, y)
    path = tmp_path_factory.mktemp("rest-errors") / "iris"
    path.mkdir()
    joblib.dump(model, path / "model.joblib")
    return path, Expected(model.predict(np.array(X)).tolist())


@pytest.fixture
async def mesh(expected: tuple[Path, Expected]) -> AsyncIterator[InProcessMesh]:
    m = InProcessMesh(memory_url(), router_overrides={"max_message_bytes": LIMIT})
    await m.start(runtimes=1)
    try:
        await m.register("iris", "sklearn", str(expected[0]))
        yield m
    finally:
        await m.stop()


async def send(session: aiohttp.ClientSession, m: InProcessMesh, method: str, path: str,
               body: bytes | AsyncIterable[bytes] | None = None, headers: Mapping[str, str] | None = None) -> Reply:
    async with session.request(method, m.rest_url + path, data=body, headers=headers,
                               timeout=aiohttp.ClientTimeout(total=30)) as response:
        return Reply(response.status, response.content_type, await response.read())


async def good_request(session: aiohttp.ClientSession, m: InProcessMesh, want: Expected) -> None:
    reply = await send(session, m, "POST", INFER, tensor_doc("FP64", [2, 4], X))
    assert reply.status == 200, reply
    assert json.loads(reply.body)["outputs"][0]["data"] == want.predict


def tensor_doc(datatype: str, shape: list[int], data: Any, name: str = "x", **params: Any) -> bytes:
    tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
    if data is not None:
        tensor["data"] = data
    if params:
        tensor["parameters"] = params
    return json.dumps({"inputs": [tensor]}).encode()


def binary_request(size: int, payload: bytes) -> tuple[bytes, dict[str, str]]:
    """JSON header naming ``size`` binary bytes for an FP32 [1, 4] input, then ``payload``."""
    head = tensor_doc("FP32", [1, 4], None, binary_data_size=size)
    return head + payload, {"Inference-Header-Content-Length": str(len(head))}


async def chunks(n: int, size: int = 4096) -> AsyncIterator[bytes]:
    """A chunked body (no Content-Length): only reading it finds it too large."""
    for _ in range(n):
        yield b" " * size


@dataclass(frozen=True)
class Case:
    what: str
    path: str
    body: bytes | None
    status: int
    words: tuple[str, ...]  # what the error message must say
    headers: dict[str, str] = field(default_factory=dict)
    method: str = "POST"


def cases() -> list[Case]:
    past_end = tensor_doc("FP32", [1, 4], None, binary_data_size=16)
    short, short_headers = binary_request(12, b"\0" * 12)
    extra, extra_headers = binary_request(16, b"\0" * 20)
    runs_past, runs_past_headers = binary_request(16, b"\0" * 8)
    return [
        Case("malformed JSON", INFER, b'{"inputs": [', 400, ("not valid JSON",)),
        Case("not an object", INFER, b"[1, 2]", 400, ("must be a JSON object",)),
        Case("no inputs", INFER, b'{"outputs": []}', 400, ("'inputs'",)),
        Case("shape and data disagree", INFER, tensor_doc("FP32", [2, 4], [1, 2, 3, 4, 5]), 400,
             ("input 'x'", "5 values", "8")),
        Case("ragged data", INFER, tensor_doc("FP32", [2, 2], [[1, 2], [3]]), 400, ("input 'x'", "regular")),
        Case("float for INT32", INFER, tensor_doc("INT32", [1, 4], [1, 2.5, 3, 4]), 400,
             ("input 'x'", "INT32", "integers")),
        Case("300 for UINT8", INFER, tensor_doc("UINT8", [1, 4], [1, 300, 3, 4]), 400,
             ("input 'x'", "300", "UINT8")),
        Case("string for FP32", INFER, tensor_doc("FP32", [1, 4], [1, "two", 3, 4]), 400,
             ("input 'x'", "FP32", "numbers")),
        Case("number for BOOL", INFER, tensor_doc("BOOL", [1, 4], [1, 0, 1, 0]), 400, ("input 'x'", "BOOL")),
        Case("unknown datatype", INFER, tensor_doc("FP8", [1, 4], [1, 2, 3, 4]), 400, ("input 'x'", "FP8")),
        Case("negative dimension", INFER, tensor_doc("FP32", [-1, 4], [1, 2, 3, 4]), 400,
             ("input 'x'", "negative")),
        Case("binary header past the end", INFER, past_end, 400, ("Inference-Header-Content-Length", "past the end"),
             {"Inference-Header-Content-Length": str(len(past_end) + 100)}),
        Case("binary header not a number", INFER, past_end, 400, ("Inference-Header-Content-Length", "not a number"),
             {"Inference-Header-Content-Length": "twelve"}),
        Case("binary size not the tensor's", INFER, short, 400, ("input 'x'", "12 bytes", "needs 16"), short_headers),
        Case("binary bytes left over", INFER, extra, 400, ("4 bytes", "not claimed"), extra_headers),
        Case("binary size past the data", INFER, runs_past, 400, ("input 'x'", "runs past"), runs_past_headers),
        Case("binary size without the extension", INFER, past_end, 400, ("input 'x'", "runs past")),
        Case("unknown model", "/v2/models/no-such-model/infer", tensor_doc("FP32", [1, 4], [1, 2, 3, 4]), 404,
             ("no-such-model", "not found")),
        Case("unknown model's metadata", "/v2/models/no-such-model", None, 404, ("no-such-model",), method="GET"),
        Case("unknown model, V1", "/v1/models/no-such-model:predict", b'{"instances": [[1, 2, 3, 4]]}', 404,
             ("no-such-model",)),
        Case("unknown endpoint", "/v3/anything", None, 404, ("no such endpoint", "/v3/anything"), method="GET"),
        Case("GET on infer", INFER, None, 404, ("no such endpoint",), method="GET"),
        Case("V1 without instances", "/v1/models/iris:predict", b'{"rows": [[1, 2, 3, 4]]}', 400, ("instances",)),
        Case("V1 ragged instances", "/v1/models/iris:predict", b'{"instances": [[1, 2], [3]]}', 400, ("regular",)),
        Case("body over the limit", INFER, b" " * (LIMIT + 1), 413, ("router.max_message_bytes", str(LIMIT))),
        Case("V1 body over the limit", "/v1/models/iris:predict", b" " * (LIMIT + 1), 413,
             ("router.max_message_bytes",)),
        # gzip that decompresses past the limit: refused while reading, bounded
        Case("gzip bomb", INFER, gzip.compress(b" " * (64 * LIMIT)), 413, ("router.max_message_bytes",),
             {"Content-Encoding": "gzip"}),
        # Not a 500; and the answer says the connection closes (the next case reuses the pool).
        Case("body that is not the gzip it claims", INFER, b'{"inputs": []}', 400, ("cannot be read", "gzip"),
             {"Content-Encoding": "gzip"}),
        # The runtime's own refusal (scikit-learn's model has 4 features): INVALID_ARGUMENT, 400.
        Case("wrong number of features", INFER, tensor_doc("FP32", [1, 3], [1, 2, 3]), 400,
             ("input 'x'", "4 features", "3")),
        Case("model's input of the wrong kind", INFER, tensor_doc("BYTES", [1, 4], ["a", "b", "c", "d"]), 400,
             ("input 'x'",)),
        Case("V1 wrong number of features", "/v1/models/iris:predict", b'{"instances": [[1, 2]]}', 400,
             ("4 features",)),
    ]


async def test_each_mistake_gets_its_status_and_a_message_naming_it(
        mesh: InProcessMesh, expected: tuple[Path, Expected]) -> None:
    wrong = []
    async with aiohttp.ClientSession() as session:
        await good_request(session, mesh, expected[1])
        for case in cases():
            reply = await send(session, mesh, case.method, case.path, case.body, case.headers)
            message = reply.error() if reply.status >= 400 else ""
            if reply.status != case.status or not all(w in message for w in case.words):
                wrong.append((case.what, reply.status, reply.body[:300]))
        # A chunked body (no Content-Length) over the limit: found while reading it.
        reply = await send(session, mesh, "POST", INFER, chunks(LIMIT // 4096 + 2))
        assert reply.status == 413 and "router.max_message_bytes" in reply.error()
        # and after all of it, the server answers a good request, on the same connection pool
        await good_request(session, mesh, expected[1])
    assert not wrong, wrong


# --- fuzzing ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fuzzed:
    path: str
    body: bytes
    headers: dict[str, str]


_KEYS = st.sampled_from(["inputs", "outputs", "name", "shape", "datatype", "data", "parameters", "binary_data_size",
                         "binary_data", "binary_data_output", "id", "instances", "content_type"])
# Text without lone surrogates: JSON cannot carry them, so they would only test the parser's refusal.
_TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=8)
_SCALARS = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | _TEXT
_JSONISH = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(_KEYS, inner, max_size=5),
                        max_leaves=24)
_PATHS = st.sampled_from([INFER, INFER, "/v2/models/iris/versions/1/infer", "/v1/models/iris:predict",
                          "/v2/models/no-such-model/infer", "/v2/models/iris"])


def _sometimes(draw: st.DrawFn, strategy: st.SearchStrategy[Any], default: Any) -> Any:
    """One time in four a drawn value, else ``default``: most near-valid requests have one mistake."""
    return draw(strategy) if draw(st.integers(0, 3)) == 0 else default


@st.composite
def near_valid(draw: st.DrawFn) -> dict[str, Any]:
    """A valid V2 request for the model with a mistake or two (or none): the deep checks are reached."""
    tensor: dict[str, Any] = {
        "name": _sometimes(draw, st.sampled_from(["", "y", 7, None, "n" * 300]), "x"),
        "datatype": draw(st.sampled_from([*DATATYPES, *DATATYPES, "fp32", "", None])),
        "shape": _sometimes(draw, st.lists(st.integers(-2, 2**40), max_size=4)
                            | st.lists(st.integers(0, 5), min_size=1, max_size=3), [2, 4]),
        "data": _sometimes(draw, st.lists(st.floats(-1e3, 1e3), min_size=8, max_size=8)
                           | st.lists(st.integers(-400, 2**65), min_size=8, max_size=8)
                           | st.lists(_TEXT, max_size=8) | st.lists(st.booleans(), min_size=8, max_size=8)
                           | _JSONISH, X),
    }
    if not draw(st.integers(0, 5)):
        del tensor["data"]
    if not draw(st.integers(0, 3)):
        tensor["parameters"] = {"binary_data_size": draw(st.integers(-4, 80) | _SCALARS)}
    doc: dict[str, Any] = {"inputs": [tensor, *_sometimes(draw, st.lists(_JSONISH, max_size=2), [])]}
    if draw(st.booleans()):
        doc["outputs"] = draw(st.lists(st.fixed_dictionaries(
            {"name": st.sampled_from(["predict", "predict_proba", "nope"])},
            optional={"parameters": st.dictionaries(_KEYS, _SCALARS, max_size=2)}), max_size=3))
    if not draw(st.integers(0, 3)):
        doc["parameters"] = {"binary_data_output": draw(_SCALARS)}
    if not draw(st.integers(0, 3)):
        doc["id"] = draw(_TEXT | _SCALARS)
    return doc


@st.composite
def fuzzed(draw: st.DrawFn) -> Fuzzed:
    kind = draw(st.sampled_from(["near-valid", "json-ish", "bytes"]))
    if kind == "bytes":
        head = draw(st.binary(max_size=200))
    else:
        doc = draw(near_valid()) if kind == "near-valid" else draw(_JSONISH)
        if draw(st.booleans()) and isinstance(doc, dict):
            doc = {"instances": doc.get("inputs", doc)}  # V1-shaped
        head = json.dumps(doc).encode()  # allow_nan: NaN and Infinity, which JSON does not have
    tail = draw(st.binary(max_size=64))
    header = draw(st.one_of(st.none(), st.none(), st.just(str(len(head))), st.just(str(len(head))),
                            st.integers(-3, 2**64).map(str),
                            st.sampled_from(["", "abc", " 12 ", "1e3", "0x10", "-0", "9" * 40])))
    headers = {} if header is None else {"Inference-Header-Content-Length": header}
    body = head + tail if header is not None else head
    encoding = draw(st.sampled_from([None, None, None, None, None, "gzip", "gzip-claimed"]))
    if encoding is not None:  # compressed, or only said to be
        headers["Content-Encoding"] = "gzip"
        body = gzip.compress(body) if encoding == "gzip" else body
    return Fuzzed(draw(_PATHS), body, headers)


def generate(n: int) -> list[Fuzzed]:
    """Hypothesis as a generator: ``n`` derandomized examples, sent afterwards on the mesh's loop."""
    out: list[Fuzzed] = []

    @settings(max_examples=n, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(fuzzed())
    def collect(case: Fuzzed) -> None:
        out.append(case)

    collect()
    return out


def check(replies: Iterable[tuple[Fuzzed, Reply]]) -> list[tuple[Any, ...]]:
    wrong: list[tuple[Any, ...]] = []
    for case, reply in replies:
        if reply.status >= 500:
            wrong.append((case, reply))
        elif reply.status >= 400:
            try:
                reply.error()
            except (AssertionError, ValueError) as exc:
                wrong.append((case, reply, exc))
    return wrong


async def test_fuzzed_bodies_never_get_a_5xx_and_errors_are_json(
        mesh: InProcessMesh, expected: tuple[Path, Expected]) -> None:
    generated = generate(400)
    replies = []
    async with aiohttp.ClientSession() as session:
        await good_request(session, mesh, expected[1])
        for case in generated:
            replies.append((case, await send(session, mesh, "POST" if "/infer" in case.path or ":predict" in case.path
                                             else "GET", case.path, case.body, case.headers)))
        await good_request(session, mesh, expected[1])
    wrong = check(replies)
    assert not wrong, (len(wrong), wrong[:10])
    statuses = Counter(r.status for _, r in replies)
    # The fuzzer reached past the cheap checks: some requests were good, and the codec's deep checks
    # (binary sizes, datatypes) answered others.
    assert statuses[200] and statuses[400], statuses
    messages = " ".join(r.error() for _, r in replies if r.status >= 400)
    # Most of the deep checks answered some request (which ones a sample reaches varies a little;
    # each is also hit on purpose by test_each_mistake_gets_its_status_and_a_message_naming_it).
    deep = ("binary", "datatype", "not valid JSON", "Inference-Header-Content-Length", "must be integers",
            "cannot be read")
    reached = [words for words in deep if words in messages]
    assert len(reached) >= 4, (reached, Counter(r.error()[:50] for _, r in replies if r.status >= 400))
