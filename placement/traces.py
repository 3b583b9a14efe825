"""Trace files: our request trace CSV, and the Azure Functions 2019 per-minute count layout.

**Request traces** are CSV with the header ``time_s,model_id,size_bytes,load_ms,infer_ms``, one
``Request`` per row, in time order. It is the ``(t, model_id, size_bytes, load_cost_ms)`` format of the
reference notes (peers.md 5.3) plus ``infer_ms``, and a superset of the cache-anchor traces
(``time_s,model_id,size_bytes,load_ms``): ``infer_ms`` is optional on reading (0.0 when the column is
absent), so the anchors' files load unchanged, and always written, so one writer needs no look-ahead
at the requests it streams. Columns may come in any order; an unknown or repeated column is an error,
because a misspelt ``infer_ms`` silently read as 0 would skew every latency figure of a replay.

Floats are written with ``repr`` (the csv module's ``str``), the shortest text that reads back to the
same double, so ``write_trace`` then ``load_trace`` is an exact round trip.

Reading validates every row (times finite, >= 0 and non-decreasing; ``size_bytes`` an integer >= 0;
``load_ms`` and ``infer_ms`` finite and >= 0; a non-empty ``model_id``) because simulators assume all
of it and fail far from the cause otherwise. A bad row raises ``TraceError`` naming the file, the line
and the problem. The check costs one chained comparison per row on the fast path; the reason is only
worked out once a row has failed it. Model ids are interned (one ``str`` object per distinct id), which
saves memory on million-row traces and makes the simulator's dict lookups hit by identity.

**Azure Functions 2019** (``invocations_per_function_md.anon.dNN.csv``, Shahrad et al., ATC'20): the
columns ``HashOwner,HashApp,HashFunction,Trigger`` then ``1..1440``, one row per function per day, each
number the invocations in that minute. The dataset cannot be downloaded here, so the writer exists to
make fixtures in the same layout (``generators.synthetic_azure_counts``) and the reader is tested on
them; it follows the published layout, which other parsers of the real files agree on.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
from collections.abc import Iterable, Iterator
from typing import IO, NamedTuple

import numpy as np
import numpy.typing as npt

from placement.request import Request

__all__ = [
    "AZURE_HEADER",
    "MINUTES_PER_DAY",
    "TRACE_COLUMNS",
    "AzureFunctionCounts",
    "TraceError",
    "TraceSource",
    "load_trace",
    "read_azure_counts",
    "read_trace",
    "write_azure_counts",
    "write_trace",
]

TRACE_COLUMNS = ("time_s", "model_id", "size_bytes", "load_ms", "infer_ms")
_REQUIRED = TRACE_COLUMNS[:4]
MINUTES_PER_DAY = 1440
AZURE_HEADER = ("HashOwner", "HashApp", "HashFunction", "Trigger", *map(str, range(1, MINUTES_PER_DAY + 1)))

# A path, or an already open text file (opened with newline="", as the csv module wants).
TraceSource = str | os.PathLike[str] | IO[str]

_INF = math.inf


class TraceError(ValueError):
    """A trace file that cannot be read: ``path``, the 1-based ``line`` (0: the file as a whole), ``problem``."""

    def __init__(self, path: str, line: int, problem: str) -> None:
        super().__init__(f"{path}:{line}: {problem}" if line else f"{path}: {problem}")
        self.path = path
        self.line = line
        self.problem = problem


class AzureFunctionCounts(NamedTuple):
    """One row of the Azure Functions 2019 invocation counts: a function and its per-minute counts.

    ``function`` (HashFunction) identifies the function within a day's file; ``owner``, ``app`` and
    ``trigger`` are kept so that a row can be written back in the same layout. ``counts`` has one int32
    per minute of the day (int32 halves the memory of a full day's ~46,000 rows; no minute comes near
    2**31 invocations).
    """

    owner: str
    app: str
    function: str
    trigger: str
    counts: npt.NDArray[np.int32]


@contextlib.contextmanager
def _opened(source: TraceSource, mode: str) -> Iterator[tuple[IO[str], str]]:
    if isinstance(source, str | os.PathLike):
        # utf-8-sig on reading: a byte-order mark (spreadsheet exports) must not become part of "time_s".
        with open(source, mode, newline="", encoding="utf-8-sig" if mode == "r" else "utf-8") as f:
            yield f, os.fspath(source)
    else:  # the caller owns the file and closes it
        yield source, str(getattr(source, "name", "<stream>"))


# -- request traces -------------------------------------------------------------------------------


def write_trace(dest: TraceSource, requests: Iterable[Request]) -> int:
    """Write ``requests`` as a trace CSV to ``dest`` (a path, or a text file); returns how many rows.

    Streams: ``requests`` may be a generator of any length. The requests are trusted to be in time
    order (``read_trace`` checks it); a ``Request`` is a tuple in column order, so csv writes it as is.
    """
    count = 0

    def counted() -> Iterator[Request]:
        nonlocal count
        for r in requests:
            count += 1
            yield r

    with _opened(dest, "w") as (f, _):
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(TRACE_COLUMNS)
        writer.writerows(counted())
    return count


def _columns(header: list[str], name: str) -> tuple[int, int, int, int, int]:
    seen: dict[str, int] = {}
    for i, col in enumerate(header):
        col = col.strip()
        if col not in TRACE_COLUMNS:
            raise TraceError(name, 1, f"unknown column {col!r}; expected {','.join(TRACE_COLUMNS)}")
        if col in seen:
            raise TraceError(name, 1, f"column {col!r} appears twice")
        seen[col] = i
    missing = [c for c in _REQUIRED if c not in seen]
    if missing:
        raise TraceError(name, 1, f"missing column(s) {', '.join(missing)}; header is {','.join(header)!r}")
    return seen["time_s"], seen["model_id"], seen["size_bytes"], seen["load_ms"], seen.get("infer_ms", -1)


def _problem(row: list[str], width: int, cols: tuple[int, int, int, int, int], prev: float) -> str:
    """Why ``row`` failed the fast path's check (only called once a row has failed it)."""
    if len(row) != width:
        return f"expected {width} fields, got {len(row)}"
    it, im, isz, il, ii = cols
    try:
        t = float(row[it])
    except ValueError:
        return f"time_s {row[it]!r} is not a number"
    if not math.isfinite(t) or t < 0.0:
        return f"time_s {row[it]!r} must be finite and >= 0"
    if t < prev:
        return f"time_s {row[it]} is before the previous row's {prev!r}: times must be non-decreasing"
    if not row[im]:
        return "model_id is empty"
    try:
        size = int(row[isz])
    except ValueError:
        return f"size_bytes {row[isz]!r} is not an integer"
    if size < 0:
        return f"size_bytes {size} is negative"
    for idx, label in ((il, "load_ms"), (ii, "infer_ms")):
        if idx < 0:
            continue
        try:
            v = float(row[idx])
        except ValueError:
            return f"{label} {row[idx]!r} is not a number"
        if not 0.0 <= v < _INF:
            return f"{label} {row[idx]!r} must be finite and >= 0"
    return "invalid row"  # unreachable unless the fast path and this diagnosis disagree


