"""A bare grpc.aio + uvloop echo server: the yardstick for the router's CPU per request.

``python -m loadtest.echo_server [--ready-file F] [--host ADDR]`` binds 127.0.0.1 (or ADDR) on a free port, writes
``host:port`` to the ready file, and answers every unary call to ``/echo.Echo/Echo`` with the
request's bytes. It has a generic handler with no (de)serializers, default server options, no
interceptors, no logging and no health service: the least work a Python gRPC server can do per
call. A byte-forwarding proxy does roughly two such halves per request (serve the client, call the
backend), which is why the hop benchmark compares the router's CPU per request with this server's.

It exits on SIGTERM/SIGINT, and by itself when ``MESH_PARENT_PID`` is set and that process is
gone (the benchmark was killed).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import grpc
import uvloop

from loadtest._serving import wait_for_stop, write_ready

SERVICE = "echo.Echo"
METHOD = f"/{SERVICE}/Echo"


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


async def serve(ready_file: Path | None, port: int = 0, host: str = "127.0.0.1") -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(_echo)}),))
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    write_ready(ready_file, f"{host}:{bound}")
    await wait_for_stop()
    await server.stop(grace=1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ready-file", type=Path)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    args = parser.parse_args()
    uvloop.run(serve(args.ready_file, args.port, args.host))


if __name__ == "__main__":
    main()
