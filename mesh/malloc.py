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

Large blocks too. glibc serves a block of at least ``M_MMAP_THRESHOLD`` with mmap and unmaps it
when freed, but it raises that threshold to the size of each mmapped block freed (up to 32 MiB):
after one burst of 16 MiB messages, the next ones come from the heap and stay there. 200
concurrent 16 MiB bodies left a router at its 3.7 GiB peak. A fixed threshold (4 MiB) turns the
raise off, so the memory of large messages goes back to the system as they are freed, at the cost
of page faults on each such message (mesh.transport.inflight). ``MALLOC_MMAP_THRESHOLD_`` wins.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os

M_ARENA_MAX = -8  # from glibc's malloc.h
M_MMAP_THRESHOLD = -3
DEFAULT_ARENAS = 2
MMAP_THRESHOLD = 4 << 20


def limit_arenas(arenas: int = DEFAULT_ARENAS) -> bool:
    """Whether the arena limit was set (False: not glibc, or ``MALLOC_ARENA_MAX`` already
    decides); the mmap threshold is fixed too, unless ``MALLOC_MMAP_THRESHOLD_`` decides."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    return bool(mallopt(M_ARENA_MAX, arenas))


def trim(*, collect: bool = True) -> bool:
    """Give a burst's memory back to the system, after a burst of large messages: first a full
    garbage collection (an error answered inside an ``except`` block keeps the handler's frame,
    so its request body, in a reference cycle with the exception: 150 refused 16 MiB bodies held
    2.5 GiB until the collector's next full pass), then ``malloc_trim(0)`` (gRPC allocates a
    message's buffers in pieces below the mmap threshold). Milliseconds to tens of them, with
    the GIL held for the collection; called once per burst (mesh.transport.inflight). False
    where not glibc. ``collect=False``: the caller ran the collection itself (on its event loop's
    thread, where the objects it frees belong)."""
    if collect:
        gc.collect()
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        return bool(ctypes.CDLL(name).malloc_trim(0))
    except (OSError, AttributeError):
        return False


__all__ = ["limit_arenas", "trim"]
