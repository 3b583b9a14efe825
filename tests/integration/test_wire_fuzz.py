"""No byte sequence crashes the router or a runtime: random and mutated ModelInfer bodies, sent
as raw bytes to both, get a proper gRPC status (never INTERNAL or UNKNOWN), and both keep serving.
Real servers on 127.0.0.1 with a memory:// registry; seeded, so a failure reproduces."""

from __future__ import annotations

import random

import grpc
import numpy as np
import pytest

from mesh.tensors import decode_response, encode_request
from tests.support.inprocess import InProcessMesh, memory_url
from tests.support.models import make_model

pytestmark = pytest.mark.integration

ACCEPTABLE = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
              grpc.StatusCode.RESOURCE_EXHAUSTED}


def _mutations(valid: bytes, rng: random.Random, n: int) -> list[bytes]:
    bodies = [bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64))) for _ in range(n // 2)]
    for _ in range(n - len(bodies)):
        body = bytearray(valid)
        for _ in range(rng.randint(1, 6)):
            op = rng.random()
            pos = rng.randrange(len(body)) if body else 0
            if op < 0.4 and body:
                body[pos] = rng.getrandbits(8)
            elif op < 0.7:
                del body[pos:pos + rng.randint(1, 16)]
            else:
                body[pos:pos] = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 8)))
        bodies.append(bytes(body))
    return bodies


async def test_random_and_mutated_bodies_get_a_status_and_servers_survive(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = make_model("sklearn", tmp_path, seed=0)
    mesh = await InProcessMesh(memory_url()).start(runtimes=1)
    try:
        await mesh.register("m", "sklearn", str(model.path))
        valid = encode_request(model_name="m", inputs={"x": model.sample})
        await mesh.infer("m", valid)  # loaded
        rng = random.Random(20261125)
        bodies = _mutations(valid.SerializeToString(), rng, 400)
        targets = {"router": mesh.router.endpoint, "runtime": mesh.runtimes[0].endpoint}  # type: ignore[union-attr]
        for name, endpoint in targets.items():
            async with grpc.aio.insecure_channel(endpoint) as channel:
                call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
                for body in bodies:
                    try:
                        await call(body, metadata=(("mm-model-id", "m"),), timeout=10)
                    except grpc.aio.AioRpcError as err:
                        assert err.code() in ACCEPTABLE, (name, body, err.code(), err.details())
        out = decode_response(await mesh.infer("m", valid))
        np.testing.assert_array_equal(out["predict"], model.expected["predict"])
    finally:
        await mesh.stop()
