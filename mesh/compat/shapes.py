"""Checking parsed YAML against the shapes a configuration expects, as viper and mapstructure read it:
keys case-insensitive, ``"8033"`` and ``"true"`` taken for a number and a boolean.

Each check is ``check(path, value, reader)``: it returns the value checked (and converted), or raises
InvalidArgument naming the key (``restProxy.port``) and the type expected. Keys it does not know go to
``reader.warnings``. Checks go only as deep as their shape, and say what a wrong value is (``a list``)
rather than print it: a value may be an alias bomb, small as text and huge as a tree.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from mesh.errors import InvalidArgument


class Reader:
    """What one read of a document found besides its values: warnings, (key, text)."""

    def __init__(self) -> None:
        self.warnings: list[tuple[str, str]] = []

    def unknown(self, path: str, name: str, known: list[str]) -> None:
        """Key ``name`` of the mapping at ``path`` is none of ``known``: a typo of one, perhaps."""
        lowered = [k.lower() for k in known]
        near = difflib.get_close_matches(name.lower(), lowered, n=1, cutoff=0.75)
        prefix = f"{path}." if path else ""
        hint = f" (did you mean {prefix}{known[lowered.index(near[0])]}?)" if near else ""
        self.warnings.append((prefix + safe(name), f"unknown key, ignored{hint}"))


Check = Callable[[str, Any, Reader], Any]


def wrong(path: str, expected: str, value: Any) -> InvalidArgument:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping"}.get(type(value), type(value).__name__)
    return InvalidArgument(f"{path}: expected {expected}, got {kind}")


def boolean(path: str, value: Any, reader: Reader) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise wrong(path, "true or false", value)


def integer(low: int, high: int) -> Check:
    def check(path: str, value: Any, reader: Reader) -> int:
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value.strip())
        if not isinstance(value, int) or isinstance(value, bool):
            raise wrong(path, f"an integer from {low} to {high}", value)
        if not low <= value <= high:
            raise InvalidArgument(f"{path}: expected an integer from {low} to {high}, got {value}")
        return value
    return check


def string(path: str, value: Any, reader: Reader) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise wrong(path, "a string", value)


def string_list(path: str, value: Any, reader: Reader) -> list[str]:
    if not isinstance(value, list):
        raise wrong(path, "a list of strings", value)
    return [string(f"{path}[{i}]", v, reader) for i, v in enumerate(value)]


def string_map(path: str, value: Any, reader: Reader) -> dict[str, str]:
    if not isinstance(value, dict):
        raise wrong(path, "a mapping of strings", value)
    return {str(k): string(f"{path}.{safe(k)}", v, reader) for k, v in value.items()}


def entries(path: str, value: Any, names: Mapping[str, Any], reader: Reader) -> Iterator[tuple[str, str, Any]]:
    """(name as ``names`` spells it, path as the input does, value) for each key of the mapping
    ``value`` that ``names`` holds, case-insensitively; others are warned about, a key given twice
    (``port`` and ``Port``) is an error. An empty value (``metrics:``) has no entries."""
    if value is None:
        return
    if not isinstance(value, dict):
        raise wrong(path or "the configuration", "a mapping", value)
    by_lower = {n.lower(): n for n in names}
    seen: dict[str, str] = {}
    for raw, sub in value.items():
        spelled = f"{path}.{safe(raw)}" if path else safe(raw)
        name = by_lower.get(str(raw).lower())
        if name is None:
            reader.unknown(path, str(raw), list(names))
            continue
        if name in seen:
            raise InvalidArgument(f"{spelled}: given twice (also as {seen[name]}; keys are case-insensitive)")
        seen[name] = spelled
        yield name, spelled, sub


def fields(**shapes: Check) -> Check:
    """A mapping with these keys, each of its shape, all optional."""
    def check(path: str, value: Any, reader: Reader) -> dict[str, Any]:
        return {name: shapes[name](spelled, sub, reader) for name, spelled, sub in entries(path, value, shapes, reader)}
    return check


def items(shape: Check) -> Check:
    """A list whose items are each of ``shape``."""
    def check(path: str, value: Any, reader: Reader) -> list[Any]:
        if not isinstance(value, list):
            raise wrong(path, "a list", value)
        return [shape(f"{path}[{i}]", v, reader) for i, v in enumerate(value)]
    return check


def show(value: Any) -> str:
    """A checked value for a message or a comment: JSON (ASCII, escaped), cut at 80 characters."""
    if isinstance(value, list | dict):
        return f"a {'list' if isinstance(value, list) else 'mapping'} of {len(value)}"
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def safe(key: Any) -> str:
    """A key of the input as it may be printed: as written if printable and short, else quoted."""
    text = str(key)
    return text if text.isprintable() and len(text) <= 80 else repr(text[:80])
