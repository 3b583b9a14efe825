"""The built-in model loaders, by model type.

``get_loader(type)`` answers the loader for a registration's model type, case-insensitively and
with the usual aliases ("scikit-learn" for sklearn, "pytorch" for torchscript). Importing this
package is cheap: each loader imports its library (torch, xgboost, lightgbm, onnxruntime, sklearn)
inside ``load``, so a runtime pays for a library only when it first loads a model that needs it,
and a missing optional library only fails the loads of its own type.

| type        | files            | inputs                        | outputs (default first)               |
|-------------|------------------|-------------------------------|---------------------------------------|
| sklearn     | .joblib .pkl     | one 2-D numeric, any name     | predict; predict_proba when requested |
| xgboost     | .json .ubj       | one 2-D numeric, any name     | predict (FP32)                        |
| lightgbm    | .txt             | one 2-D numeric, any name     | predict (FP64)                        |
| onnx        | .onnx            | by name (any if just one)     | every session output, by its name     |
| torchscript | .pt .pth         | positional, in request order  | output__0, output__1, ...             |
"""

from __future__ import annotations

from mesh.errors import InvalidArgument
from mesh.runtime.loaders.base import LoadedModel, Loader
from mesh.runtime.loaders.lightgbm_loader import LightGBMLoader
from mesh.runtime.loaders.onnx_loader import OnnxLoader
from mesh.runtime.loaders.sklearn_loader import SklearnLoader
from mesh.runtime.loaders.torchscript_loader import TorchScriptLoader
from mesh.runtime.loaders.xgboost_loader import XGBoostLoader

_LOADERS: dict[str, Loader] = {
    loader.type: loader
    for loader in (SklearnLoader(), XGBoostLoader(), LightGBMLoader(), OnnxLoader(), TorchScriptLoader())
}
_ALIASES = {"scikit-learn": "sklearn", "pytorch": "torchscript"}


def supported_types() -> list[str]:
    """The canonical model types, sorted (aliases are accepted by ``get_loader`` but not listed)."""
    return sorted(_LOADERS)


def gpu_types() -> list[str]:
    """The canonical types whose loader can place a model on a GPU, sorted."""
    return sorted(t for t, loader in _LOADERS.items() if loader.supports_gpu)


def get_loader(model_type: str) -> Loader:
    """The loader for ``model_type`` (case-insensitive, aliases allowed); InvalidArgument if unknown."""
    name = model_type.strip().lower()
    loader = _LOADERS.get(_ALIASES.get(name, name))
    if loader is None:
        aliases = ", ".join(f"{a} (= {t})" for a, t in sorted(_ALIASES.items()))
        raise InvalidArgument(
            f"unknown model type {model_type!r}; supported: {', '.join(supported_types())}; "
            f"aliases: {aliases}"
        )
    return loader


__all__ = ["LoadedModel", "Loader", "get_loader", "gpu_types", "supported_types"]
