"""The built-in model loaders, by model type.

``get_loader(type)`` answers the loader for a registration's model type, case-insensitively and
with the usual aliases ("scikit-learn" for sklearn, "pytorch" for torchscript, "openvino_ir" for
openvino, the name KServe gives the format). Importing this package is cheap: each loader imports
its library (torch, xgboost, lightgbm, onnxruntime, openvino, sklearn) inside ``load``, so a
runtime pays for a library only when it first loads a model that needs it (``mesh.runtime.libraries``
imports it just before that load is measured), and a missing optional library only fails the loads
of its own type.

| type        | files            | inputs                        | outputs (default first)               |
|-------------|------------------|-------------------------------|---------------------------------------|
| sklearn     | .joblib .pkl     | one 2-D numeric, any name     | predict; predict_proba when requested |
| xgboost     | .json .ubj       | one 2-D numeric, any name     | predict; predict_proba when requested |
| lightgbm    | .txt             | one 2-D numeric, any name     | predict; predict_proba when requested |
| onnx        | .onnx            | by name (any if just one)     | every session output, by its name     |
| openvino    | .xml (+ .bin)    | by name (any if just one)     | every model output, by its name       |
| torchscript | .pt .pth         | positional, in request order  | output__0, output__1, ...             |

(xgboost and lightgbm: ``predict_proba`` for classification objectives only, where ``predict`` is
the class index; a regressor's ``predict`` is its value. Each loader's docstring has the rules.)

Plug-ins: a package adds model types by declaring ``Loader`` subclasses in the entry point group
``mesh_serving.loaders`` (name: the model type; value: ``module:Class``), e.g. in its
``pyproject.toml``::

    [project.entry-points."mesh_serving.loaders"]
    constant = "my_models.loader:ConstantLoader"

Installed next to the mesh (and so in its model workers too), the type is served like a built-in
one: its ``Loader.load`` gets the same path confinement and code-format policy, its models the
same sizing, eviction and failure handling. A plug-in cannot replace a built-in type, and one
that fails to import is left out with a log line; the rest of the runtime starts.
"""

from __future__ import annotations

import functools
import re
from importlib.metadata import entry_points

import structlog

from mesh.errors import InvalidArgument
from mesh.runtime.loaders.base import LoadedModel, Loader
from mesh.runtime.loaders.lightgbm_loader import LightGBMLoader
from mesh.runtime.loaders.onnx_loader import OnnxLoader
from mesh.runtime.loaders.openvino_loader import OpenVinoLoader
from mesh.runtime.loaders.sklearn_loader import SklearnLoader
from mesh.runtime.loaders.torchscript_loader import TorchScriptLoader
from mesh.runtime.loaders.xgboost_loader import XGBoostLoader

log = structlog.get_logger(__name__)

ENTRY_POINTS = "mesh_serving.loaders"
_BUILT_IN: dict[str, Loader] = {
    loader.type: loader
    for loader in (SklearnLoader(), XGBoostLoader(), LightGBMLoader(), OnnxLoader(), OpenVinoLoader(),
                   TorchScriptLoader())
}
_ALIASES = {"scikit-learn": "sklearn", "pytorch": "torchscript", "openvino_ir": "openvino"}
_TYPE_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")


@functools.cache
def loaders() -> dict[str, Loader]:
    """The built-in loaders and the installed plug-ins' (module docstring), read once."""
    found = dict(_BUILT_IN)
    for point in entry_points(group=ENTRY_POINTS):
        name = point.name.strip().lower()
        if not _TYPE_NAME.match(name) or name in found or name in _ALIASES:
            log.warning("model loader plug-in left out: its type name is taken or not a valid name",
                        type=point.name[:80], entry_point=point.value[:200])
            continue
        try:
            cls = point.load()
            loader = cls() if isinstance(cls, type) and issubclass(cls, Loader) else None
        except Exception as exc:
            log.warning("model loader plug-in left out: it does not import", type=name,
                        entry_point=point.value[:200], error=f"{type(exc).__name__}: {exc}"[:500])
            continue
        if loader is None:
            log.warning("model loader plug-in left out: not a Loader subclass", type=name,
                        entry_point=point.value[:200])
            continue
        loader.type = name  # type: ignore[misc]  # the entry point's name is the type clients register
        found[name] = loader
    return found


def supported_types() -> list[str]:
    """The canonical model types, sorted (aliases are accepted by ``get_loader`` but not listed)."""
    return sorted(loaders())


def with_aliases(types: list[str]) -> list[str]:
    """``types`` and the aliases of those among them, for a runtime to advertise: routers match a
    registration's type literally, so one registered as "pytorch" finds the torchscript runtimes."""
    return types + sorted(alias for alias, canonical in _ALIASES.items() if canonical in types and alias not in types)


def canonical_type(model_type: str) -> str:
    """The canonical name of ``model_type`` (aliases resolved); InvalidArgument if unknown."""
    return get_loader(model_type).type


def gpu_types() -> list[str]:
    """The canonical types whose loader can place a model on a GPU, sorted."""
    return sorted(t for t, loader in loaders().items() if loader.supports_gpu)


def get_loader(model_type: str) -> Loader:
    """The loader for ``model_type`` (case-insensitive, aliases allowed); InvalidArgument if unknown."""
    name = model_type.strip().lower()
    loader = loaders().get(_ALIASES.get(name, name))
    if loader is None:
        aliases = ", ".join(f"{a} (= {t})" for a, t in sorted(_ALIASES.items()))
        raise InvalidArgument(
            f"unknown model type {model_type!r}; supported: {', '.join(supported_types())}; "
            f"aliases: {aliases}"
        )
    return loader


__all__ = ["ENTRY_POINTS", "LoadedModel", "Loader", "canonical_type", "get_loader", "gpu_types", "loaders",
           "supported_types", "with_aliases"]
