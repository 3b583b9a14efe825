"""BENCHMARKS.md's ``mesh-bench`` blocks: find them, replace their bodies, write the file safely.

A block is the text between ``<!-- mesh-bench:begin NAME -->`` and ``<!-- mesh-bench:end NAME -->``
(each marker alone on its line). Only block bodies are rewritten; everything outside the markers is
kept byte for byte (line endings included), so the hand-written prose around the tables survives
every run. A block whose markers are missing is added at the end of the section
``## Standard suite (mesh-bench)``, which is created before the router notes if need be. Markdown
headings inside fenced code or inside blocks are not taken for section boundaries.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

SECTION = "## Standard suite (mesh-bench)"
SECTION_BEFORE = "## Notes for whoever changes the router"
SECTION_INTRO = ("Written by `mesh-bench` (`loadtest/bench.py`): the last results of the standard suite, one "
                 "block per scenario between `mesh-bench` markers, rewritten on each run. Text outside the "
                 "markers is left alone, so blocks can be moved and annotated.")
TITLES = {"summary": "Last run"}
_MARKER = re.compile(r"^<!-- mesh-bench:(begin|end) (\S+) -->[ \t]*(?=\r?$)", re.M)


class BenchError(Exception):
    """A problem of mesh-bench itself (options, budget, the benchmarks file): one line, exit 2."""


def find_blocks(text: str) -> dict[str, tuple[int, int]]:
    """name -> (end of its begin marker, start of its end marker); BenchError if markers are malformed."""
    blocks: dict[str, tuple[int, int]] = {}
    open_name, open_at = "", 0
    for m in _MARKER.finditer(text):
        kind, name = m.groups()
        if kind == "begin":
            if open_name:
                raise BenchError(f"block {name!r} begins inside block {open_name!r}")
            if name in blocks:
                raise BenchError(f"block {name!r} appears twice")
            open_name, open_at = name, m.end()
        else:
            if name != open_name:
                raise BenchError(f"end marker of block {name!r} without its begin marker")
            blocks[name] = (open_at, m.start())
            open_name = ""
    if open_name:
        raise BenchError(f"block {open_name!r} has no end marker")
    return blocks


def apply_blocks(text: str, blocks: Mapping[str, str]) -> str:
    """Put each body between its markers, in order; a block without markers is added at the end of
    the suite's section (created if need be). Text outside the markers is kept byte for byte."""
    for name, body in blocks.items():
        spans = find_blocks(text)
        if name in spans:
            start, end = spans[name]
            text = text[:start] + "\n" + body.strip("\n") + "\n" + text[end:]
        else:
            text = _append_block(text, name, body)
    return text


def _append_block(text: str, name: str, body: str) -> str:
    if _heading_at(text, SECTION) is None:
        text = _add_section(text)
    at = _section_end(text, _heading_at(text, SECTION) or 0)
    before, after = text[:at], text[at:]
    block = (f"### {TITLES.get(name, name)}\n\n<!-- mesh-bench:begin {name} -->\n{body.strip(chr(10))}\n"
             f"<!-- mesh-bench:end {name} -->\n")
    return before + _separator(before) + block + ("\n" if after else "") + after


def _add_section(text: str) -> str:
    section = f"{SECTION}\n\n{SECTION_INTRO}\n"
    at = _heading_at(text, SECTION_BEFORE)
    if at is None:
        return text + _separator(text) + section
    return text[:at] + section + "\n" + text[at:]


def _separator(before: str) -> str:
    """What to add after ``before`` so that the next thing starts a paragraph of its own."""
    if not before or before.endswith("\n\n"):
        return ""
    return "\n" if before.endswith("\n") else "\n\n"


def _outside_lines(text: str) -> Iterator[tuple[int, str]]:
    """(offset, line) of the lines outside fenced code and outside mesh-bench blocks."""
    offset, fenced, in_block = 0, False, False
    for line in text.splitlines(keepends=True):
        bare = line.rstrip("\r\n")
        marker = _MARKER.match(bare)
        if marker:
            in_block = marker.group(1) == "begin"
        elif not in_block:
            if bare.lstrip().startswith("```"):
                fenced = not fenced
            elif not fenced:
                yield offset, bare
        offset += len(line)


def _heading_at(text: str, heading: str) -> int | None:
    return next((at for at, line in _outside_lines(text) if line.rstrip() == heading), None)


def _section_end(text: str, start: int) -> int:
    """Offset of the first level-1 or level-2 heading after the one at ``start`` (or the end)."""
    for at, line in _outside_lines(text):
        if at > start and (line.startswith("## ") or line.startswith("# ")):
            return at
    return len(text)


def read_text(path: Path) -> str:
    try:
        with open(path, encoding="utf-8", newline="") as f:  # newline="": keep the bytes as they are
            return f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise BenchError(f"cannot read {path}: {one_line(err)}") from None


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
