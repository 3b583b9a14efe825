"""The REST port against the attacks an attacker's review of it proved (each test was a working
attack before its fix): compression bombs, a small body numpy would turn into gigabytes, clients
that trickle, headers that gRPC metadata cannot carry, connection floods, and model IDs outside
ASCII. Real router and runtime on 127.0.0.1 (``InProcessMesh``), a model trained here."""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import joblib
import numpy as np
import psutil
import pytest

from mesh.rest import guards
from mesh.tensors import decode_response, encode_request
from tests.support.inprocess import InProcessMesh, memory_url

TOKEN = "rest-attacks-token-0123456789"


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    x, y = load_iris(return_X_y=True)
    path = tmp_path_factory.mktemp("model") / "iris.joblib"
    joblib.dump(LogisticRegression(max_iter=500).fit(x, y), path)
    return path


@pytest.fixture
async def mesh(model_file: Path) -> AsyncIterator[InProcessMesh]:
    m = await InProcessMesh(memory_url()).start()
    await m.register("iris", "sklearn", str(model_file))
    try:
        yield m
    finally:
        await m.stop()


def _infer_doc(data: Any, shape: list[int], datatype: str = "FP64") -> bytes:
    return json.dumps({"inputs": [{"name": "x", "shape": shape, "datatype": datatype, "data": data}]}).encode()


async def _post(m: InProcessMesh, path: str, body: bytes, **headers: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.post(
            m.rest_url + path, data=body, headers=headers, skip_auto_headers=("Content-Type",)) as reply:
        return reply.status, json.loads(await reply.read())


ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]


async def test_compressed_bodies_are_inflated_within_the_bound_and_unknown_encodings_refused(
        mesh: InProcessMesh) -> None:
    good = _infer_doc(ROWS, [2, 4])
    for encoding, packed in (("gzip", gzip.compress(good)), ("deflate", zlib.compress(good))):
        status, body = await _post(mesh, "/v2/models/iris/infer", packed, **{"Content-Encoding": encoding})
        assert status == 200 and body["outputs"][0]["shape"] == [2], (encoding, body)
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)  # raw deflate, as some clients send "deflate"
    status, _ = await _post(mesh, "/v2/models/iris/infer", raw.compress(good) + raw.flush(),
                            **{"Content-Encoding": "deflate"})
    assert status == 200
    # 64 MiB of zeros in 64 KiB: refused once 16 MiB (router.max_message_bytes) came out, 413.
    bomb = gzip.compress(b"\0" * (64 << 20), compresslevel=9)
    status, body = await _post(mesh, "/v2/models/iris/infer", bomb, **{"Content-Encoding": "gzip"})
    assert status == 413 and "router.max_message_bytes" in body["error"]
    status, body = await _post(mesh, "/v2/models/iris/infer", b"\x8b" * 100, **{"Content-Encoding": "br"})
    assert status == 400 and "Content-Encoding 'br' is not supported" in body["error"]
    status, body = await _post(mesh, "/v2/models/iris/infer", gzip.compress(good)[:-12],
                               **{"Content-Encoding": "gzip"})
    assert status == 400 and "cut short" in body["error"]
    status, body = await _post(mesh, "/v2/models/iris/infer", b"not gzip", **{"Content-Encoding": "gzip"})
    assert status == 400 and "not valid gzip data" in body["error"]


async def test_without_a_token_a_compressed_body_is_never_inflated(model_file: Path, tmp_path: Path) -> None:
    """With tokens on, the token is checked before the body is read: a bomb without one is a 401."""
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(f'[[token]]\nname = "a"\nrole = "read"\ntoken = "{TOKEN}"\n')
    m = await InProcessMesh(memory_url(), extra={"auth": {"tokens_file": str(tokens), "data_plane": True}}).start()
    try:
        bomb = gzip.compress(b"\0" * (64 << 20), compresslevel=9)
        status, body = await _post(m, "/v2/models/iris/infer", bomb, **{"Content-Encoding": "gzip"})
        assert status == 401 and "bearer token" in body["error"]
    finally:
        await m.stop()


