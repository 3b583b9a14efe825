"""The runtime's adapter for an external model server (mesh.runtime.servers), as the tests make it:
pointed at a server on 127.0.0.1, started (it waits for the server to answer)."""

from __future__ import annotations

from mesh.runtime.loaders.base import LoadPolicy
from mesh.runtime.servers import ExternalServer, external_server


def adapter(kind: str, port: int, *, types: tuple[str, ...] = (), repository: str = "", load_timeout_s: float = 20,
            lost: list[str] | None = None, roots: tuple[str, ...] = ()) -> ExternalServer:
    """``lost`` collects the model IDs the adapter reports lost with its server."""
    async def on_lost(ids: list[str]) -> None:
        if lost is not None:
            lost.extend(ids)

    server = external_server(kind, f"127.0.0.1:{port}", repository=repository, types=types,
                             policy=LoadPolicy(roots=roots), load_timeout_s=load_timeout_s, predict_timeout_s=10,
                             max_message_bytes=4 << 20, predict_size=lambda spec: 12345, on_lost=on_lost)
    server.start()
    return server
