"""The queries every byte-weighted policy answers the same way.

A policy keeps ``_entries`` (key -> an entry with a ``size``) and ``_total`` (the sum of sizes);
from those, ``total_size``, membership, length and ``size_of`` follow, identically for LRU, GDSF,
SIEVE and S3-FIFO. Their orders and eviction logic differ and stay in their own modules.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol


class _HasSize(Protocol):
    @property
    def size(self) -> int: ...


class SizedEntries:
    __slots__ = ()
    _entries: Mapping[str, _HasSize]
    _total: int

    @property
    def total_size(self) -> int:
        return self._total

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def size_of(self, key: str) -> int | None:
        entry = self._entries.get(key)
        return None if entry is None else entry.size
