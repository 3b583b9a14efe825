"""The naive proxy of issue 2: grpc.aio + uvloop, forwards ModelInfer bytes to one fixed backend.

``python -m loadtest.naive_proxy --backend HOST:PORT [--ready-file F]`` binds 127.0.0.1 on a free
port and forwards every ``inference.GRPCInferenceService/ModelInfer`` call as bytes, with the
client's metadata and deadline, over one channel with default options. No routing, no registry, no
retries, no error mapping: the floor for a Python gRPC proxy, measured in the same run as the
router so that the router's numbers can be read against it on the same (noisy) machine.

It exits on SIGTERM/SIGINT, and by itself when ``MESH_PARENT_PID`` is set and that process is gone.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import grpc
import uvloop

from loadtest._serving import wait_for_stop, write_ready

SERVICE = "inference.GRPCInferenceService"


async def serve(backend: str, ready_file: Path | None) -> None:
    channel = grpc.aio.insecure_channel(backend)
    call = channel.unary_unary(f"/{SERVICE}/ModelInfer")

    async def forward(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        metadata = tuple((k, v) for k, v in context.invocation_metadata() or () if not k.startswith("grpc-"))
        try:
            return await call(request, metadata=metadata, timeout=context.time_remaining())
        except grpc.aio.AioRpcError as err:
            await context.abort(err.code(), err.details() or "")
            raise

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        SERVICE, {"ModelInfer": grpc.unary_unary_rpc_method_handler(forward)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    write_ready(ready_file, f"127.0.0.1:{port}")
    await wait_for_stop()
    await server.stop(grace=1.0)
    await channel.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", required=True)
    parser.add_argument("--ready-file", type=Path)
    args = parser.parse_args()
    uvloop.run(serve(args.backend, args.ready_file))


if __name__ == "__main__":
    main()
