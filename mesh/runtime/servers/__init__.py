"""External model servers behind the runtime (issue 13): MLServer, Triton, ModelMesh SPI servers.

With ``runtime.server`` set, the runtime executes no model code at all: it keeps what is the
mesh's (the registry lease, placement, the cache's accounting and eviction, the model files'
confinement, the routers' streams) and has a model server running beside it load, serve and
unload the models, as modelmesh-serving's adapters do. The server holds no mesh credentials: it
is given a model's files and its requests' bytes, nothing else.

| ``runtime.server`` | how models are loaded                                   | types (default)            |
|--------------------|---------------------------------------------------------|----------------------------|
| ``mlserver``       | model-settings.json in its repository, RepositoryModelLoad | sklearn, xgboost, lightgbm |
| ``triton``         | config.pbtxt and a version folder, RepositoryModelLoad  | onnx                       |
| ``spi``            | ``mmesh.ModelRuntime`` loadModel / unloadModel          | (``runtime.server_types``) |

``runtime.server_types`` replaces the defaults: the runtime advertises exactly those types, so a
model type is served by the runtimes whose server supports it. ``base`` holds what the three
share (load retries and timeouts, copy tokens, sizes, forwarding, liveness); ``repository`` and
``spi`` the flavours.
"""

from __future__ import annotations

from typing import Any

from mesh.errors import InvalidArgument
from mesh.runtime.servers.base import ExternalModel, ExternalServer
from mesh.runtime.servers.repository import MLServer, Triton
from mesh.runtime.servers.spi import SpiServer

KINDS: dict[str, type[ExternalServer]] = {"mlserver": MLServer, "triton": Triton, "spi": SpiServer}


def external_server(kind: str, address: str, *, repository: str = "", **kwargs: Any) -> ExternalServer:
    """The adapter for ``runtime.server`` = ``kind``; InvalidArgument for an unknown kind."""
    cls = KINDS.get(kind.strip().lower())
    if cls is None:
        raise InvalidArgument(f"runtime.server must be one of {', '.join(KINDS)} (or empty: the built-in "
                              f"loaders), not {kind!r}")
    if issubclass(cls, (MLServer, Triton)):
        return cls(address, repository=repository, **kwargs)
    return cls(address, **kwargs)


__all__ = ["KINDS", "ExternalModel", "ExternalServer", "external_server"]
