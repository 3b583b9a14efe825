"""Where a server process spends its CPU: py-spy sampling of a running PID, summarised.

``py-spy record --pid P --format raw --native`` writes one line per distinct stack,
``frame;frame;... N`` (outermost first), Python frames interleaved with C and Cython ones (grpc's
``cygrpc``, uvloop's ``loop.c``, CPython). Native frames are the point: a byte-forwarding proxy
spends most of its time below Python, and a Python-only profile charges all of that to whatever
Python frame is outermost (``Runner.run``), which says nothing.

py-spy reports every sample in native mode, including threads blocked in ``epoll_wait``; the
summary drops samples whose innermost frame is a blocking wait (:data:`IDLE_LEAVES`, or unnamed
libc frames under a lock or GIL wait: a runtime's idle inference threads) and gives
percentages of the remaining, *busy* samples. It then groups them three ways:

* by thread: the event loop (main thread) and grpc's poller thread (grpc.aio runs a thread that
  polls the C-core completion queue and wakes the loop);
* by the innermost frame's layer (:func:`layer`): grpc C-core/Cython, kernel calls through libc,
  uvloop, the CPython runtime, Python code of mesh, of grpc.aio, of asyncio/stdlib;
* by Python function, inclusive: how much of the busy time is spent under each Python frame
  (e.g. ``Forwarder.forward``), leaving out the entry frames that every sample shares.

Native unwinding pauses the process at each sample (py-spy cannot unwind a running thread), so a
profile runs in a phase of its own, never during a measured one. Cython frames of ``cygrpc`` show
as addresses (the wheel is stripped); they are grouped by library.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

_LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")
_LINENO = re.compile(r":\d+\)$")
_FILE = re.compile(r"\((?P<file>[^()]*)\)$")

IDLE_LEAVES = frozenset({
    "epoll_wait", "epoll_pwait", "epoll_pwait2", "poll", "ppoll", "select", "pselect", "pselect6",
    "nanosleep", "clock_nanosleep", "pthread_cond_wait", "pthread_cond_timedwait",
    "__futex_abstimed_wait_common", "futex_wait", "sem_wait", "sem_timedwait", "accept", "accept4",
})
# Frames every main-thread or every thread sample shares: no information in their inclusive share.
_ENTRY_FILES = ("<frozen runpy>", "mesh/__main__.py", "mesh/cli/main.py", "mesh/cli/serve.py",
                "uvloop/__init__.py", "asyncio/runners.py", "threading.py")


REPO_ROOT = str(Path(__file__).resolve().parent.parent) + "/"
_SHORTEN = re.compile(r"\((?:[^()]*/(?:site-packages|dist-packages|lib/python3\.\d+)/|" + re.escape(REPO_ROOT) + r")")


def _frame_name(frame: str) -> str:
    """``func (file:line)`` -> ``func (file)``, files shown relative to site-packages, the standard
    library or this repository (py-spy runs with ``--full-filenames`` so that ``mesh/...`` is
    told apart from other packages' modules of the same name)."""
    return _SHORTEN.sub("(", _LINENO.sub(")", frame.strip()))


def _function(frame: str) -> str:
    return frame.split(" (", 1)[0]


def _file(frame: str) -> str:
    m = _FILE.search(frame)
    return m["file"] if m else ""


_UV_FILES = frozenset({"loop.c", "handles.c", "core.c", "linux.c", "loop-watcher.c", "stream.c", "queue.h",
                       "tcp.c", "poll.c", "async.c", "timer.c"})


def layer(leaf: str) -> str:
    """The layer the innermost frame belongs to."""
    file = _file(leaf)
    base = file.rsplit("/", 1)[-1]
    if "cygrpc" in base or "libgrpc" in base:
        return "grpc C-core / Cython (cygrpc)"
    if base.startswith(("libc.so", "libc-", "libpthread")):
        return "kernel calls via libc (send/recv/write/futex)"
    if base in _UV_FILES or "uvloop" in file:
        return "uvloop / libuv"
    if file.endswith(".py"):
        if file.startswith(("mesh/", "placement/")):
            return "Python: mesh code"
        if file.startswith("grpc/"):
            return "Python: grpc.aio layer"
        return "Python: asyncio / stdlib"
    return "CPython runtime (interpreter, asyncio C, allocator)"


@dataclass
class Profile:
    samples: int = 0
    idle: int = 0
    by_thread: Counter[str] = field(default_factory=Counter)
    by_layer: Counter[str] = field(default_factory=Counter)
    self_counts: Counter[str] = field(default_factory=Counter)
    python_total: Counter[str] = field(default_factory=Counter)

    @property
    def busy(self) -> int:
        return self.samples - self.idle

    def pct(self, count: int) -> float:
        return 100.0 * count / max(self.busy, 1)

    def top(self, counter: Counter[str], n: int) -> list[tuple[str, float]]:
        return [(k, round(self.pct(c), 1)) for k, c in counter.most_common(n)]

    def as_dict(self, n: int = 15) -> dict[str, object]:
        return {"samples": self.samples, "busy": self.busy,
                "by_thread": self.top(self.by_thread, 5), "by_layer": self.top(self.by_layer, 10),
                "self": self.top(self.self_counts, n), "python_inclusive": self.top(self.python_total, n)}


def available() -> bool:
    return shutil.which("py-spy") is not None


def start_record(pid: int, output: Path, *, duration_s: float, rate: int = 250,
                 native: bool = True, gil: bool = False) -> subprocess.Popen[bytes]:
    """Start ``py-spy record`` on ``pid`` in the background; wait on the returned process.
    ``gil``: Python frames of the thread holding the GIL only (no native frames, the process not
    paused): where the interpreter's time goes across the event loop and the inference threads,
    which native sampling of a runtime under-counts (its inference threads' samples mostly
    unwind to waits)."""
    argv = ["py-spy", "record", "--pid", str(pid), "--format", "raw", "--output", str(output),
            "--duration", str(max(1, round(duration_s))), "--rate", str(rate), "--full-filenames"]
    if gil:
        argv += ["--gil", "--nonblocking"]
    else:
        argv += ["--native"] if native else ["--nonblocking"]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


# Waits whose innermost libc frames py-spy leaves unnamed (``0x7f... (libc.so.6)``): a thread
# blocked on a lock or condition below these CPython frames is idle (an inference thread waiting for
# work in ``SimpleQueue.get``; a thread waiting for the GIL).
_IDLE_CALLERS = frozenset({"PyThread_acquire_lock_timed", "take_gil", "PyCOND_TIMEDWAIT", *IDLE_LEAVES})


def _idle(frames: list[str]) -> bool:
    """Whether a stack is a blocking wait: its innermost frame is one, or the innermost frames are
    unnamed libc addresses under one."""
    if _function(frames[-1]) in IDLE_LEAVES:
        return True
    for frame in reversed(frames[-4:]):
        name = _function(frame)
        if name in _IDLE_CALLERS:
            return True
        if not name.startswith("0x"):
            return False
    return False


def parse_raw(text: str) -> Profile:
    prof = Profile()
    for line in text.splitlines():
        m = _LINE.match(line.strip())
        if not m:
            continue
        count = int(m["count"])
        frames = [_frame_name(f) for f in m["stack"].split(";") if f.strip()]
        if not frames:
            continue
        prof.samples += count
        leaf = frames[-1]
        if _idle(frames):
            prof.idle += count
            continue
        thread = ("grpc poller / other thread" if any(f.startswith("Thread.run (") for f in frames)
                  else "event loop (main thread)")
        prof.by_thread[thread] += count
        prof.by_layer[layer(leaf)] += count
        prof.self_counts[leaf] += count
        for frame in {f for f in frames if _file(f).endswith(".py") and not _file(f).endswith(_ENTRY_FILES)
                      and not _file(f).startswith("<frozen")}:
            prof.python_total[frame] += count
    return prof


def format_summary(prof: Profile, n: int = 15) -> str:
    lines = [f"{prof.samples} samples, {prof.busy} busy ({prof.idle} idle waits left out); "
             "percentages of busy samples"]
    for title, counter, k in (("by thread", prof.by_thread, 5), ("by layer of the innermost frame",
                                                                  prof.by_layer, 10),
                              ("Python functions, inclusive", prof.python_total, n),
                              ("innermost frames (self)", prof.self_counts, n)):
        lines.append(f"{title}:")
        lines += [f"  {pct:5.1f}%  {name}" for name, pct in prof.top(counter, k)]
    return "\n".join(lines)