async def test_one_long_string_among_numbers_is_refused_without_allocating_for_it(mesh: InProcessMesh) -> None:
    """Before the fix, numpy made a fixed-width string array of 20,001 x 20,000 characters (1.5 GiB)
    from this 78 KiB body, and the V1 endpoint did the same."""
    process = psutil.Process()
    before = process.memory_info().rss
    strings = ["a" * 20_000] + [""] * 20_000
    status, body = await _post(mesh, "/v2/models/iris/infer", _infer_doc(strings, [20_001]))
    assert status == 400 and "FP64 data must be numbers" in body["error"]
    status, body = await _post(mesh, "/v2/models/iris/infer", _infer_doc(strings, [1]))
    assert status == 400 and "holds 20001 values" in body["error"]
    status, body = await _post(mesh, "/v1/models/iris:predict", json.dumps({"instances": strings}).encode())
    assert status == 400, body
    assert process.memory_info().rss - before < 200 << 20


async def _raw_connection(m: InProcessMesh) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = m.rest_url.removeprefix("http://").rsplit(":", 1)
    return await asyncio.open_connection(host, int(port))


async def test_clients_that_trickle_are_cut_off(model_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guards, "HEADER_TIMEOUT_S", 0.5)
    monkeypatch.setattr(guards, "BODY_TIMEOUT_S", 0.5)
    # One request in flight at most: a trickled request that kept its place would refuse the next.
    mesh = await InProcessMesh(memory_url(), router_overrides={"max_inflight_requests": 1}).start()
    try:
        await mesh.register("iris", "sklearn", str(model_file))
        # Headers never finished: the connection is closed.
        reader, writer = await _raw_connection(mesh)
        writer.write(b"POST /v2/models/iris/infer HTTP/1.1\r\nHost: x\r\n")
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        # A body that stops arriving: answered 400 naming the wait, and its place is given back.
        reader, writer = await _raw_connection(mesh)
        writer.write(b"POST /v2/models/iris/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"in")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 400") and b"did not arrive within 0.5 s" in answer, answer[:300]
        status, body = await _post(mesh, "/v2/models/iris/infer", _infer_doc(ROWS, [2, 4]))
        assert status == 200, body
    finally:
        await mesh.stop()


async def test_connections_past_the_cap_are_closed_at_once(mesh: InProcessMesh,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guards, "MAX_CONNECTIONS", 2)
    held = [await _raw_connection(mesh) for _ in range(2)]
    reader, writer = await _raw_connection(mesh)
    assert await asyncio.wait_for(reader.read(), 10) == b""  # closed without a word
    writer.close()
    for _, w in held:
        w.close()
    await asyncio.sleep(0.2)
    status, _ = await _post(mesh, "/v2/models/iris/infer", _infer_doc(ROWS, [2, 4]))
    assert status == 200  # the slots came back


async def test_headers_gRPC_cannot_carry_are_refused_naming_them(mesh: InProcessMesh) -> None:
    for headers in ({"x-request-id": "café"}, {"x-request-id": "r" * 8000}, {"traceparent": "a\tb"}):
        status, body = await _post(mesh, "/v2/models/iris/infer", _infer_doc(ROWS, [2, 4]), **headers)
        name = next(iter(headers))
        assert status == 400 and f"header {name}" in body["error"], (headers, body)
    async with aiohttp.ClientSession() as session, session.get(
            mesh.rest_url + "/v2/models/iris", headers={"x-request-id": "café"}) as reply:
        assert reply.status == 400


async def test_a_model_id_outside_ascii_is_served_on_every_path(mesh: InProcessMesh, model_file: Path) -> None:
    await mesh.register("modèle", "sklearn", str(model_file))
    async with aiohttp.ClientSession() as session:
        async with session.get(mesh.rest_url + "/v2/models/mod%C3%A8le") as reply:
            assert reply.status == 200 and (await reply.json())["name"] == "modèle"
        async with session.post(mesh.rest_url + "/v1/models/mod%C3%A8le:predict",
                                data=json.dumps({"instances": ROWS})) as reply:
            assert reply.status == 200 and len((await reply.json())["predictions"]) == 2
    from mesh.gen.inference import grpc_service_pb2 as pb

    meta = await mesh.v2.ModelMetadata(pb.ModelMetadataRequest(name="modèle"), timeout=30)
    assert meta.name == "modèle"
    answer = await mesh.infer("modèle", encode_request(model_name="modèle", inputs={"x": np.array(ROWS)}),
                              header="")
    assert decode_response(answer)["predict"].shape == (2,)
