"""A request's inputs for a graph model that declares its own (onnx, openvino): matched, checked, converted.

Graph formats declare each input's name, element type and shape, so both loaders take the request
the same way, and a client sees one set of rules and messages whichever format serves the model:

* **By name.** Every declared input must be present and no other; one exception keeps single-input
  models easy to call: when the request has exactly one input and the model takes exactly one, the
  name is not checked.
* **Shape.** The rank and every fixed dimension must match; -1 (a dynamic dimension) matches any
  size. A port of unknown rank (shape ``()``) is not checked here: the library checks it.
* **Element type.** Converted to the declared type when that is safe or plainly intended: to a float
  type from any numeric type (FP64 -> FP32 included: clients send Python floats as FP64, and models
  converted from scikit-learn take FP32); to an integer type from integers and BOOL whose values
  fit; to strings from BYTES holding UTF-8. Anything else (floats into an integer input, numbers
  into a string input) is refused with a message naming both types.

Every refusal is an InvalidArgument naming the input, so a bad request never reaches the library.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mesh.errors import InvalidArgument, MeshError
from mesh.tensors import TensorSpec, datatype_for


@dataclass(frozen=True)
class Port:
    """One declared input or output of a graph model."""

    name: str
    dtype: np.dtype[Any]  # ``object`` for strings
    shape: tuple[int, ...]  # -1 for a dynamic dimension; () when the rank is unknown
    declared: str  # the element type as the format writes it, for messages: "tensor(float)", "FP32"

    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, datatype_for(self.dtype), self.shape)


def feeds(inputs: Mapping[str, np.ndarray], ports: Sequence[Port]) -> dict[str, np.ndarray]:
    """The request's ``inputs`` by port name, each checked and converted (module docstring)."""
    if len(inputs) == 1 and len(ports) == 1:
        (name, only), port = next(iter(inputs.items())), ports[0]
        return {port.name: convert(name, only, port)}
    found: dict[str, np.ndarray] = {}
    for port in ports:
        arr = inputs.get(port.name)
        if arr is None:
            raise InvalidArgument(
                f"missing input {port.name!r}; the model takes {[p.name for p in ports]}, "
                f"the request has {list(inputs)}"
            )
        found[port.name] = convert(port.name, arr, port)
    if len(found) != len(inputs):
        extra = next(n for n in inputs if n not in found)
        raise InvalidArgument(f"unknown input {extra!r}; the model takes {[p.name for p in ports]}")
    return found


def convert(name: str, arr: np.ndarray, port: Port) -> np.ndarray:
    """``arr`` checked against the port's shape and converted to its dtype (module docstring)."""
    what = f"input {name!r}"
    if port.shape and (
        arr.ndim != len(port.shape)
        or any(w not in (-1, g) for w, g in zip(port.shape, arr.shape, strict=True))
    ):
        raise InvalidArgument(f"{what}: the model takes shape {list(port.shape)}, got {list(arr.shape)}")
    want, have = port.dtype, arr.dtype
    refused = InvalidArgument(f"{what}: the model takes {port.declared}, got {v2_name(have)}; cannot convert")
    if want.kind == "O":
        # BYTES decode to Python bytes; a string input takes text (onnxruntime would store str(b"a"),
        # "b'a'", and OpenVINO refuses bytes objects).
        if have.kind != "O":
            raise refused
        try:
            return np.array(
                [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in arr.ravel()],
                dtype=object,
            ).reshape(arr.shape)
        except UnicodeDecodeError as exc:
            raise InvalidArgument(f"{what}: BYTES element is not UTF-8 ({exc})") from None
    if have == want:
        return arr
    if want.kind == "f":
        if have.kind not in "biuf":
            raise refused
        return arr.astype(want)
    if want.kind in "iu":
        if have.kind not in "biu":
            raise refused
        if arr.size and not np.can_cast(have, want):
            info = np.iinfo(want)
            lo, hi = arr.min(), arr.max()
            if lo < info.min or hi > info.max:
                raise InvalidArgument(f"{what}: values [{lo}, {hi}] do not fit the model's {port.declared}")
        return arr.astype(want)
    raise refused


def v2_name(dtype: np.dtype[Any]) -> str:
    """The V2 datatype of ``dtype`` for a message, or numpy's name when V2 has none."""
    try:
        return datatype_for(dtype)
    except MeshError:
        return str(dtype)
