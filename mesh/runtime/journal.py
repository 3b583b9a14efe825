"""What a runtime is loading, written down before each load starts, so that a model that kills
the process is known after the fact.

A corrupt model file can abort the process that parses it (LightGBM 4.x calls ``std::terminate``
on a truncated text model: SIGABRT), and nothing in the process survives to say so. Two
witnesses are left:

- The caller that lost its call (a router's stream or ``loadModel``, a re-homing peer) reads the
  copy's placement: ``loading`` there means the runtime died during that load (the runtime writes
  it before the loader runs: ``Publisher.announce``). It records a crash on the lease of
  ``registry.crash_quarantine_s`` (``mesh.registry.crashes``): the model is quarantined, and no
  other runtime is tried with it.
- The runtime itself, restarted under the same instance ID (a pod keeps its name; ``mesh up``
  keeps its IDs). This journal holds one small file per load in progress (model, registration,
  a random token) and ``faulthandler``'s report of a fatal signal (SIGSEGV, SIGABRT, SIGBUS,
  SIGFPE, SIGILL): the crashing thread's stack. Each loader is called through a frame whose
  function is named after its load's token (``mesh_load_<token>``), so the stack names the load
  that crashed. On start, ``recover`` returns the loads the last life left behind; the one named
  on the crashing stack is proven guilty (its quarantine lasts until the model is registered
  again), the others were only in progress when it died (SIGKILL, the OOM killer, a crash
  elsewhere): the caller's time-limited quarantine covers them.

Only the crashing thread's stack is written (``all_threads=False``). Dumping every thread walks
the frames of threads that are still running; in a busy runtime that walk can itself fault, and
the second signal ends the process before the crashing thread's line is written (seen in CI: a
LightGBM abort read back as "a fatal signal elsewhere").

Writes are a few hundred bytes to a local directory in the load's own thread; nothing here
touches the event loop. A directory that cannot be written turns the journal off with a warning
(the callers' witness still works).
"""

from __future__ import annotations

import contextlib
import faulthandler
import fcntl
import hashlib
import json
import os
import re
import secrets
import stat
import tempfile
import threading
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

import structlog

from mesh.registry.crashes import Leftover
from mesh.registry.records import ModelSpec

log = structlog.get_logger(__name__)

FATAL_LOG = "fatal.log"
MAX_ENTRIES = 1_000  # loads in progress at once are a handful; a bound on what recover reads
MAX_FATAL_BYTES = 1 << 20  # every thread's stack: tens of threads, up to 100 frames each
LOCK_FILE = ".lock"
_FATAL_LINE = re.compile(r"^Fatal Python error: (.{1,200})$", re.M)
_LOAD_FRAME = re.compile(r"line \d+ in mesh_load_([0-9a-f]{16})$", re.M)
T = TypeVar("T")


def _call(fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    return fn(*args)


def _named_call(token: str) -> Callable[[Callable[..., Any], tuple[Any, ...]], Any]:
    """``_call`` under the name ``mesh_load_<token>``: faulthandler prints a frame's function name,
    so a fatal signal in the loader leaves the token on the crashing stack."""
    name = f"mesh_load_{token}"
    code = _call.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, _call.__globals__, name)


