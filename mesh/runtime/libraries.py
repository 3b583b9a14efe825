"""The model libraries a runtime imports, and when: at the first load of a type, or at start-up for
the types configured (``runtime.preload_types``).

Importing torch, onnxruntime, xgboost and lightgbm costs a runtime about 250 MB of resident memory
and seconds of CPU, which a runtime that only ever sees scikit-learn models should not pay (issue
18: it idled at 366 MB). So a runtime imports nothing of a model library at start-up, by default:

- **Which types it advertises** is decided without importing: a type whose library is not
  installed (``importlib.util.find_spec`` of its top-level package, which reads no module of it)
  is left out, as an import failure used to leave it out. A library that is installed but broken
  fails its type's loads instead, each with the reason (``Loader.load``'s ImportError message).
- **The first load of a type** imports its library in the load's own thread before the load is
  measured (``mesh.runtime.service.prepare_load``), so the library's memory is never charged to
  that model's measured size, and the import's time is not in ``load_ms``. What the import cost
  (seconds, resident growth) is kept per type in :data:`IMPORTS`, logged once, and exported as
  metrics: the first load of a type is reported apart from the others.
- **Preloaded types** (``runtime.preload_types``) are imported at start-up before the instance is
  ready, bounded by ``runtime.warm_imports_timeout_s``, as every type was before: a deployment
  that wants its first request of a type to wait for no import names it; a type in that list whose
  library fails to import is left out of what the runtime advertises.

The trade-off: with lazy imports the first request of a type waits for its library (sklearn's
estimator modules: about 1 s on a busy 2-core pod; torch: 4-10 s), where a preloaded type's does
not. Model workers (``runtime.workers``) still import every advertised type at their start: their
memory bound (RLIMIT_DATA) is set after the imports and cannot be raised later.

Imports are process-wide and happen once, so the bookkeeping is too: two first loads of one type
at once import it once (a lock per type), and the second waits for the first. An import that
overlaps another model's measured load would look like that model's growth; the cache reads
:meth:`Imports.activity` and does not believe the resident growth of such a load (its footprint
counts instead), as for two loads that overlap.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import time
from dataclasses import dataclass

import psutil
import structlog

from mesh.model_libraries import LIBRARIES

log = structlog.get_logger(__name__)

def installed(model_type: str) -> bool:
    """Whether ``model_type``'s library is installed, without importing it (a type with no library
    of its own, a plug-in's, is). ``find_spec`` of a top-level name imports nothing."""
    for module in LIBRARIES.get(model_type, ()):
        try:
            if importlib.util.find_spec(module.split(".", 1)[0]) is None:
                return False
        except (ImportError, ValueError):
            return False
    return True


@dataclass(frozen=True)
class Imported:
    """What importing one type's library cost this process, measured once."""

    model_type: str
    seconds: float
    rss_bytes: int  # resident growth across the import (0 if it shrank: another thread freed memory)
    at_start: bool  # preloaded at start-up, rather than at the type's first load


def _rss() -> int:
    return int(psutil.Process().memory_info().rss)


class Imports:
    """The libraries this process has imported, each once, with what each cost (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._type_locks: dict[str, threading.Lock] = {}
        self._done: dict[str, Imported] = {}
        self._events = 0  # imports started + ended
        self._running = 0

    def activity(self) -> tuple[int, int]:
        """(imports started or ended so far, imports running now): a load measured while this
        moved, or while one ran, cannot tell its memory from the library's (``ModelCache``).
        Modules any thread imported count too (``sys.modules`` only grows): unpickling a model
        imports the estimator's own module when ``LIBRARIES`` does not name it (an SVC's
        ``sklearn.svm``), and that module's memory is the process's, not the model's."""
        return self._events + len(sys.modules), self._running

    def _type_lock(self, model_type: str) -> threading.Lock:
        with self._lock:
            return self._type_locks.setdefault(model_type, threading.Lock())

    def ensure(self, model_type: str, *, at_start: bool = False) -> Imported | None:
        """Import ``model_type``'s library unless done already; the new record when this call
        imported it, else None. Raises the import's error (ImportError, or whatever the library
        raises), leaving the type not done so that a later load tries again and reports it."""
        modules = LIBRARIES.get(model_type, ())
        if not modules or model_type in self._done:
            return None
        with self._type_lock(model_type):
            if model_type in self._done:  # imported by a concurrent first load meanwhile
                return None
            with self._lock:
                self._events, self._running = self._events + 1, self._running + 1
            try:
                before, started = _rss(), time.perf_counter()
                for module in modules:
                    importlib.import_module(module)
                record = Imported(model_type, time.perf_counter() - started, max(0, _rss() - before), at_start)
            finally:
                with self._lock:
                    self._events, self._running = self._events + 1, self._running - 1
            self._done[model_type] = record
        log.info("model library imported", model_type=model_type, seconds=round(record.seconds, 3),
                 rss_bytes=record.rss_bytes, when="start-up" if at_start else "first load of the type")
        return record

    def imported(self) -> list[Imported]:
        """The imports so far, in order."""
        return list(self._done.values())


IMPORTS = Imports()  # imports are process-wide, so is their record


__all__ = ["IMPORTS", "LIBRARIES", "Imported", "Imports", "installed"]
