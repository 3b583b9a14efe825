"""Glob patterns (GJSON's ``%`` "like" operator and wildcard keys), matched without backtracking.

A pattern has ``*`` (any characters), ``?`` (one character) and ``\\`` (the next character is
literal). It is compiled to the literal segments between the ``*``s; the first segment is anchored
at the start, the last at the end, and each one between is placed at its leftmost match after the
previous one. The leftmost placement is always a right choice (any later match leaves less room
for what follows), so nothing is ever retried: a match costs O(text x pattern) at worst, and
segments without ``?`` are found with ``str.find``. Past :data:`MAX_GLOB_WORK` checks a match fails
loudly (InvalidArgument) rather than silently (GJSON's matcher answers "no match" past its limit).
A condition passes its own :class:`Budget` to every match it makes, so the bound holds for the
whole evaluation, not for each string alone (many strings each under the bound add up).
No regular expression is built from the user's pattern.
"""

from __future__ import annotations

from mesh.errors import InvalidArgument

__all__ = ["MAX_GLOB_WORK", "Budget", "Glob"]

# A glob match's work (candidate positions x pattern pieces) before it gives up with an error.
MAX_GLOB_WORK = 1_000_000


class Budget:
    """Units of work left to one evaluation (a condition's, or one glob match's); ``spend`` past
    the limit raises InvalidArgument naming ``what`` and the limit."""

    __slots__ = ("left", "limit", "what")

    def __init__(self, limit: int, what: str) -> None:
        self.limit = limit
        self.left = limit
        self.what = what

    def spend(self, units: int) -> None:
        self.left -= units
        if self.left < 0:
            raise InvalidArgument(f"{self.what} took more than {self.limit:,} steps of work on this request "
                                  "(long strings, large lists or a path that multiplies); simplify it")


class Glob:
    """A ``*``/``?`` pattern as literal segments: no regex, no backtracking."""

    __slots__ = ("_pattern", "_segments", "_star")

    def __init__(self, pattern: str) -> None:
        self._pattern = pattern
        # segments between unescaped '*'; each a tuple of pieces: str literals and None for '?'
        segments: list[tuple[str | None, ...]] = []
        pieces: list[str | None] = []
        literal: list[str] = []
        i = 0
        while i < len(pattern):
            c = pattern[i]
            if c == "\\" and i + 1 < len(pattern):
                literal.append(pattern[i + 1])
                i += 2
                continue
            if c in "*?":
                if literal:
                    pieces.append("".join(literal))
                    literal = []
                if c == "?":
                    pieces.append(None)
                else:
                    segments.append(tuple(pieces))
                    pieces = []
            else:
                literal.append(c)
            i += 1
        if literal:
            pieces.append("".join(literal))
        segments.append(tuple(pieces))
        self._segments = segments
        self._star = len(segments) > 1

    def __repr__(self) -> str:
        return f"Glob({self._pattern!r})"

    # Equal patterns are equal globs: two parses of one spec give equal graphs.
    def __eq__(self, other: object) -> bool:
        return isinstance(other, Glob) and other._pattern == self._pattern

    def __hash__(self) -> int:
        return hash(self._pattern)

    @staticmethod
    def _length(seg: tuple[str | None, ...]) -> int:
        return sum(1 if p is None else len(p) for p in seg)

    @staticmethod
    def _at(text: str, pos: int, seg: tuple[str | None, ...]) -> bool:
        for p in seg:
            if p is None:
                pos += 1
            else:
                if not text.startswith(p, pos):
                    return False
                pos += len(p)
        return True

    def _find(self, text: str, start: int, stop: int, seg: tuple[str | None, ...], budget: Budget) -> int:
        """The leftmost position in [start, stop] where ``seg`` matches, or -1."""
        n = self._length(seg)
        last = stop - n
        if last < start:
            return -1
        if n == 0:
            return start
        # Anchor on the first literal piece with str.find (C speed), then check the whole segment.
        offset = 0
        anchor = None
        for p in seg:
            if p is not None:
                anchor = p
                break
            offset += 1
        pos = start
        while pos <= last:
            if anchor is None:
                cand = pos
            else:
                found = text.find(anchor, pos + offset, last + offset + len(anchor))
                if found < 0:
                    return -1
                cand = found - offset
            budget.spend(len(seg))
            if self._at(text, cand, seg):
                return cand
            pos = cand + 1
        return -1

    def match(self, text: str, budget: Budget | None = None) -> bool:
        """Whether ``text`` matches; the work is charged to ``budget`` (a condition's, shared by all
        its matches), else to a fresh one of :data:`MAX_GLOB_WORK` units."""
        if budget is None:
            budget = Budget(MAX_GLOB_WORK, f"the pattern {self._pattern[:60]!r}")
        budget.spend(1)
        segs = self._segments
        first = segs[0]
        if not self._star:
            return len(text) == self._length(first) and self._at(text, 0, first)
        head, tail = self._length(first), self._length(segs[-1])
        if head + tail > len(text) or not self._at(text, 0, first):
            return False
        end = len(text) - tail
        if not self._at(text, end, segs[-1]):
            return False
        pos = head
        for seg in segs[1:-1]:
            found = self._find(text, pos, end, seg, budget)
            if found < 0:
                return False
            pos = found + self._length(seg)
        return True
