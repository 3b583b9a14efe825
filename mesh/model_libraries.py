"""Which library each built-in model type needs, and the package extra that installs it.

Shared by the runtime, which imports a type's library at its first load (``mesh.runtime.libraries``),
and by the router, whose errors say what to install when no runtime loads a type (the router must
not import the runtime's modules: .importlinter). Aliases a runtime also advertises ("pytorch",
"scikit-learn", "openvino_ir") map to these canonical names in ``mesh.runtime.loaders``; they are
repeated here, as names only, so that a registration under an alias gets the hint too.
"""

from __future__ import annotations

# The modules a loader's first load imports, by canonical type. For sklearn, the estimator
# modules that pickled models name (tens of MB): importing them before the measured part keeps
# them out of the first model's size.
LIBRARIES: dict[str, tuple[str, ...]] = {
    "sklearn": ("sklearn.linear_model", "sklearn.tree", "sklearn.ensemble", "sklearn.pipeline"),
    "xgboost": ("xgboost",), "lightgbm": ("lightgbm",), "onnx": ("onnxruntime",),
    "torchscript": ("torch",), "openvino": ("openvino",),
}
_ALIASES = {"pytorch": "torchscript", "scikit-learn": "sklearn", "openvino_ir": "openvino"}
# The extra of pyproject.toml that installs each type's library (scikit-learn is a core dependency).
EXTRAS: dict[str, str] = {t: "runtimes" for t in LIBRARIES if t != "sklearn"}


def install_hint(model_type: str) -> str:
    """What to install on a runtime for ``model_type``, as a clause ('' for a type that is not
    built in, or that needs nothing beyond the core install)."""
    canonical = _ALIASES.get(model_type.lower(), model_type.lower())
    extra = EXTRAS.get(canonical)
    if extra is None:
        return ""
    return (f"type {model_type!r} needs the {extra!r} extra on the runtimes ({', '.join(LIBRARIES[canonical])}): "
            f"pip install 'mesh-serving[{extra}]' there")


__all__ = ["EXTRAS", "LIBRARIES", "install_hint"]
