"""Bound glibc's malloc arenas in server processes.

Why. glibc gives each thread that allocates under contention an arena of its own, up to 8 per core,
and rarely returns an arena's freed memory to the system. gRPC core reads and writes messages on
its own threads, so a burst of large messages leaves a router's RSS a step higher after each burst:
in the flood test (``tests/integration/test_fuzz_inputs.py``: 2,000 concurrent calls, a tenth of
them 270 KB) the router went 239 -> 411 MB over 14 rounds with the default, and levelled off at
211 MB with two arenas. Two arenas cost nothing measurable here: the event loop thread does most
allocation, and gRPC's threads rarely contend.

How. ``mallopt(M_ARENA_MAX, n)`` at process start, before the threads that would create more
arenas. An operator's ``MALLOC_ARENA_MAX`` in the environment wins (glibc reads it itself); other C
libraries (musl) are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_ARENA_MAX = -8  # from glibc's malloc.h
DEFAULT_ARENAS = 2


def limit_arenas(arenas: int = DEFAULT_ARENAS) -> bool:
    """Whether the limit was set (False: not glibc, or ``MALLOC_ARENA_MAX`` already decides)."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_ARENA_MAX, arenas))


__all__ = ["limit_arenas"]
