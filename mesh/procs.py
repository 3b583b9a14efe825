"""Child processes that end when the process that started them dies, even by SIGKILL.

``mesh up`` starts etcd, a router and runtimes. Stopped in order, they exit cleanly; but a
supervisor killed with SIGKILL (or by the OOM killer) runs no clean-up at all, and its children
would live on as orphans: an etcd holding a port and a data directory, runtimes holding memory.
The mesh's own components also notice a dead parent by themselves (``MESH_PARENT_PID``, within a
second), but etcd cannot. So every child is started with Linux's parent-death signal
(``prctl(PR_SET_PDEATHSIG, SIGTERM)``): the kernel sends it SIGTERM the moment its parent dies. The
function is resolved in the parent and only called in the child between fork and exec, so no lock
or import is needed there. Elsewhere than Linux it does nothing.

A caveat of the kernel's: the signal follows the *thread* that forked, so start such children from
a thread that lives as long as the supervisor (``mesh up`` starts them from its main thread).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import signal
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    return getattr(libc, "prctl", None)


_PRCTL = _prctl()


def _die_with_parent() -> None:
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` for ``subprocess.Popen`` that makes the child get SIGTERM when this process
    dies; None where the platform has no such thing."""
    return _die_with_parent if _PRCTL is not None else None


__all__ = ["die_with_parent"]