def journal_dir(instance_id: str, state_dir: str = "") -> Path:
    """The instance's own folder under ``runtime.state_dir`` (default: the temp dir's
    ``mesh-runtime``): runtimes that share a state_dir (``mesh up`` gives all its runtimes one
    configuration) never read each other's journals."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", instance_id)[:80]
    digest = hashlib.sha256(instance_id.encode()).hexdigest()[:8]
    base = Path(state_dir) if state_dir else Path(tempfile.gettempdir()) / "mesh-runtime"
    return base / f"{safe}-{digest}"


class LoadJournal:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.enabled = True
        self._fatal_file: IO[str] | None = None
        self._lock: int | None = None
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            st = os.lstat(directory)
            # In a shared temp dir, someone else's directory (or a link to one) is not ours to trust.
            problem = ("not a directory of this user" if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid()
                       else "")
            if not problem:
                problem = self._take_lock()
        except OSError as exc:
            problem = exc.strerror or type(exc).__name__
        if problem:
            log.warning("load journal off: its directory is unusable (runtime.state_dir); a model that "
                        "crashes this process is still quarantined by the router that sees it",
                        directory=str(directory), error=problem)
            self.enabled = False

    def _take_lock(self) -> str:
        """One live process per journal: a second process under the same instance ID (started by
        mistake; the registry refuses it next) must not read and delete the live one's entries.
        The kernel releases the lock when the process dies, however it dies."""
        fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return "another live process holds it (the same instance ID twice?)"
        self._lock = fd
        return ""

    # --- the previous life ----------------------------------------------------------------------
    def recover(self) -> list[Leftover]:
        """The loads left in progress by the previous process, then forget them."""
        if not self.enabled:
            return []
        fatal_text = ""
        fatal_path = self.directory / FATAL_LOG
        with contextlib.suppress(OSError):
            with open(fatal_path, "rb") as f:
                fatal_text = f.read(MAX_FATAL_BYTES).decode("utf-8", "replace")
            fatal_path.unlink()
        headline = _FATAL_LINE.search(fatal_text)
        crashed: set[str] = set()
        if headline:
            # The first report only: a second fatal signal in another thread writes its headline after it.
            following = _FATAL_LINE.search(fatal_text, headline.end())
            first = fatal_text[headline.end():following.start() if following else len(fatal_text)]
            crashed = set(_LOAD_FRAME.findall(first))
        out = []
        for path in sorted(self.directory.glob("load-*.json"))[:MAX_ENTRIES]:
            try:
                with open(path, "rb") as f:
                    data = json.loads(f.read(8192))
                path.unlink()
                out.append(Leftover(model_id=str(data["model_id"]), registered_ms=int(data["registered_ms"]),
                                    started_ms=int(data["started_ms"]),
                                    guilty=data.get("token") in crashed,
                                    fatal=headline.group(1).strip() if headline else ""))
            except (OSError, ValueError, KeyError, TypeError):
                with contextlib.suppress(OSError):
                    path.unlink()  # half-written at the moment of death, or not ours
        return out

    def watch_fatal_signals(self) -> None:
        """Have ``faulthandler`` write the crashing thread's stack here on a fatal signal (that
        thread's only: see the module docstring). For a runtime process of its own (``mesh serve
        runtime``): faulthandler holds one file per process."""
        if not self.enabled:
            return
        try:
            self._fatal_file = open(self.directory / FATAL_LOG, "w")  # held for the process's life
        except OSError as exc:
            log.warning("fatal-signal log off", directory=str(self.directory), error=exc.strerror)
            return
        faulthandler.enable(file=self._fatal_file, all_threads=False)

    def close(self) -> None:
        """A clean exit: nothing to report next time. The directory goes too once empty (a load
        thread that never returned leaves its entry, and the next start reports it)."""
        if not self.enabled:
            return
        self.enabled = False
        if self._fatal_file is not None:
            faulthandler.disable()
            self._fatal_file.close()
            self._fatal_file = None
        with contextlib.suppress(OSError):
            (self.directory / FATAL_LOG).unlink()
        if self._lock is not None:
            with contextlib.suppress(OSError):
                (self.directory / LOCK_FILE).unlink()
        self.release()
        with contextlib.suppress(OSError):
            self.directory.rmdir()  # only if empty

    def release(self) -> None:
        """A start that failed: the lock goes, what the last life left stays for the next."""
        self.enabled = False
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    # --- this life ------------------------------------------------------------------------------
    def _entry(self, model_id: str) -> Path:
        # One per load: a stuck load and the model's next load (another thread) keep their own.
        digest = hashlib.sha256(model_id.encode()).hexdigest()[:32]
        return self.directory / f"load-{digest}-{threading.get_ident():x}.json"

    def run(self, spec: ModelSpec, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``, the load of ``spec``, written down while it runs, in the thread that makes it."""
        path = self._entry(spec.model_id) if self.enabled else None
        token = secrets.token_hex(8)
        if path is not None:
            record = {"model_id": spec.model_id, "registered_ms": spec.registered_ms,
                      "started_ms": int(time.time() * 1000), "thread": threading.get_ident(),
                      "token": token, "pid": os.getpid()}
            try:
                # No fsync: what must survive is the process, not the machine (the page cache does).
                path.write_text(json.dumps(record))
            except OSError as exc:
                log.warning("could not write the load journal", error=exc.strerror)
                path = None
        try:
            result: T = _named_call(token)(fn, args)
            return result
        finally:
            if path is not None:
                with contextlib.suppress(OSError):
                    path.unlink()


__all__ = ["FATAL_LOG", "LoadJournal", "journal_dir"]
