"""Dynamic batching through a real router and runtime (in-process mesh, real trained models): at
concurrency, the answers of a batching model equal those of the same model served unbatched,
element by element, and the runtime's metrics show that requests were merged.

The runtime batches nothing by default here; one registration of each model turns batching on in
its key (``batch_max_size``, ``batch_max_wait_ms``: mesh.runtime.batching), the other does not.
"""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.request
from collections.abc import AsyncIterator

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh.gen.mmesh import model_mesh_pb2 as mm
from mesh.tensors import decode_response, encode_request
from tests.support.inprocess import InProcessMesh, memory_url
from tests.support.models import assert_outputs_match, make_model

pytestmark = pytest.mark.integration

CONCURRENCY = 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def batch_histogram(port: int) -> tuple[float, float]:
    """(requests batched, batches) from the runtime's ``mesh_batch_requests`` histogram."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
              if s.name.startswith("mesh_batch_requests")}
    return values.get("mesh_batch_requests_sum", 0.0), values.get("mesh_batch_requests_count", 0.0)


@pytest.fixture
async def mesh() -> AsyncIterator[tuple[InProcessMesh, int]]:
    port = free_port()
    m = InProcessMesh(memory_url(), runtime_overrides={"metrics_port": port, "inference_threads": 2})
    await m.start(runtimes=1)
    try:
        yield m, port
    finally:
        await m.stop()


@pytest.mark.parametrize("kind", ["sklearn", "onnx", "xgboost"])
async def test_batched_answers_equal_unbatched_at_concurrency(
        kind: str, mesh: tuple[InProcessMesh, int], tmp_path_factory: pytest.TempPathFactory) -> None:
    m, port = mesh
    artifact = make_model(kind, tmp_path_factory.mktemp(kind), seed=2)
    key = json.dumps({"batch_max_size": 64, "batch_max_wait_ms": 20})
    for model_id, info in (("plain", {}), ("batched", {"key": key})):
        status = await m.register(model_id, artifact.type, str(artifact.path), **info)
        assert status.status in (mm.ModelStatusInfo.NOT_LOADED, mm.ModelStatusInfo.LOADED, mm.ModelStatusInfo.LOADING)
    sample = np.asarray(artifact.sample, dtype=np.float32)
    # Requests of 1 to 3 rows, raw and typed, some asking for every output by name.
    requests = []
    for i in range(CONCURRENCY):
        start, rows = i % len(sample), 1 + i % 3
        x = np.take(sample, range(start, start + rows), axis=0, mode="wrap")
        requests.append(encode_request(model_name="", inputs={"input": x}, raw=i % 4 != 3, request_id=f"r{i}"))
    plain = [await m.infer("plain", r) for r in requests[:1]]  # loads it
    await m.infer("batched", requests[0])
    before = batch_histogram(port)
    for _ in range(2):
        plain = await asyncio.gather(*(m.infer("plain", r) for r in requests))
        batched = await asyncio.gather(*(m.infer("batched", r) for r in requests))
        for req, a, b in zip(requests, plain, batched, strict=True):
            assert a.id == b.id == req.id
            assert_outputs_match(decode_response(b), decode_response(a))
    merged, batches = (x - y for x, y in zip(batch_histogram(port), before, strict=True))
    assert merged == 2 * CONCURRENCY  # every request of the batching model went through a batch ...
    assert batches < merged  # ... and some of them shared one


async def test_a_bad_request_in_a_batch_gets_its_own_error(
        mesh: tuple[InProcessMesh, int], tmp_path_factory: pytest.TempPathFactory) -> None:
    import grpc

    m, _ = mesh
    artifact = make_model("sklearn", tmp_path_factory.mktemp("sk"), seed=1)
    await m.register("batched", "sklearn", str(artifact.path),
                     key=json.dumps({"batch_max_size": 64, "batch_max_wait_ms": 50}))
    good = encode_request(model_name="", inputs={"input": np.asarray(artifact.sample, np.float32)})
    bad = encode_request(model_name="", inputs={"input": np.zeros((2, artifact.n_features + 1), np.float32)})
    await m.infer("batched", good)
    results = await asyncio.gather(*(m.infer("batched", r) for r in (good, bad, good)), return_exceptions=True)
    assert isinstance(results[1], grpc.aio.AioRpcError)
    assert results[1].code() == grpc.StatusCode.INVALID_ARGUMENT and "features" in (results[1].details() or "")
    for ok in (results[0], results[2]):
        assert not isinstance(ok, BaseException)
        np.testing.assert_array_equal(decode_response(ok)["predict"], artifact.expected["predict"])


async def test_copies_in_model_workers_batch_too(tmp_path_factory: pytest.TempPathFactory) -> None:
    """With ``runtime.workers`` the runtime merges a batch into one request, its worker predicts it
    once, and the runtime splits the answer back: the answers equal those of the same model served
    unbatched (in the same worker), and a request the model refuses gets its own error."""
    import grpc

    port = free_port()
    m = InProcessMesh(memory_url(), runtime_overrides={"metrics_port": port, "workers": 1})
    await m.start(runtimes=1)
    try:
        artifact = make_model("sklearn", tmp_path_factory.mktemp("sk"), seed=3)
        key = json.dumps({"batch_max_size": 64, "batch_max_wait_ms": 20})
        for model_id, info in (("plain", {}), ("batched", {"key": key})):
            await m.register(model_id, artifact.type, str(artifact.path), **info)
        sample = np.asarray(artifact.sample, dtype=np.float32)
        requests = [encode_request(model_name="", inputs={"input": np.take(sample, range(i, i + 1 + i % 2), axis=0,
                                                                            mode="wrap")},
                                   raw=i % 3 != 0, request_id=f"r{i}") for i in range(CONCURRENCY)]
        bad = encode_request(model_name="", inputs={"input": np.zeros((1, artifact.n_features + 1), np.float32)})
        await m.infer("plain", requests[0])
        await m.infer("batched", requests[0])
        before = batch_histogram(port)
        plain = await asyncio.gather(*(m.infer("plain", r) for r in requests))
        batched = await asyncio.gather(*(m.infer("batched", r) for r in [*requests, bad]), return_exceptions=True)
        refused = batched.pop()
        assert isinstance(refused, grpc.aio.AioRpcError) and refused.code() == grpc.StatusCode.INVALID_ARGUMENT
        for req, a, b in zip(requests, plain, batched, strict=True):
            assert not isinstance(b, BaseException)
            assert a.id == b.id == req.id
            assert_outputs_match(decode_response(b), decode_response(a))
        merged, batches = (x - y for x, y in zip(batch_histogram(port), before, strict=True))
        assert merged == CONCURRENCY and batches < merged  # merged in the runtime, for the worker
    finally:
        await m.stop()
