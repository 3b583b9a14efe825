"""Switch conditions: a documented subset of GJSON paths, compiled once, evaluated safely.

KServe's router runs a Switch step when ``gjson.GetBytes(input, condition).Exists()``; a mesh
graph does the same on the JSON form of the node's input V2 request (``{"id", "parameters",
"inputs": [{"name", "datatype", "shape", "data", "parameters"}], "outputs": [...]}``, see
:mod:`mesh.graphs.v2`), with :func:`compile_condition` at definition and
:meth:`Condition.matches` per request. A path that does not exist, and only that, does not match;
a JSON ``null`` that is there exists (GJSON's rule).

Supported (GJSON's meaning unless said otherwise):

- keys separated by ``.``: ``parameters.tenant``; ``\\`` escapes the next character
  (``fav\\.movie`` is the key ``fav.movie``); ``*`` and ``?`` in a key match any characters / one
  character, and the first key in document order that matches is taken;
- an array index: ``inputs.0.name``;
- ``#``: an array's length at the end of a path (``inputs.#``); before more path, that path on
  every element (``inputs.#.name`` is the list of names; it exists even when the list is empty);
- queries: ``#(path op value)`` is the first element that matches, ``#(path op value)#`` the list
  of all that match (it exists even when none does, as in GJSON: use the first form in a
  condition); ``path`` may be empty (the element itself), contain nested queries
  (``#(tags.#(=="a"))``), or stand alone without operator (the element has that path). Operators:
  ``==`` (or ``=``), ``!=``, ``<``, ``<=``, ``>``, ``>=``, ``%`` (like: a glob with ``*`` and
  ``?``), ``!%`` (not like). The value is a JSON string (``"dog"``) or bare text (``dog``, ``10``,
  ``*red*``); it compares with a string element as text (ordering by code point), with a number
  as a number (text that is no number never matches a number: GJSON would compare with 0), with
  ``true``/``false`` as GJSON does; objects, arrays and nulls match only the operator-less form.
  ``~true``, ``~false``, ``~null``, ``~*`` compare truthiness as GJSON does;
- ``@this`` (the current value), and ``[path, path]``, an array of the values of those paths that
  exist (KServe's samples use ``[@this].#(source==client)`` to query the whole document).

Refused at definition, with the column: GJSON's other modifiers (``@reverse``, ``@keys``, ...;
``@name`` that is no GJSON modifier is a key, as in GJSON),
object multipaths ``{...}``, pipes ``|``, literals ``!true``, JSON Lines ``..``, the old query
syntax ``#[...]``, ``~`` values other than the four above, an empty key or value, unbalanced
brackets or quotes.

Safety: no ``eval``, no regular expression; a glob (:mod:`mesh.graphs.glob`) is compiled to
literal segments matched left to right (the leftmost match of each segment between two ``*`` is
always a right choice, so nothing backtracks): a match costs O(text x pattern) at worst and fails
loudly past a work bound.
Paths have at most 32 array operations (``#``, queries, and each path of a multipath ``[...]``: a
multipath of k paths counts k, since each path is walked) and 8 levels of nesting, so evaluation
recursion is bounded whatever the document.

Work: a bound on the text is no bound on the work (``#`` maps the rest of the path over every
element, a multipath walks each of its paths, so ``[@this,@this].#.[@this,@this].#...`` doubles per
level). So each evaluation (:meth:`Condition.matches`) has one work budget, :data:`MAX_WORK` units,
shared by every path, multipath, query and glob match in it: a unit is a path component applied to a
value, an element a ``#`` or a query visits, an element of a tensor's decoded data, or a glob
check. Past it the evaluation fails loudly (InvalidArgument, which the graph names with its step),
never silently "no match". A million units is some tenths of a second of one core at worst;
the conditions KServe's samples use cost tens.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mesh.errors import InvalidArgument
from mesh.graphs.glob import Budget, Glob

__all__ = ["MAX_WORK", "Budget", "Condition", "Glob", "Lazy", "compile_condition"]

MAX_ARRAY_OPS = 32
MAX_WORK = 1_000_000  # work units of one condition evaluation (module docstring, "Work")
MAX_NESTING = 8
_OPS = ("==", "!=", "<=", ">=", "!%", "=", "<", ">", "%")
_TILDE = ("true", "false", "null", "*")
# GJSON's built-in modifiers (tidwall/gjson ``modifiers``): refused but '@this'.
_GJSON_MODIFIERS = frozenset({"pretty", "ugly", "reverse", "this", "flatten", "join", "valid", "keys", "values",
                              "tostr", "fromstr", "group", "dig"})


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


class Lazy:
    """A document value computed on first use (a tensor's data: decoded only if a path reaches it)."""

    __slots__ = ("_make", "_value")

    def __init__(self, make: Callable[[], Any]) -> None:
        self._make: Callable[[], Any] | None = make
        self._value: Any = None

    def value(self) -> Any:
        if self._make is not None:
            self._value = self._make()
            self._make = None
        return self._value


# ---------------------------------------------------------------------------------------------
# the compiled path


@dataclass(frozen=True, slots=True)
class _Key:
    key: str
    glob: Glob | None = None   # set when the key has an unescaped * or ?


@dataclass(frozen=True, slots=True)
class _Hash:
    pass                       # '#': the length (last component) or a map over the elements


@dataclass(frozen=True, slots=True)
class _This:
    pass


@dataclass(frozen=True, slots=True)
class _Multi:
    paths: tuple[tuple[Any, ...], ...]


@dataclass(frozen=True, slots=True)
class _Query:
    path: tuple[Any, ...]      # empty: the element itself
    op: str                    # "" (exists), "=", "!=", "<", "<=", ">", ">=", "%", "!%"
    text: str                  # the value as text (quotes removed)
    number: float | None       # the value as a number, if it is one
    glob: Glob | None          # for % and !%
    tilde: str                 # "", or true/false/null/* for ~values
    all: bool                  # '#(...)#'




class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.array_ops = 0
        self.components = 0  # path components compiled: what a compiled condition costs in memory

    def fail(self, pos: int, what: str) -> InvalidArgument:
        return InvalidArgument(f"column {pos + 1}: {what}")

    def path(self, pos: int, end: int, depth: int) -> tuple[Any, ...]:
        """Components of text[pos:end]."""
        if depth > MAX_NESTING:
            raise self.fail(pos, f"nested more than {MAX_NESTING} levels deep")
        if pos >= end:
            raise self.fail(pos, "empty path")
        text = self.text
        if depth == 0 and text.startswith("..", pos):
            raise self.fail(pos, "JSON Lines paths ('..') are not supported")
        if text[pos] == "!":
            raise self.fail(pos, "literals ('!true', ...) are not supported")
        comps: list[Any] = []
        while True:
            comp, pos = self.component(pos, end, depth)
            comps.append(comp)
            self.components += 1
            if pos == end:
                return tuple(comps)
            # component() stops only at '.' or end
            pos += 1
            if pos == end:
                raise self.fail(pos - 1, "the path ends with '.'")

    def _count(self, pos: int) -> None:
        self.array_ops += 1
        if self.array_ops > MAX_ARRAY_OPS:
            raise self.fail(pos, f"more than {MAX_ARRAY_OPS} array operations ('#', queries, [...])")

    def component(self, pos: int, end: int, depth: int) -> tuple[Any, int]:
        text = self.text
        c = text[pos]
        if c == ".":
            raise self.fail(pos, "empty key (two dots, or a leading dot)")
        if c == "|":
            raise self.fail(pos, "pipes ('|') are not supported; use '.'")
        if c == "{":
            raise self.fail(pos, "object multipaths ('{...}') are not supported")
        if c == "@":
            stop = pos + 1
            while stop < end and text[stop] not in ".|:":
                stop += 1
            name = text[pos + 1:stop]
            # GJSON reads '@name' as a modifier only if it knows the name; else it is a key.
            if name in _GJSON_MODIFIERS:
                if name != "this":
                    raise self.fail(pos, f"the modifier '@{name}' is not supported; only '@this' is")
                if stop < end and text[stop] != ".":
                    raise self.fail(stop, f"unexpected {text[stop]!r} after '@this'")
                return _This(), stop
        if c == "[":
            close = self.closing(pos, end, "[", "]")
            paths = []
            start = pos + 1
            for cut in [*self.splits(start, close), close]:
                self._count(start)  # each path of a multipath is walked: each counts (module docstring)
                paths.append(self.path(start, cut, depth + 1))
                start = cut + 1
            stop = close + 1
            if stop < end and text[stop] != ".":
                raise self.fail(stop, f"expected '.' or the end after ']', got {text[stop]!r}")
            return _Multi(tuple(paths)), stop
        if c == "#":
            self._count(pos)
            if pos + 1 == end or text[pos + 1] == ".":
                return _Hash(), pos + 1
            if text[pos + 1] == "(":
                return self.query(pos, end, depth)
            if text[pos + 1] == "[":
                raise self.fail(pos, "the old query syntax '#[...]' is not supported; write '#(...)'")
            raise self.fail(pos + 1, f"expected '.', '(' or the end after '#', got {text[pos + 1]!r}")
        return self.key(pos, end)

    def key(self, pos: int, end: int) -> tuple[_Key, int]:
        text = self.text
        chars: list[str] = []
        wild = False
        raw: list[str] = []   # the key with escapes kept, for the glob
        i = pos
        while i < end:
            c = text[i]
            if c == "\\":
                if i + 1 >= end:
                    raise self.fail(i, "'\\' at the end of a key escapes nothing")
                chars.append(text[i + 1])
                raw.append(text[i:i + 2])
                i += 2
                continue
            if c == ".":
                break
            if c == "|":
                raise self.fail(i, "pipes ('|') are not supported; use '.'")
            if c in "*?":
                wild = True
            chars.append(c)
            raw.append(c)
            i += 1
        if not chars:
            raise self.fail(pos, "empty key")
        return _Key("".join(chars), Glob("".join(raw)) if wild else None), i

    def closing(self, pos: int, end: int, open_: str, close: str) -> int:
        """The index of the bracket closing the one at ``pos`` (quotes and escapes skipped)."""
        text = self.text
        depth = 0
        i = pos
        while i < end:
            c = text[i]
            if c == "\\":
                i += 2
                continue
            if c == '"':
                i = self.string_end(i, end)
            elif c in "([":
                depth += 1
            elif c in ")]":
                depth -= 1
                if depth == 0:
                    if c != close:
                        raise self.fail(i, f"{c!r} closes the {open_!r} at column {pos + 1}; expected {close!r}")
                    return i
            i += 1
        raise self.fail(pos, f"{open_!r} is not closed")

    def string_end(self, pos: int, end: int) -> int:
        i = pos + 1
        while i < end:
            if self.text[i] == "\\":
                i += 2
                continue
            if self.text[i] == '"':
                return i
            i += 1
        raise self.fail(pos, "the string is not closed")

    def splits(self, start: int, stop: int) -> list[int]:
        """Positions of the top-level commas in text[start:stop]."""
        out = []
        i = start
        text = self.text
        while i < stop:
            c = text[i]
            if c == "\\":
                i += 2
                continue
            if c == '"':
                i = self.string_end(i, stop)
            elif c in "([{":
                i = self.closing(i, stop, c, {"(": ")", "[": "]", "{": "}"}[c])
            elif c == ",":
                out.append(i)
            i += 1
        return out

    def query(self, pos: int, end: int, depth: int) -> tuple[_Query, int]:
        text = self.text
        open_ = pos + 1
        close = self.closing(open_, end, "(", ")")
        # The operator is the first of ! = < > % at the query's own level (GJSON's rule).
        op_at = -1
        i = open_ + 1
        level = 0
        while i < close:
            c = text[i]
            if c == "\\":
                i += 2
                continue
            if c == '"':
                i = self.string_end(i, close)
            elif c in "([":
                level += 1
            elif c in ")]":
                level -= 1
            elif level == 0 and c in "!=<>%":
                op_at = i
                break
            i += 1
        every = close + 1 < end and text[close + 1] == "#"
        stop = close + 2 if every else close + 1
        if stop < end and text[stop] != ".":
            raise self.fail(stop, f"expected '.' or the end after the query, got {text[stop]!r}")
        path_end = op_at if op_at >= 0 else close
        lo, hi = _trim(text, open_ + 1, path_end)
        path = self.path(lo, hi, depth + 1) if lo < hi else ()
        if op_at < 0:
            if not path:
                raise self.fail(pos, "an empty query '#()'")
            return _Query(path, "", "", None, None, "", every), stop
        op = next((o for o in _OPS if text.startswith(o, op_at)), "")
        if not op:
            raise self.fail(op_at, f"unknown operator at {text[op_at:op_at + 2]!r}; use ==, !=, <, <=, >, >=, % "
                                   f"or !%")
        vlo, vhi = _trim(text, op_at + len(op), close)
        if op == "==":
            op = "="
        if vlo >= vhi:
            raise self.fail(close, f"no value after the operator {op!r}")
        value = text[vlo:vhi]
        tilde = ""
        if value[0] == '"':
            if self.string_end(vlo, vhi) != vhi - 1:
                raise self.fail(vlo, "text after the quoted value")
            try:
                value = json.loads(value)
            except ValueError:
                raise self.fail(vlo, "the quoted value is not a JSON string") from None
        elif value[0] == "~":
            if value[1:] not in _TILDE:
                raise self.fail(vlo, f"unknown value {value!r}; '~' takes true, false, null or *")
            tilde = value[1:]
            value = "true"
        number: float | None
        try:
            number = float(value)
            if math.isnan(number):
                number = None
        except ValueError:
            number = None
        glob = Glob(value) if op in ("%", "!%") else None
        return _Query(path, op, value, number, glob, tilde, every), stop


def _trim(text: str, lo: int, hi: int) -> tuple[int, int]:
    while lo < hi and text[lo] <= " ":
        lo += 1
    while hi > lo and text[hi - 1] <= " ":
        hi -= 1
    return lo, hi


# ---------------------------------------------------------------------------------------------
# evaluation


def _get(value: Any, comps: tuple[Any, ...], i: int, budget: Budget) -> Any:
    """The value at comps[i:] from ``value`` (already resolved), or MISSING; every component applied
    and every element visited is charged to ``budget`` (module docstring, "Work")."""
    n = len(comps)
    while i < n:
        comp = comps[i]
        i += 1
        value = _resolved(value, budget)
        budget.spend(1)
        if isinstance(comp, _Key):
            if isinstance(value, dict):
                if comp.glob is None:
                    value = value.get(comp.key, MISSING)
                else:
                    budget.spend(len(value))
                    value = next((v for k, v in value.items() if comp.glob.match(k, budget)), MISSING)
            elif isinstance(value, list) and comp.glob is None and comp.key.isdigit() and comp.key.isascii():
                idx = int(comp.key)
                value = value[idx] if idx < len(value) else MISSING
            else:
                return MISSING
        elif isinstance(comp, _This):
            continue
        elif isinstance(comp, _Hash):
            if not isinstance(value, list):
                return MISSING
            if i == n:
                return len(value)
            budget.spend(len(value))
            out = []
            for elem in value:
                got = _get(elem, comps, i, budget)
                if got is not MISSING:
                    out.append(got)
            return out
        elif isinstance(comp, _Multi):
            value = [got for got in (_get(value, p, 0, budget) for p in comp.paths) if got is not MISSING]
        else:  # _Query
            if not isinstance(value, list):
                return MISSING
            budget.spend(len(value))
            if not comp.all:
                hit = next((e for e in value if _query_matches(comp, e, budget)), MISSING)
                if hit is MISSING:
                    return MISSING
                value = hit
                continue
            matched = [e for e in value if _query_matches(comp, e, budget)]
            if i == n:
                return matched
            out = []
            for elem in matched:
                got = _get(elem, comps, i, budget)
                if got is not MISSING:
                    out.append(got)
            return out
    return _resolved(value, budget)


def _resolved(value: Any, budget: Budget) -> Any:
    """``value`` with a :class:`Lazy` computed; a decoded list (a tensor's data) is charged by its
    length, so the tensors one evaluation decodes are bounded together, not each alone."""
    if isinstance(value, Lazy):
        value = value.value()
        if isinstance(value, list):
            budget.spend(len(value))
    return value


def _truthy(value: Any, which: str) -> bool:
    """GJSON's ~true / ~false / ~null / ~* on a value (MISSING included)."""
    if which == "*":
        return value is not MISSING
    if value is MISSING or value is None:
        # GJSON: a missing value has type Null, which is null-ish and false-ish.
        return which != "true"
    if which == "null":
        return False
    if isinstance(value, bool):
        return value if which == "true" else not value
    if isinstance(value, str):
        parsed = {"1": True, "t": True, "true": True, "0": False, "f": False, "false": False}.get(value.lower())
        return parsed is not None and parsed == (which == "true")
    if isinstance(value, (int, float)):
        return (value != 0) if which == "true" else (value == 0)
    return False


def _query_matches(q: _Query, elem: Any, budget: Budget) -> bool:
    value = _get(elem, q.path, 0, budget) if q.path else _resolved(elem, budget)
    if q.tilde:
        value = _truthy(value, q.tilde)
    if value is MISSING:
        return False
    op = q.op
    if not op:
        return True
    if isinstance(value, bool):
        want = q.text
        if value:
            return {"=": want == "true", "!=": want != "true", ">": want == "false", ">=": True}.get(op, False)
        return {"=": want == "false", "!=": want != "false", "<": want == "true", "<=": True}.get(op, False)
    if isinstance(value, str):
        if op == "%" or op == "!%":
            assert q.glob is not None
            return q.glob.match(value, budget) == (op == "%")
        return _compare(value, op, q.text)
    if isinstance(value, (int, float)):
        if q.number is None or op in ("%", "!%"):
            return False
        return _compare(value, op, q.number)
    return False


def _compare(a: Any, op: str, b: Any) -> bool:
    if op == "=":
        return bool(a == b)
    if op == "!=":
        return bool(a != b)
    if op == "<":
        return bool(a < b)
    if op == "<=":
        return bool(a <= b)
    if op == ">":
        return bool(a > b)
    return bool(a >= b)


@dataclass(frozen=True, slots=True)
class Condition:
    """A compiled condition; ``text`` is what was written."""

    text: str
    path: tuple[Any, ...]
    size: int = 1  # path components, nested ones included (spec.MAX_COMPONENTS bounds a graph's sum)

    def get(self, doc: Any, budget: Budget | None = None) -> Any:
        """The value the path selects (MISSING if none): for tests and diagnostics."""
        return _get(doc, self.path, 0, budget if budget is not None else self.budget())

    def matches(self, doc: Any, budget: Budget | None = None) -> bool:
        """KServe's ``gjson.Get(doc, condition).Exists()`` on a JSON-like document (dicts, lists,
        str, int, float, bool, None, :class:`Lazy`), within one work budget (a fresh one of
        :data:`MAX_WORK` units unless given): InvalidArgument past it."""
        return _get(doc, self.path, 0, budget if budget is not None else self.budget()) is not MISSING

    def budget(self, limit: int = MAX_WORK) -> Budget:
        """A work budget for one evaluation, whose error names this condition's cost."""
        return Budget(limit, "the condition")


def compile_condition(text: str) -> Condition:
    """The compiled condition, or InvalidArgument naming the column (from 1) and the problem."""
    if not isinstance(text, str) or not text:
        raise InvalidArgument("the condition is empty")
    parser = _Parser(text)
    path = parser.path(0, len(text), 0)
    return Condition(text=text, path=path, size=parser.components)