def read_trace(source: TraceSource) -> Iterator[Request]:
    """Stream the requests of a trace CSV, validating each row (see the module docstring).

    Raises ``TraceError`` for a missing or bad header and for the first bad row. The file stays open
    until the iterator is exhausted or closed.
    """
    with _opened(source, "r") as (f, name):
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise TraceError(name, 0, "empty file: expected the header " + ",".join(TRACE_COLUMNS))
        cols = _columns(header, name)
        it, im, isz, il, ii = cols
        width = len(header)
        interned: dict[str, str] = {}
        intern = interned.setdefault
        new = tuple.__new__  # skips NamedTuple's Python-level __new__: ~3x cheaper per row
        prev = 0.0
        for row in reader:
            if not row:  # a blank line (csv yields []), e.g. a trailing one
                continue
            try:
                t = float(row[it])
                model = row[im]
                size = int(row[isz])
                load = float(row[il])
                infer = float(row[ii]) if ii >= 0 else 0.0
            except (ValueError, IndexError):
                raise TraceError(name, reader.line_num, _problem(row, width, cols, prev)) from None
            # One chained check per row; NaN fails every comparison, so it cannot slip through.
            if not (
                len(row) == width
                and prev <= t < _INF
                and model
                and size >= 0
                and 0.0 <= load < _INF
                and 0.0 <= infer < _INF
            ):
                raise TraceError(name, reader.line_num, _problem(row, width, cols, prev))
            prev = t
            yield new(Request, (t, intern(model, model), size, load, infer))


def load_trace(source: TraceSource) -> list[Request]:
    """All the requests of a trace CSV, validated (``read_trace`` into a list)."""
    return list(read_trace(source))


# -- Azure Functions 2019 per-minute counts ---------------------------------------------------------


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def read_azure_counts(source: TraceSource) -> list[AzureFunctionCounts]:
    """Parse an ``invocations_per_function_md.anon.dNN.csv`` file (layout in the module docstring).

    Raises ``TraceError`` naming the line for a wrong header, a short or long row, or a count that is
    not an integer >= 0.
    """
    rows: list[AzureFunctionCounts] = []
    with _opened(source, "r") as (f, name):
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise TraceError(name, 0, "empty file: expected the Azure Functions 2019 header")
        if tuple(h.strip() for h in header) != AZURE_HEADER:
            shown = ",".join(header[:6]) + (",..." if len(header) > 6 else "")
            raise TraceError(
                name,
                1,
                f"not the Azure Functions 2019 layout (HashOwner,HashApp,HashFunction,Trigger,1..1440): {shown}",
            )
        width = len(AZURE_HEADER)
        for row in reader:
            if not row:
                continue
            if len(row) != width:
                raise TraceError(name, reader.line_num, f"expected {width} fields, got {len(row)}")
            try:
                counts = np.array(row[4:], dtype=np.int64)
            except ValueError:
                bad = next((v for v in row[4:] if not _is_int(v)), "?")
                raise TraceError(name, reader.line_num, f"count {bad!r} is not an integer") from None
            if counts.min() < 0 or counts.max() >= 2**31:
                bad_minute = int(np.argmax((counts < 0) | (counts >= 2**31))) + 1
                raise TraceError(
                    name, reader.line_num, f"count {counts[bad_minute - 1]} for minute {bad_minute} is out of range"
                )
            rows.append(AzureFunctionCounts(row[0], row[1], row[2], row[3], counts.astype(np.int32)))
    return rows


def write_azure_counts(dest: TraceSource, rows: Iterable[AzureFunctionCounts]) -> int:
    """Write ``rows`` in the Azure Functions 2019 layout; returns how many rows."""
    count = 0
    with _opened(dest, "w") as (f, _):
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(AZURE_HEADER)
        for r in rows:
            if r.counts.shape != (MINUTES_PER_DAY,):
                raise ValueError(f"function {r.function!r}: expected {MINUTES_PER_DAY} counts, got {r.counts.shape}")
            writer.writerow((r.owner, r.app, r.function, r.trigger, *r.counts.tolist()))
            count += 1
    return count
