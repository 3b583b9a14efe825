"""Measure the memory a Python object graph holds: the footprint of a pickled (sklearn) model.

A fitted estimator is a tree of plain Python objects whose bulk lives in numpy arrays: coefficient
vectors, split thresholds, the node arrays of decision trees. :func:`deep_nbytes` walks that graph
once and sums

* numpy arrays: header plus data; a view is charged to the array that owns its memory, once, so a
  pipeline that shares an array between two steps is not counted twice;
* containers (dict, list, tuple, set) and scalars: ``sys.getsizeof``;
* objects: ``sys.getsizeof`` plus their ``__dict__`` and ``__slots__``; extension types with neither
  (scikit-learn's Cython ``Tree``) are read through ``__getstate__()``, which for ``Tree`` returns
  views of its node and value arrays, so those are measured without copying.

Classes, functions and modules are shared with the whole process and are not charged to a model.
The result is a lower bound of what the model costs (allocator overhead and caches are missing);
the runtime takes the larger of it and the process's RSS growth during the load.
"""

from __future__ import annotations

import sys
import types
from typing import Any

import numpy as np

_SHARED = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType)
_ATOMS = (str, bytes, bytearray, int, float, complex, bool)


def deep_nbytes(root: Any) -> int:
    """The bytes held by ``root`` and everything reachable from it (see the module docstring)."""
    # id -> object: holding the objects keeps temporaries (``__getstate__`` results) alive, so
    # that their ids cannot be reused by a later object and make it look already counted.
    seen: dict[int, Any] = {}
    stack: list[Any] = [root]
    total = 0
    while stack:
        obj = stack.pop()
        if id(obj) in seen or obj is None or isinstance(obj, _SHARED):
            continue
        seen[id(obj)] = obj
        if isinstance(obj, np.ndarray):
            total += _array_nbytes(obj, stack)
            continue
        total += sys.getsizeof(obj)
        if isinstance(obj, _ATOMS):
            continue
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
            continue
        if isinstance(obj, list | tuple | set | frozenset):
            stack.extend(obj)
            continue
        stack.extend(_attributes(obj))
    return total


def _array_nbytes(arr: np.ndarray, stack: list[Any]) -> int:
    base = arr.base
    if isinstance(base, np.ndarray):
        # A view: charge the owner (once, through ``seen``) and only this header here.
        stack.append(base)
        return sys.getsizeof(arr)
    if arr.dtype.hasobject:
        stack.extend(arr.flat)
    if base is None:
        return sys.getsizeof(arr)  # includes the data the array owns
    # Memory owned by something else (a Cython Tree, a bytes object): count the data here.
    return sys.getsizeof(arr) + arr.nbytes


def _attributes(obj: Any) -> list[Any]:
    found: list[Any] = []
    d = getattr(obj, "__dict__", None)
    if isinstance(d, dict):
        found.append(d)
    for cls in type(obj).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if name not in ("__dict__", "__weakref__") and hasattr(obj, name):
                found.append(getattr(obj, name))
    if not found and not isinstance(obj, np.generic):
        try:
            state = obj.__getstate__()
        except Exception:  # unpicklable internals (locks, handles): nothing more to measure
            return found
        if state is not None:
            found.append(state)
    return found
